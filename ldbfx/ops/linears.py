"""``F.linear`` and ``x @ W`` with a parameter: the weight gradient is skippable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import kernel
from .path import (
    _autocast,
    _detach,
    _dropped_output,
    _is_dropped,
    _mask_read_at_backward,
    _needs_grad,
)
from .rows import _LinearRows, row_selection


# --------------------------------------------------------------------------------------------
# Linear family: F.linear and matmul with a parameter as the right operand.
# --------------------------------------------------------------------------------------------
class _Linear(torch.autograd.Function):
    """Compiled path. ``y = x @ W.T + b`` (``transposed=False``) or ``y = b + x @ W``
    (``transposed=True``: ``matmul``, or ``addmm`` with a bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, index, transposed):
        if transposed:
            out = torch.matmul(x, weight) if bias is None else torch.addmm(bias, x, weight)
        else:
            out = F.linear(x, weight, bias)
        ctx.index, ctx.transposed, ctx.x_shape = index, transposed, x.shape
        ctx.with_bias = bias is not None
        ctx.save_for_backward(x, weight, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.transposed else weight
            grad_x = grad2d.mm(w).view(ctx.x_shape)
        want_weight = ctx.needs_input_grad[1]
        want_bias = ctx.with_bias and ctx.needs_input_grad[2]
        if want_weight or want_bias:
            grad_w, grad_b = kernel("linear_weight_grad")(
                grad2d, x.reshape(-1, x.shape[-1]), mask, ctx.index, want_bias
            )
            grad_w = grad_w.t() if ctx.transposed else grad_w
        return (grad_x, grad_w if want_weight else None, grad_b if want_bias else None,
                None, None, None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, index: int) -> Tensor:
    """``F.linear`` whose weight and bias gradients are skipped while layer ``index`` is dropped."""
    if not _needs_grad(x, weight, bias):
        return F.linear(x, weight, bias)
    if not _mask_read_at_backward():
        if _is_dropped(mask, index):
            return _dropped_output(F.linear(x, weight.detach(), _detach(bias)), mask, weight, bias)
        if (rows := row_selection(mask, index)) is not None and weight.requires_grad:
            x, weight, bias = _autocast(x, weight, bias)
            return _LinearRows.apply(x, weight, bias, rows)
        return F.linear(x, weight, bias)
    x, weight, bias = _autocast(x, weight, bias)
    return _Linear.apply(x, weight, bias, mask, index, False)


def matmul(x: Tensor, weight: Tensor, mask: Tensor, index: int) -> Tensor:
    """``x @ weight`` for a 2-D parameter ``weight``, masked like :func:`linear`."""
    if not _needs_grad(x, weight) or weight.dim() != 2 or x.dim() < 2:
        return torch.matmul(x, weight)
    if not _mask_read_at_backward():
        if _is_dropped(mask, index):
            return _dropped_output(torch.matmul(x, weight.detach()), mask, weight)
        return torch.matmul(x, weight)
    x, weight = _autocast(x, weight)
    return _Linear.apply(x, weight, None, mask, index, True)


def addmm(bias: Tensor, x: Tensor, weight: Tensor, mask: Tensor, index: int) -> Tensor:
    """``torch.addmm(bias, x, weight)`` with parameters ``bias`` (1-D) and ``weight`` (2-D, in x
    out): Hugging Face's ``Conv1D`` (GPT-2) as torch.export records it; masked like :func:`linear`."""
    if not _needs_grad(x, weight, bias):
        return torch.addmm(bias, x, weight)
    if not _mask_read_at_backward():
        if _is_dropped(mask, index):
            return _dropped_output(torch.addmm(bias.detach(), x, weight.detach()), mask, weight, bias)
        return torch.addmm(bias, x, weight)
    x, weight, bias = _autocast(x, weight, bias)
    return _Linear.apply(x, weight, bias, mask, index, True)
