"""The kernels (torch.library ops) of the compiled path: they read the mask when the backward *runs*.

A dropped layer's kernel returns zeros without computing them and records the skip in the model's
state (what the optimizer hook then leaves untouched); a kept layer's computes its weight gradient
(for the kept rows only, with a row selection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..state import state_of
from . import path
from .path import _aten
from .rows import _conv_weight_grad_rows, _linear_weight_grad_rows, row_selection

# --------------------------------------------------------------------------------------------
# Opaque weight-gradient kernels for the compiled path. They read the mask at run time.
# ``flexible_layout`` and returning exactly the strides of the fake keep Inductor from inserting
# layout copies around them (the prototype in the core issue measured +27% on a channels_last
# CNN backward without them).
# --------------------------------------------------------------------------------------------
#
# ``cudagraph_unsafe``: each of these decides on the host, from the CPU mask, what to compute. A
# CUDA graph recorded around one (``torch.compile(mode="reduce-overhead")``) would replay the
# branch taken while recording, and gradients would be silently stale when the mask changes. The
# tag makes Inductor keep them out of CUDA graphs (a partition boundary, or no CUDA graph for that
# region). It exists from torch 2.9; older versions get only the first tag.
_TAGS = (torch.Tag.flexible_layout,) + tuple(
    tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _linear_weight_grad_impl(
    grad2d: Tensor, x2d: Tensor, mask: Tensor, index: int, with_bias: bool
) -> tuple[Tensor, Tensor]:
    out_features = grad2d.shape[1] if with_bias else 0
    if bool(mask[index]):
        state_of(mask).record_skipped(index)
        return grad2d.new_zeros(grad2d.shape[1], x2d.shape[1]), grad2d.new_zeros(out_features)
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
) -> tuple[Tensor, Tensor]:
    """A convolution's dW and db, not computed when the layer is dropped; outputs not wanted come
    back empty. dX is an ordinary ``convolution_backward`` in the graph (see ``ops.convs``)."""
    return _conv_backward_impl(grad, x, weight, mask, index, stride, padding, dilation, groups,
                               False, want_weight, with_bias)[1:]


def _conv_weight_grad_fake(grad, x, weight, mask, index, stride, padding, dilation, groups, want_weight, with_bias):
    return _conv_backward_fake(grad, x, weight, mask, index, stride, padding, dilation, groups,
                               False, want_weight, with_bias)[1:]


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
) -> tuple[Tensor, Tensor, Tensor]:
    """A convolution's dX, dW and db in one ``convolution_backward`` call (the CPU path); a
    dropped layer's dW and db are zeros, not computed. Outputs not wanted come back empty.

    oneDNN computes dX and dW faster in one call than in two (measured on ResNet-50's shapes,
    channels_last: two calls cost 6-14% more; docs/design.md). An opaque op's inputs get no
    layout constraint from Inductor, so the incoming gradient may arrive contiguous while the
    saved input is channels_last; mixed layouts make oneDNN reorder, so the gradient is brought to
    the input's layout first (one copy of an activation). Without dX (``conv_weight_grad``, the
    split path) the gradient comes from the graph's own dX call, already in Inductor's layout.
    """
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if want_input and channels_last is not None and not x.is_contiguous() \
            and x.is_contiguous(memory_format=channels_last) and not grad.is_contiguous(memory_format=channels_last):
        grad = grad.contiguous(memory_format=channels_last)
    dropped = bool(mask[index])
    rows = None if dropped else row_selection(mask, index)
    if dropped:
        state_of(mask).record_skipped(index)
    fused_weight = want_weight and not dropped and rows is None
    fused_bias = with_bias and not dropped and rows is None
    if want_input or fused_weight or fused_bias:
        gx, gw, gb = _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if fused_bias else None, stride, padding, dilation, False,
            [0] * len(stride), groups, [want_input, fused_weight, fused_bias])
    if not want_input:
        gx = grad.new_empty(0)
    elif gx.stride() != x.stride():  # match the fake's layout (empty_like(x))
        gx = torch.empty_like(x).copy_(gx)
    if dropped:
        gw = torch.zeros_like(weight) if want_weight else grad.new_empty(0)
        gb = grad.new_zeros(weight.shape[0]) if with_bias else grad.new_empty(0)
        return gx, gw, gb
    if rows is not None:
        gw, gb = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows, with_bias)
    if not want_weight:
        gw = grad.new_empty(0)  # distinct empty tensors: outputs may not alias
    elif gw.stride() != weight.stride():  # match the fake's layout (empty_like(weight))
        gw = torch.empty_like(weight).copy_(gw)
    return gx, gw, gb if with_bias else grad.new_empty(0)


def _conv_backward_fake(grad, x, weight, mask, index, stride, padding, dilation, groups, want_input,
                        want_weight, with_bias):
    return (torch.empty_like(x) if want_input else grad.new_empty(0),
            torch.empty_like(weight) if want_weight else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if with_bias else grad.new_empty(0))


def _embedding_weight_grad_impl(
    grad: Tensor, indices: Tensor, mask: Tensor, index: int, num_weights: int,
    padding_idx: int, scale_grad_by_freq: bool,
) -> Tensor:
    if bool(mask[index]):
        state_of(mask).record_skipped(index)
        return grad.new_zeros(num_weights, grad.shape[-1])
    return _aten.embedding_backward(
        grad, indices, num_weights, padding_idx, scale_grad_by_freq, False
    ).contiguous()


def _embedding_weight_grad_fake(grad, indices, mask, index, num_weights, padding_idx, scale_grad_by_freq):
    return grad.new_empty(num_weights, grad.shape[-1])


def _masked_grad_impl(grad: Tensor, mask: Tensor, index: int) -> Tensor:
    if bool(mask[index]):
        state_of(mask).record_skipped(index)
        return torch.zeros_like(grad)
    return grad.clone()


def _masked_grad_fake(grad, mask, index):
    return torch.empty_like(grad)


# --------------------------------------------------------------------------------------------
# Registration. Two mechanisms run the same Python bodies (docs/design.md compares them):
#
# * ``library`` (the default): ``torch.library.Library.define`` + ``impl`` + ``register_fake``.
#   The dispatcher calls the body directly: about 6 us per call.
# * ``custom_op``: ``@torch.library.custom_op``, the documented high-level API. Its Python wrapper
#   (schema checks, autograd registration) costs about 17 us per call.
#
# The compiled backward calls one of these per layer and step, so on a GPU, where a layer's
# kernels take tens of microseconds, the difference is visible.
# --------------------------------------------------------------------------------------------
_SCHEMAS = {
    "linear_weight_grad": ("(Tensor grad2d, Tensor x2d, Tensor mask, int index, bool with_bias) -> (Tensor, Tensor)",
                           _linear_weight_grad_impl, _linear_weight_grad_fake),
    "conv_weight_grad": (("(Tensor grad, Tensor x, Tensor weight, Tensor mask, int index, int[] stride, "
                          "int[] padding, int[] dilation, int groups, bool want_weight, bool with_bias) "
                          "-> (Tensor, Tensor)"), _conv_weight_grad_impl, _conv_weight_grad_fake),
    "conv_backward": (("(Tensor grad, Tensor x, Tensor weight, Tensor mask, int index, int[] stride, "
                       "int[] padding, int[] dilation, int groups, bool want_input, bool want_weight, "
                       "bool with_bias) -> (Tensor, Tensor, Tensor)"), _conv_backward_impl, _conv_backward_fake),
    "embedding_weight_grad": (("(Tensor grad, Tensor indices, Tensor mask, int index, int num_weights, "
                               "int padding_idx, bool scale_grad_by_freq) -> Tensor"),
                              _embedding_weight_grad_impl, _embedding_weight_grad_fake),
    "masked_grad": ("(Tensor grad, Tensor mask, int index) -> Tensor", _masked_grad_impl, _masked_grad_fake),
}

_LIB = torch.library.Library("ldbfx", "FRAGMENT")
#: mechanism -> kernel name -> the op the compiled backward calls.
KERNELS: dict[str, dict[str, object]] = {"library": {}, "custom_op": {}}
for _name, (_schema, _impl, _fake) in _SCHEMAS.items():
    _LIB.define(_name + _schema, tags=_TAGS)
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ldbfx::{_name}", _fake, lib=_LIB)
    KERNELS["library"][_name] = getattr(torch.ops.ldbfx, _name).default
    _op = torch.library.custom_op(f"ldbfx::{_name}_custom_op", _impl, mutates_args=(), schema=_schema,
                                  tags=_TAGS)
    _op.register_fake(_fake)
    KERNELS["custom_op"][_name] = _op
del _name, _schema, _impl, _fake, _op


def kernel(name: str):
    """The op ``name`` of the compiled-path mechanism in use (read when the backward is traced)."""
    return KERNELS[path.mechanism()][name]
