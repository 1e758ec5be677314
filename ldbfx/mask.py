"""Run-time drop state: which layers skip their weight gradients on the next forward.

:func:`set_dropped` writes the CPU mask every rewritten op reads; nothing is retraced or
recompiled. It also makes ``optimizer.step()`` leave dropped layers untouched (LayerDropBack eq. 3,
``w' = w + Δw · I(l ∈ S)``): torch.optim skips a parameter whose ``.grad`` is ``None``, which is
what an eager backward leaves for a dropped layer. A compiled backward yields zeros instead (an
opaque kernel cannot return "no gradient"), and ``zero_grad(set_to_none=False)`` leaves zeros too;
so ldbfx registers one global optimizer step pre-hook that sets the dropped parameters' ``.grad``
to ``None`` right before any optimizer steps. Its cost is one loop over the *dropped* parameters.

Gradient accumulation: change the mask only between optimizer steps (the policies do). A layer
dropped during any micro-batch of an accumulation window gets no update for the whole window.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import LayerNotFoundError
from .layers import Layer
from .module import MASK_ATTR, LdbGraphModule

__all__ = ["set_dropped", "dropped"]

_WITH_DROPPED: weakref.WeakSet[LdbGraphModule] = weakref.WeakSet()
_hook_handle = None


def _clear_dropped_grads(optimizer, args, kwargs) -> None:
    for gm in _WITH_DROPPED:
        for param in gm._ldbfx_dropped_params:
            param.grad = None


def _check(gm: object) -> LdbGraphModule:
    if not isinstance(gm, LdbGraphModule):
        raise TypeError(
            f"expected a module returned by ldbfx.transform, got {type(gm).__name__}; "
            "call gm = ldbfx.transform(model) first"
        )
    return gm


def _index(gm: LdbGraphModule, layer: str | int | Layer) -> int:
    """Resolves one layer reference in O(1); the list of valid names is built only for errors."""
    layers = gm.ldbfx_layers
    if isinstance(layer, Layer):
        layer = layer.index
    if isinstance(layer, str):
        index = gm._ldbfx_index.get(layer)
    elif isinstance(layer, int) and not isinstance(layer, bool):
        index = layer % len(layers) if -len(layers) <= layer < len(layers) else None
    else:
        raise TypeError(f"layers are named by str or int index, got {type(layer).__name__}: {layer!r}")
    if index is not None and layers[index].eligible:
        return index
    eligible = [l.name for l in layers if l.eligible]
    if index is None:
        raise LayerNotFoundError.unknown(layer, eligible)
    raise LayerNotFoundError(
        f"layer {layers[index].name!r} (index {index}) may not be dropped ({layers[index].reason}). "
        f"Eligible layers are: {', '.join(eligible) or '(none)'}"
    )


def set_dropped(gm: LdbGraphModule, layers: Iterable[str | int | Layer]) -> None:
    """Skips the weight (and bias) gradients of ``layers`` from the next forward on.

    No retrace, no recompile: a CPU mask is updated in place. ``[]`` restores full backprop.
    Dropped layers still pass the input gradient to earlier layers, and ``optimizer.step()``
    leaves their parameters and optimizer state unchanged.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        layers: names, indices or :class:`ldbfx.Layer` records of eligible layers.

    Raises:
        LayerNotFoundError: a name or index does not exist or is not eligible; the message lists
            the eligible layers.

    Example:
        >>> import torch, ldbfx
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)]))
        >>> ldbfx.set_dropped(gm, [4, "5"])
        >>> ldbfx.dropped(gm)
        ('4', '5')
        >>> ldbfx.set_dropped(gm, [])
    """
    global _hook_handle
    gm = _check(gm)
    if isinstance(layers, (str, int, Layer)):
        layers = [layers]
    indices = sorted({_index(gm, layer) for layer in layers})
    mask = gm.__dict__[MASK_ATTR]
    mask.zero_()
    if indices:
        mask[indices] = True
    gm._ldbfx_dropped_params = tuple(p for i in indices for p in gm._ldbfx_layer_params[i])
    if indices:
        _WITH_DROPPED.add(gm)
        if _hook_handle is None:
            _hook_handle = register_optimizer_step_pre_hook(_clear_dropped_grads)
    else:
        _WITH_DROPPED.discard(gm)


def dropped(gm: LdbGraphModule) -> tuple[str, ...]:
    """Names of the layers currently dropped, in topological order."""
    gm = _check(gm)
    mask = gm.__dict__[MASK_ATTR]
    return tuple(gm.ldbfx_layers[i].name for i in mask.nonzero().flatten().tolist())
