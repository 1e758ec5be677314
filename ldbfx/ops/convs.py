"""Convolutions (1d/2d/3d, grouped, depthwise) with a skippable weight gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import kernel
from .path import (
    _CONV,
    _aten,
    _autocast,
    _detach,
    _dropped_output,
    _is_dropped,
    _mask_read_at_backward,
    _needs_grad,
)
from .rows import _ConvRows, row_selection


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
        # Decided when traced, by device (docs/design.md, "The compiled path: mechanisms compared"):
        # * CPU: one kernel call computes dX, and dW/db unless dropped. oneDNN computes both in one
        #   call faster than in two (ResNet-50: the two-call graph cost +5-13% with nothing
        #   dropped, the one-call graph +2%). Inductor hands the kernel its inputs in the layouts
        #   it gives aten's convolution_backward (the kernels' layout tag, see ``ops.kernels``).
        # * Elsewhere (CUDA: cuDNN runs dX and dW as separate kernels anyway): dX is an ordinary
        #   aten call in the graph, so Inductor lays it out as in the untransformed model, and only
        #   dW/db go through the mask-reading kernel. So does a double backward (grad enabled here
        #   means create_graph=True): the kernel has no derivative, aten's dX has one.
        # dW in the parameter's layout when traced (contiguous, usually) rather than the saved
        # weight's, which Inductor may have made channels_last: see ``ops.kernels``.
        contiguous_weight_grad = weight.is_contiguous()
        gx = gw = gb = None
        if x.device.type == "cpu" and want_x and (want_weight or want_bias) and not torch.is_grad_enabled():
            gx, gw, gb = kernel("conv_backward")(grad, x, weight, mask, ctx.index, stride, padding, dilation,
                                                 groups, True, want_weight, want_bias, contiguous_weight_grad)
            return (gx, gw if want_weight else None, gb if want_bias else None,
                    None, None, None, None, None, None)
        if want_x:
            gx = _aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                            [0] * len(stride), groups, [True, False, False])[0]
        if want_weight or want_bias:
            gw, gb = kernel("conv_weight_grad")(grad, x, weight, mask, ctx.index, stride, padding, dilation,
                                                groups, want_weight, want_bias, contiguous_weight_grad)
        return (gx if want_x else None, gw if want_weight else None, gb if want_bias else None,
                None, None, None, None, None, None)


def _dropped_conv(x, weight, bias, stride, padding, dilation, groups):
    """A dropped convolution, eager: the plain op on the detached weight and bias.

    Exactly what freezing them does: autograd calls ``convolution_backward`` with
    ``output_mask=[x needs grad, False, False]`` on the same saved input and weight, so the values,
    FLOPs, kernels and saved tensors are those of ``requires_grad=False`` on any machine. (The input
    is saved, as for a frozen weight; in CNNs it is saved anyway by the op that produced it.)

    Two cleverer versions that did not keep the input alive were measured and dropped
    (benchmarks/conv_input_grad.py, eager ResNet steps, every other eligible layer dropped, CPU;
    figures in docs/benchmarks.md): dX as a transposed convolution (equal to this only on some
    CPUs' kernels, so not exact by construction; within noise of freezing in time) and
    ``convolution_backward`` on an uninitialised stand-in input (exact, but the slowest in every
    run, +12% to +19% over freezing: fresh memory each step). This one is within noise of freezing.
    """
    return _CONV[weight.dim() - 2](x, weight.detach(), _detach(bias), stride, padding, dilation, groups)


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
        return _dropped_output(_dropped_conv(x, weight, bias, stride, padding, dilation, groups),
                               mask, weight, bias)
    unbatched = x.dim() == n + 1
    if unbatched:  # what F.conv*d does internally for an unbatched input
        x = x.unsqueeze(0)
    x, weight, bias = _autocast(x, weight, bias)
    out = _Conv.apply(x, weight, bias, stride, padding, dilation, groups, mask, index)
    return out.squeeze(0) if unbatched else out
