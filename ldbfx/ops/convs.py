"""Convolutions (1d/2d/3d, grouped, depthwise) with a skippable weight gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import _conv_backward
from .path import (_CONV, _aten, _autocast, _detach, _dropped_output, _is_dropped, _mask_read_at_backward,
                   _needs_grad)
from .rows import _ConvRows, row_selection

# --------------------------------------------------------------------------------------------
# Convolutions (1d/2d/3d, grouped, depthwise).
# --------------------------------------------------------------------------------------------
class _Conv(torch.autograd.Function):
    """Compiled path of :func:`conv`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, mask, index):
        out = _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.index, ctx.with_bias = index, bias is not None
        ctx.save_for_backward(x, weight, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = ctx.with_bias and ctx.needs_input_grad[2]
        if not (want_x or want_weight or want_bias):
            return None, None, None, None, None, None, None, None, None
        gx, gw, gb = _conv_backward(grad, x, weight, mask, ctx.index, stride, padding, dilation,
                                    groups, want_x, want_weight, want_bias)
        return (gx if want_x else None, gw if want_weight else None, gb if want_bias else None,
                None, None, None, None, None, None)


class _ConvInputGradOnly(torch.autograd.Function):
    """Eager path of a dropped convolution whose input needs a gradient.

    Autograd's own convolution node saves its input even when the weight is frozen. This one keeps
    only the weight and the input's geometry (shape, strides, dtype, device). Its backward makes the
    very call autograd makes for a frozen weight, ``convolution_backward(..., output_mask=[True,
    False, False])``, with an uninitialised stand-in for the input: dX reads the input's geometry
    (which also picks the kernel), never its values. So the values are bitwise those of freezing the
    same parameters on any CPU or GPU (same kernel, same arguments), and so are the FLOPs. The
    stand-in lives only during this backward call. (A stride-0 expanded placeholder made CPU kernels
    15-20% slower: they materialise it; an ``empty_strided`` one is already in the input's layout.)
    """

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: torch.func transforms work
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_geometry = (x.shape, x.stride(), x.dtype, x.device)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.save_for_backward(weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        shape, strides, dtype, device = ctx.x_geometry
        # requires_grad as autograd's saved input has it: backend selection may look at it.
        stand_in = torch.empty_strided(shape, strides, dtype=dtype, device=device, requires_grad=True)
        grad_x = _aten.convolution_backward(
            grad, stand_in, weight, ctx.bias_sizes, stride, padding, dilation, False, [0] * len(stride),
            groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None, None


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    mask: Tensor,
    index: int,
) -> Tensor:
    """``F.conv{1,2,3}d`` (numeric padding) with weight/bias gradients skipped when dropped."""
    n = weight.dim() - 2
    if not _needs_grad(x, weight, bias):
        return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
    if not _mask_read_at_backward():
        if not _is_dropped(mask, index):
            rows = row_selection(mask, index)
            if rows is None or not weight.requires_grad:
                return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
            unbatched = x.dim() == n + 1
            x, weight, bias = _autocast(x.unsqueeze(0) if unbatched else x, weight, bias)
            out = _ConvRows.apply(x, weight, bias, stride, padding, dilation, groups, rows)
            return out.squeeze(0) if unbatched else out
        params = (weight, bias)
        weight, bias = weight.detach(), _detach(bias)
        if not x.requires_grad or x.dim() == n + 1:
            out = _CONV[n](x, weight, bias, stride, padding, dilation, groups)
        else:
            # Autocast would cast inside F.conv*d; cast here so dX comes back in x's own dtype.
            x_cast, weight, bias = _autocast(x, weight, bias)
            out = _ConvInputGradOnly.apply(x_cast, weight, bias, stride, padding, dilation, groups)
        return _dropped_output(out, mask, *params)
    unbatched = x.dim() == n + 1
    if unbatched:  # what F.conv*d does internally for an unbatched input
        x = x.unsqueeze(0)
    x, weight, bias = _autocast(x, weight, bias)
    out = _Conv.apply(x, weight, bias, stride, padding, dilation, groups, mask, index)
    return out.squeeze(0) if unbatched else out
