"""The custom ops of the compiled path: they read the mask when the backward *runs*.

A dropped layer's kernel returns zeros without computing them and records the skip in the model's
state (what the optimizer hook then leaves untouched); a kept layer's computes its weight gradient
(for the kept rows only, with a row selection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..state import state_of
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


@torch.library.custom_op("ldbfx::linear_weight_grad", mutates_args=(), tags=_TAGS)
def _linear_weight_grad(
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


@_linear_weight_grad.register_fake
def _(grad2d, x2d, mask, index, with_bias):
    return grad2d.new_empty(grad2d.shape[1], x2d.shape[1]), grad2d.new_empty(
        grad2d.shape[1] if with_bias else 0
    )


@torch.library.custom_op("ldbfx::conv_backward", mutates_args=(), tags=_TAGS)
def _conv_backward(
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
    """The whole convolution backward in one call, as aten does it (computing dX and dW in two
    calls measured slower on CPU), with dW and db skipped when the layer is dropped. Outputs not
    wanted come back empty."""
    keep = not bool(mask[index])
    if not keep and (want_weight or with_bias):
        state_of(mask).record_skipped(index)
    rows = row_selection(mask, index) if keep else None
    gx, gw, gb = _aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if with_bias else None, stride, padding, dilation,
        False, [0] * len(stride), groups,
        [want_input, want_weight and keep and rows is None, with_bias and keep and rows is None],
    )
    if rows is not None and (want_weight or with_bias):
        gw, gb = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows, with_bias)
    if gx is None:  # unwanted outputs: distinct empty tensors (outputs may not alias)
        gx = grad.new_empty(0)
    elif gx.stride() != x.stride():  # match the fake's layout (empty_like(x))
        gx = torch.empty_like(x).copy_(gx)
    if not want_weight:
        gw = grad.new_empty(0)
    elif gw is None:
        gw = torch.zeros_like(weight)
    elif gw.stride() != weight.stride():
        gw = torch.empty_like(weight).copy_(gw)
    if not with_bias:
        gb = grad.new_empty(0)
    elif gb is None:
        gb = grad.new_zeros(weight.shape[0])
    return gx, gw, gb


@_conv_backward.register_fake
def _(grad, x, weight, mask, index, stride, padding, dilation, groups, want_input, want_weight, with_bias):
    return (torch.empty_like(x) if want_input else grad.new_empty(0),
            torch.empty_like(weight) if want_weight else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if with_bias else grad.new_empty(0))


@torch.library.custom_op("ldbfx::embedding_weight_grad", mutates_args=(), tags=_TAGS)
def _embedding_weight_grad(
    grad: Tensor, indices: Tensor, mask: Tensor, index: int, num_weights: int,
    padding_idx: int, scale_grad_by_freq: bool,
) -> Tensor:
    if bool(mask[index]):
        state_of(mask).record_skipped(index)
        return grad.new_zeros(num_weights, grad.shape[-1])
    return _aten.embedding_backward(
        grad, indices, num_weights, padding_idx, scale_grad_by_freq, False
    ).contiguous()


@_embedding_weight_grad.register_fake
def _(grad, indices, mask, index, num_weights, padding_idx, scale_grad_by_freq):
    return grad.new_empty(num_weights, grad.shape[-1])


@torch.library.custom_op("ldbfx::masked_grad", mutates_args=(), tags=_TAGS)
def _masked_grad(grad: Tensor, mask: Tensor, index: int) -> Tensor:
    if bool(mask[index]):
        state_of(mask).record_skipped(index)
        return torch.zeros_like(grad)
    return grad.clone()


@_masked_grad.register_fake
def _(grad, mask, index):
    return torch.empty_like(grad)
