"""The kernels (torch.library ops) of the compiled path: they read the mask when the backward *runs*.

A dropped layer's kernel returns zeros without computing them and records the skip in the model's
state (what the optimizer hook then leaves untouched); a kept layer's computes its weight gradient
(for the kept rows only, with a row selection).

The bodies here are Python. All but the embeddings' also have C++ bodies (``ldbfx::<name>_native``,
:mod:`ldbfx.ops.native`), which the compiled backward calls where they build; these Python ones
stay the reference, the fallback, and what the C++ ones defer to for row selections.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ..runtime.state import state_of
from . import native, path
from .path import _aten
from .rows import _conv_weight_grad_rows, _linear_weight_grad_rows, row_selection

# --------------------------------------------------------------------------------------------
# Opaque weight-gradient kernels for the compiled path. They read the mask at run time.
# They return exactly the strides of their fakes, so Inductor inserts no layout copies after them
# (the prototype in the core issue measured +27% on a channels_last CNN backward without that).
#
# How Inductor lays out their inputs (a layout tag per op, see ``_LAYOUT`` below):
# * convolutions: ``needs_fixed_stride_order``, what Inductor gives ``aten.convolution_backward``:
#   the incoming gradient in the traced graph's stride order (channels_last after Inductor's
#   layout optimisation), written that way by the fused kernel that computes it. Under
#   ``flexible_layout`` Inductor realised 10 of ResNet-50's 53 incoming gradients contiguous
#   beside a channels_last input, and each cost an activation-sized copy (or a reorder in oneDNN).
# * the others: ``flexible_layout`` (2-D operands, or a copy of whatever arrives).
# --------------------------------------------------------------------------------------------
#
# ``cudagraph_unsafe``: each of these decides on the host, from the CPU mask, what to compute. A
# CUDA graph recorded around one (``torch.compile(mode="reduce-overhead")``) would replay the
# branch taken while recording, and gradients would be silently stale when the mask changes. The
# tag makes Inductor keep them out of CUDA graphs (a partition boundary, or no CUDA graph for that
# region). It exists from torch 2.9, which ldbfx requires for it: without the tag a CUDA graph
# would silently replay stale masks, so an older torch fails here, at import.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,)


def _skipped(mask: Tensor, index: int) -> bool:
    """Whether layer ``index`` is dropped as the backward runs; if so, records that this backward
    skipped it (what the optimizer hook then leaves untouched). One state lookup for both."""
    state = state_of(mask)
    if state.is_dropped(mask, index):
        state.record_skipped(index)
        return True
    return False


def _linear_weight_grad_impl(
    grad2d: Tensor, x2d: Tensor, mask: Tensor, index: int, with_bias: bool
) -> tuple[Tensor, Tensor]:
    out_features = grad2d.shape[1] if with_bias else 0
    if _skipped(mask, index):
        shape = (grad2d.shape[1], x2d.shape[1])
        return _dropped_weight_grad(grad2d, shape, _contiguous_strides(shape)), grad2d.new_zeros(out_features)
    rows = row_selection(mask, index)
    if rows is not None:
        grad_w, grad_b = _linear_weight_grad_rows(grad2d, x2d, rows, with_bias)
        return grad_w, grad_b if with_bias else grad2d.new_zeros(0)
    grad_bias = grad2d.sum(0) if with_bias else grad2d.new_zeros(0)
    return grad2d.t().mm(x2d), grad_bias


def _linear_weight_grad_fake(grad2d, x2d, mask, index, with_bias):
    return grad2d.new_empty(grad2d.shape[1], x2d.shape[1]), grad2d.new_empty(
        grad2d.shape[1] if with_bias else 0
    )


def _conv_weight_grad_impl(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    index: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    want_weight: bool,
    with_bias: bool,
    contiguous_weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """A convolution's dW and db, not computed when the layer is dropped; outputs not wanted come
    back empty. dX is an ordinary ``convolution_backward`` in the graph (see ``ops.convs``)."""
    return _conv_backward_impl(grad, x, weight, mask, index, stride, padding, dilation, groups,
                               False, want_weight, with_bias, contiguous_weight_grad)[1:]


def _conv_weight_grad_fake(grad, x, weight, mask, index, stride, padding, dilation, groups, want_weight, with_bias,
                           contiguous_weight_grad):
    return _conv_backward_fake(grad, x, weight, mask, index, stride, padding, dilation, groups,
                               False, want_weight, with_bias, contiguous_weight_grad)[1:]


def _conv_backward_impl(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    index: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    want_input: bool,
    want_weight: bool,
    with_bias: bool,
    contiguous_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A convolution's dX, dW and db in one ``convolution_backward`` call (the CPU path); a
    dropped layer's dW and db are zeros, not computed. Outputs not wanted come back empty.

    oneDNN computes dX and dW faster in one call than in two (measured on ResNet-50's shapes,
    channels_last: two calls cost 6-14% more; docs/design.md). Inductor hands the incoming
    gradient over in the traced graph's stride order (``needs_fixed_stride_order``); where that
    order is contiguous beside a channels_last input (after a global pool), the gradient is
    brought to the input's layout here, which oneDNN would otherwise do less well itself.

    ``contiguous_weight_grad``: dW is returned contiguous (the parameter's layout when traced)
    rather than in the layout of the saved ``weight``, which Inductor's layout optimisation makes
    channels_last. ``AccumulateGrad`` steals a gradient only in the parameter's layout and copies
    any other, so a kept layer's copy moves here (the same bytes) and a dropped layer's zeros are
    written once, where they stay.
    """
    channels_last = _CHANNELS_LAST.get(x.dim())
    if want_input and channels_last is not None and not x.is_contiguous() \
            and x.is_contiguous(memory_format=channels_last) and not grad.is_contiguous(memory_format=channels_last):
        grad = grad.contiguous(memory_format=channels_last)
    dropped = _skipped(mask, index)
    rows = None if dropped else row_selection(mask, index)
    fused_weight = want_weight and not dropped and rows is None
    fused_bias = with_bias and not dropped and rows is None
    if want_input or fused_weight or fused_bias:
        gx, gw, gb = _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if fused_bias else None, stride, padding, dilation, False,
            [0] * len(stride), groups, [want_input, fused_weight, fused_bias])
    if not want_input:
        gx = grad.new_empty(0)
    elif gx.stride() != x.stride():
        gx = _strided_as(gx, _empty_like_strides(x))  # the fake's layout
    weight_strides = _weight_grad_strides(weight, contiguous_weight_grad)
    if dropped:
        gw = _dropped_weight_grad(weight, weight.shape, weight_strides) if want_weight else grad.new_empty(0)
        gb = grad.new_zeros(weight.shape[0]) if with_bias else grad.new_empty(0)
        return gx, gw, gb
    if rows is not None:
        gw, gb = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows, with_bias)
    # Distinct empty tensors where not wanted: outputs may not alias.
    gw = _strided_as(gw, weight_strides) if want_weight else grad.new_empty(0)
    return gx, gw, gb if with_bias else grad.new_empty(0)


def _dropped_weight_grad(like: Tensor, shape: Sequence[int], strides: Sequence[int]) -> Tensor:
    """A dropped linear's or convolution's weight gradient: zeros, the one cost of a dropped layer
    that freezing does not pay (memory traffic: 25.6 MB per ResNet-50 step at 30% dropped; a
    memset on a GPU; leaving them unwritten measured no faster on CPU, docs/history.md)."""
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device).zero_()


def _weight_grad_strides(weight: Tensor, contiguous: bool) -> tuple[int, ...]:
    """The strides the conv kernels' fakes promise for dW (see ``contiguous_weight_grad``): the
    contiguous ones, or the weight's own where it is dense (channels_last), or, for a weight that
    is not dense (expanded, sliced), the dense strides ``empty_like`` gives."""
    return _contiguous_strides(weight.shape) if contiguous else _empty_like_strides(weight)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """``torch.empty(shape).stride()``, without allocating. Cached (the shapes are parameters',
    static, and the kernels ask once per layer and step), except for a symbolic shape (a fake
    kernel under dynamic parameter shapes), whose sizes cannot be hashed."""
    try:
        return _contiguous_strides_of(tuple(shape))
    except TypeError:
        return _contiguous_strides_of.__wrapped__(shape)


@functools.lru_cache(maxsize=4096)
def _contiguous_strides_of(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _empty_like_strides(t: Tensor) -> tuple[int, ...]:
    """The strides of ``torch.empty_like(t)`` (what the fakes return): ``t``'s own where it is
    dense, read without allocating; the dense layout ``empty_like`` picks otherwise."""
    channels_last = _CHANNELS_LAST.get(t.dim())
    if t.is_contiguous() or (channels_last is not None and t.is_contiguous(memory_format=channels_last)):
        return tuple(t.stride())
    return tuple(torch.empty_like(t).stride())


def _new_strided(like: Tensor, strides: Sequence[int]) -> Tensor:
    return torch.empty_strided(like.shape, strides, dtype=like.dtype, device=like.device)


def _strided_as(t: Tensor, strides: Sequence[int]) -> Tensor:
    """``t`` with exactly ``strides`` (what the fake promised): Inductor's code assumes them.

    Strides of size-1 dimensions address no memory: oneDNN returns a 1x1 convolution's dW as
    ``(C, 1, C, C)`` where a contiguous parameter has ``(C, 1, 1, 1)``, the same bytes. Those are
    restrided, not copied (copying cost ResNet-50 36 weight-sized copies per step). Only a
    different layout is copied.
    """
    strides = tuple(strides)
    if t.stride() == strides:
        return t
    if t.storage_offset() == 0 and all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n != 1):
        return t.as_strided(t.shape, strides)
    return _new_strided(t, strides).copy_(t)


def _conv_backward_fake(grad, x, weight, mask, index, stride, padding, dilation, groups, want_input,
                        want_weight, with_bias, contiguous_weight_grad):
    return (torch.empty_like(x) if want_input else grad.new_empty(0),
            _new_strided(weight, _weight_grad_strides(weight, contiguous_weight_grad)) if want_weight
            else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if with_bias else grad.new_empty(0))


def _embedding_weight_grad_impl(
    grad: Tensor, indices: Tensor, mask: Tensor, index: int, num_weights: int,
    padding_idx: int, scale_grad_by_freq: bool,
) -> Tensor:
    if _skipped(mask, index):
        return grad.new_zeros(num_weights, grad.shape[-1])
    return _aten.embedding_backward(
        grad, indices, num_weights, padding_idx, scale_grad_by_freq, False
    ).contiguous()


def _embedding_weight_grad_fake(grad, indices, mask, index, num_weights, padding_idx, scale_grad_by_freq):
    return grad.new_empty(num_weights, grad.shape[-1])


def _masked_grad_impl(grad: Tensor, mask: Tensor, index: int) -> Tensor:
    if _skipped(mask, index):
        return torch.zeros_like(grad)
    return grad.clone()


def _masked_grad_fake(grad, mask, index):
    return torch.empty_like(grad)


# --------------------------------------------------------------------------------------------
# Registration, two mechanisms:
#
# * ``library`` (the default where the C++ bodies of :mod:`ldbfx.ops.native` do not build):
#   ``torch.library.Library.define`` + ``impl`` + ``register_fake`` with the Python bodies above.
#   The dispatcher calls the body directly, without ``@custom_op``'s Python wrapper (schema
#   checks, autograd registration), which the compiled backward would pay per layer and step
#   (docs/design.md, "The compiled path").
# * ``native``: the same schemas with C++ bodies, below.
# --------------------------------------------------------------------------------------------
_SCHEMAS = {
    "linear_weight_grad": ("(Tensor grad2d, Tensor x2d, Tensor mask, int index, bool with_bias) -> (Tensor, Tensor)",
                           _linear_weight_grad_impl, _linear_weight_grad_fake),
    "conv_weight_grad": (("(Tensor grad, Tensor x, Tensor weight, Tensor mask, int index, int[] stride, "
                          "int[] padding, int[] dilation, int groups, bool want_weight, bool with_bias, "
                          "bool contiguous_weight_grad) -> (Tensor, Tensor)"), _conv_weight_grad_impl, _conv_weight_grad_fake),
    "conv_backward": (("(Tensor grad, Tensor x, Tensor weight, Tensor mask, int index, int[] stride, "
                       "int[] padding, int[] dilation, int groups, bool want_input, bool want_weight, "
                       "bool with_bias, bool contiguous_weight_grad) -> (Tensor, Tensor, Tensor)"), _conv_backward_impl, _conv_backward_fake),
    "embedding_weight_grad": (("(Tensor grad, Tensor indices, Tensor mask, int index, int num_weights, "
                               "int padding_idx, bool scale_grad_by_freq) -> Tensor"),
                              _embedding_weight_grad_impl, _embedding_weight_grad_fake),
    "masked_grad": ("(Tensor grad, Tensor mask, int index) -> Tensor", _masked_grad_impl, _masked_grad_fake),
}

_LAYOUT = {"conv_weight_grad": torch.Tag.needs_fixed_stride_order, "conv_backward": torch.Tag.needs_fixed_stride_order}


def _tags(name: str) -> tuple:
    """A kernel's layout tag and ``cudagraph_unsafe`` (the ``_native`` twins too)."""
    return (_LAYOUT.get(name, torch.Tag.flexible_layout),) + _CUDAGRAPH_UNSAFE


_LIB = torch.library.Library("ldbfx", "FRAGMENT")
#: mechanism -> kernel name -> the op the compiled backward calls.
KERNELS: dict[str, dict[str, object]] = {"library": {}}
for _name, (_schema, _impl, _fake) in _SCHEMAS.items():
    _LIB.define(_name + _schema, tags=_tags(_name))
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ldbfx::{_name}", _fake, lib=_LIB)
    KERNELS["library"][_name] = getattr(torch.ops.ldbfx, _name).default
del _name, _schema, _impl, _fake

# ``native``: the same schemas, tags and fakes as ``ldbfx::<name>_native``, whose bodies are the
# C++ of ``native.cpp`` (loaded by ``ops.native`` on first use) for the kernels a step calls most;
# the rest run the ``library`` ones.
for _name in native.NAMES:
    _schema, _impl, _fake = _SCHEMAS[_name]
    _LIB.define(f"{_name}_native{_schema}", tags=_tags(_name))
    torch.library.register_fake(f"ldbfx::{_name}_native", _fake, lib=_LIB)
KERNELS["native"] = {name: getattr(torch.ops.ldbfx, f"{name}_native").default if name in native.NAMES else op
                     for name, op in KERNELS["library"].items()}
del _name, _schema, _impl, _fake


def kernel(name: str):
    """The op ``name`` of the compiled-path mechanism in use (read when the backward is traced)."""
    return KERNELS[path.mechanism()][name]
