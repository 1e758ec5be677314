"""ldbfx under ``torch.distributed``: DistributedDataParallel without unused-parameter errors.

DDP's reducer expects every parameter to receive a gradient in every backward. In eager mode a
dropped layer leaves ``.grad`` as ``None`` (that is how it saves the weight gradient), which the
reducer treats as an unused parameter: an "expected to have finished reduction" error on the next
step, or ``find_unused_parameters=True`` and its per-step graph traversal. :func:`dense_gradients`
switches a model to the path ``torch.compile`` uses: dropped layers still skip their weight-gradient
computation (the opaque kernels return zeros without computing them), but every parameter gets a
gradient, so the reducer all-reduces every bucket as usual. After the all-reduce, ldbfx's optimizer
hook turns the dropped layers' zeros back into ``None``, so the optimizer leaves them untouched on
every rank.

Masks must be the same on every rank. The policies draw them from their own seeded generator, so
the same ``seed`` on every rank gives identical masks without communication; :func:`check_masks`
verifies it (one all-gather of the mask, for debugging).

Example:
    >>> import torch, ldbfx
    >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
    >>> ldbfx.distributed.dense_gradients(gm)
    >>> ldbfx.set_dropped(gm, ["5"])
    >>> gm(torch.randn(2, 4)).sum().backward()
    >>> bool(gm.get_submodule("5").weight.grad.abs().sum() == 0)   # a zero, not None
    True
"""

from __future__ import annotations

import torch

from . import ops
from .errors import LdbfxError
from .mask import _check
from .module import MASK_ATTR

__all__ = ["dense_gradients", "check_masks"]


def dense_gradients(gm, enabled: bool = True) -> None:
    """Dropped layers of ``gm`` yield zero gradients instead of none (for DDP); FLOPs are still saved.

    Args:
        gm: a module returned by :func:`ldbfx.transform`, before wrapping it in DDP.
        enabled: ``False`` restores the default (``None`` gradients in eager mode).
    """
    key = _check(gm).__dict__[MASK_ATTR].untyped_storage().data_ptr()
    if enabled:
        ops._DENSE.add(key)
    else:
        ops._DENSE.discard(key)


def check_masks(gm, group=None) -> None:
    """Raises :class:`LdbfxError` if the drop mask differs between ranks (one all-gather).

    Call it in debug runs after the policy's draw; a divergent mask means the ranks were not given
    the same policy ``seed`` (their weights would silently drift apart).
    """
    mask = _check(gm).__dict__[MASK_ATTR]
    backend = torch.distributed.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    local = mask.to(device=device, dtype=torch.uint8)
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, local, group=group)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise LdbfxError(
            f"ldbfx masks differ between ranks (rank 0 vs ranks {differing}): give every rank's policy "
            "the same seed, or broadcast the mask from rank 0")
