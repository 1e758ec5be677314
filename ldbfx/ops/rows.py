"""Row selections (ChannelDropBack): a kept layer computes its weight gradient for some output
rows (dim 0) or input columns (dim 1) only, with FLOPs in proportion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.state import RowSelection, state_of
from .path import _CONV, _aten

# --------------------------------------------------------------------------------------------
# Row selections (ChannelDropBack): a kept layer may compute its weight gradient for some output
# rows (dim 0) or input columns (dim 1) only. :func:`ldbfx.mask.set_frozen_rows` stores them in the
# model's state, which every op reaches from the mask it receives: no graph change, nothing to
# retrace, and a process that never froze rows pays one flag test per op.
# --------------------------------------------------------------------------------------------
def row_selection(mask: Tensor, index: int) -> RowSelection | None:
    """The selection of layer ``index`` of the model owning ``mask``, or None (all rows train)."""
    if not _rows_in_use:  # no model of this process ever froze rows: no lookup
        return None
    return state_of(mask).row_selection(index)


def rows_in_use() -> None:
    """Called when a model first freezes rows: from then on the ops look selections up."""
    global _rows_in_use
    _rows_in_use = True


_rows_in_use = False


def _linear_weight_grad_rows(grad2d: Tensor, x2d: Tensor, rows: RowSelection, with_bias: bool):
    """``dW`` (and ``db``) of ``y = x @ W.T + b`` for the kept slices only: FLOPs in proportion."""
    grad_w = grad2d.new_zeros(grad2d.shape[1], x2d.shape[1])
    if rows.dim == 0:
        g = grad2d.index_select(1, rows.kept)
        grad_w.index_copy_(0, rows.kept, g.t().mm(x2d))
        grad_b = grad2d.new_zeros(grad2d.shape[1]).index_copy_(0, rows.kept, g.sum(0)) if with_bias else None
    else:
        grad_w.index_copy_(1, rows.kept, grad2d.t().mm(x2d.index_select(1, rows.kept)))
        grad_b = grad2d.sum(0) if with_bias else None
    return grad_w, grad_b


def _conv_bias_grad(grad: Tensor) -> Tensor:
    return grad.sum([d for d in range(grad.dim()) if d != 1])


def _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups, rows: RowSelection,
                           with_bias: bool):
    """``dW`` (and ``db``) of a convolution for the kept output (dim 0) or input (dim 1) channels.

    Grouped convolutions mix channels across groups, so slicing would change the op: they compute
    the whole ``dW`` and zero the frozen slices (right values, no saving).
    """
    if groups != 1:
        _, grad_w, grad_b = _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if with_bias else None, stride, padding, dilation,
            False, [0] * len(stride), groups, [False, True, with_bias])
        grad_w.index_fill_(rows.dim, rows.frozen, 0)
        if with_bias and rows.dim == 0:
            grad_b.index_fill_(0, rows.frozen, 0)
        return grad_w, grad_b
    if not rows.kept.numel():  # every slice frozen (aten rejects a convolution with 0 channels)
        grad_b = _conv_bias_grad(grad) if rows.dim == 1 else grad.new_zeros(weight.shape[0])
        return torch.zeros_like(weight), grad_b if with_bias else None
    if rows.dim == 0:
        grad, w = grad.index_select(1, rows.kept), weight.index_select(0, rows.kept)
    else:
        x, w = x.index_select(1, rows.kept), weight.index_select(1, rows.kept)
    _, part_w, part_b = _aten.convolution_backward(
        grad, x, w, [w.shape[0]] if with_bias else None, stride, padding, dilation,
        False, [0] * len(stride), 1, [False, True, with_bias and rows.dim == 0])
    grad_w = torch.zeros_like(weight).index_copy_(rows.dim, rows.kept, part_w)
    grad_b = None
    if with_bias:
        if rows.dim == 0:
            grad_b = grad.new_zeros(weight.shape[0]).index_copy_(0, rows.kept, part_b)
        else:
            grad_b = _conv_bias_grad(grad)
    return grad_w, grad_b


class _LinearRows(torch.autograd.Function):
    """Eager path of a linear layer with a row selection: full ``dX``, ``dW`` for kept slices."""

    @staticmethod
    def forward(x, weight, bias, rows):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: torch.func transforms work
        x, weight, bias, rows = inputs
        ctx.rows, ctx.x_shape, ctx.with_bias = rows, x.shape, bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2d.mm(weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = _linear_weight_grad_rows(grad2d, x.reshape(-1, x.shape[-1]), ctx.rows, ctx.with_bias)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None


class _ConvRows(torch.autograd.Function):
    """Eager path of a convolution with a row selection: full ``dX``, ``dW`` for kept slices."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, rows):
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups, rows = inputs
        ctx.conv, ctx.rows, ctx.with_bias = (stride, padding, dilation, groups), rows, bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                [0] * len(stride), groups, [True, False, False])[0]
        grad_w, grad_b = _conv_weight_grad_rows(grad, x, weight, stride, padding, dilation, groups,
                                                ctx.rows, ctx.with_bias)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, None, None, None, None, None
