"""Which path an op takes, and the helpers every op family shares.

* **Eager** (default): the op reads ``mask[index]`` when the forward runs and, when its layer is
  dropped, runs the plain op on detached parameters; in dense mode (DDP) it then attaches zero
  gradients (:class:`_WithZeroGrads`).
* **Mask read at backward** (under ``torch.compile``, or eagerly inside :class:`compiled_path`):
  autograd Functions whose backward calls the kernels of :mod:`ldbfx.ops.kernels`, which read the
  mask when the backward runs, so one compiled graph serves every mask.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.state import state_of

_aten = torch.ops.aten
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Path(threading.local):
    """Per thread: whether the compiled path's Functions also run eagerly (:class:`compiled_path`)."""

    compiled_in_eager = False


_path = _Path()


def _mask_read_at_backward() -> bool:
    """Whether to run the Functions whose backward reads the mask (under ``torch.compile``, where
    reading it in the forward would specialise the graph, or inside :class:`compiled_path`)."""
    return _path.compiled_in_eager or torch.compiler.is_compiling()


def _dense(mask: Tensor) -> bool:
    """Whether the model owning ``mask`` is in dense-gradient mode (eager only)."""
    return state_of(mask).dense


class _WithZeroGrads(torch.autograd.Function):
    """Dense mode: ``out`` passes through unchanged and each of ``params`` gets a zero gradient.

    A dropped layer of a model under DDP runs exactly the default eager path (detached
    parameters: no dW computed, no activation kept for it), then this node gives its parameters
    the zero gradients DDP's reducer waits for. ``out`` is marked dirty (as an in-place op would
    be) rather than viewed, so later in-place ops on it (``ReLU(inplace=True)``) work, and the
    gradient reaching ``out``'s own producer is the very tensor that arrived here: the input
    gradients, hence every kept layer's gradients, are bitwise those of the default path.
    """

    @staticmethod
    def forward(ctx, out, *params):
        ctx.mark_dirty(out)
        ctx.geometry = [(p.shape, p.stride(), p.dtype, p.device) for p in params]  # no reference kept
        return out

    @staticmethod
    def backward(ctx, grad):
        zeros = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                      for shape, stride, dtype, device in ctx.geometry)
        return (grad, *zeros)


def _dropped_output(out: Tensor, mask: Tensor, *params: Tensor | None) -> Tensor:
    """The output of a dropped layer's eager op (run on detached ``params``): in dense mode, with
    zero gradients for ``params`` attached."""
    if not _dense(mask):
        return out
    params = tuple(p for p in params if p is not None and p.requires_grad)
    return _WithZeroGrads.apply(out, *params) if params else out


class compiled_path:
    """Context manager: run the compiled path's autograd Functions in eager mode too (this thread).

    The mask is then read when the backward runs, as under ``torch.compile``. For tests and
    benchmarks of the Functions and custom ops without compiling a model.
    """

    def __enter__(self):
        self._previous, _path.compiled_in_eager = _path.compiled_in_eager, True

    def __exit__(self, *exc):
        _path.compiled_in_eager = self._previous


opaque_path = compiled_path  # the name before 2026-12-01

#: How the compiled backward calls its mask-reading kernels (:data:`ldbfx.ops.kernels.KERNELS`):
#: ``native`` (C++ bodies for the most frequent kernels, :mod:`ldbfx.ops.native`; the default
#: where they build) or ``library`` (``Library.define``/``impl`` with Python bodies; the default
#: where they do not, and the reference the native kernels are tested against). Read when a graph
#: is traced; both give the same gradients.
MECHANISMS = ("native", "library")
_mechanism: str | None = None  # None: native where it builds, else library


def mechanism() -> str:
    """The compiled-path mechanism new traces use (the first call may build the native kernels)."""
    if _mechanism is not None:
        return _mechanism
    from . import native

    return "native" if native.available() else "library"


class using_mechanism:
    """Context manager: trace (compile) with the other compiled-path mechanism (tests, comparisons).

    The choice is process-wide (not per thread) and read when a backward is traced. Dynamo
    guards on it, so a model compiled inside the context and then called outside it is compiled
    again with the default: call it inside too (``benchmarks/compiled_path.py`` does).

    Example:
        >>> from ldbfx.ops import path
        >>> with path.using_mechanism("library"):
        ...     path.mechanism()
        'library'
    """

    def __init__(self, name: str):
        if name not in MECHANISMS:
            raise ValueError(f"unknown compiled-path mechanism {name!r}; choose one of {MECHANISMS}")
        if name == "native":
            from . import native

            if not native.available():
                raise RuntimeError(f"the native compiled-path kernels are not available here ({native.reason})")
        self.name = name

    def __enter__(self):
        global _mechanism
        self._previous, _mechanism = _mechanism, self.name

    def __exit__(self, *exc):
        global _mechanism
        _mechanism = self._previous


def _is_dropped(mask: Tensor, index: int) -> bool:
    """Whether layer ``index`` is dropped now: a read of the CPU mask, no device sync (eager ops
    when the forward runs, the kernels when the backward runs)."""
    return state_of(mask).is_dropped(mask, index)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts like autocast would inside ``F.linear``/``F.conv*``, but outside our Function.

    Autocast casts fp32 inputs of matmuls and convolutions to its low-precision dtype. Doing the
    cast here records it as an ordinary autograd op, so our backward receives the low-precision
    tensors exactly as aten's backward would, and the cast's own backward returns ``dW`` in the
    parameter's dtype.
    """
    ref = next(t for t in tensors if t is not None)
    device = ref.device.type
    if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
