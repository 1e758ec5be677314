"""Embeddings: the weight gradient is the op's whole backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import kernel
from .path import _dropped_output, _is_dropped, _mask_read_at_backward, _needs_grad


# --------------------------------------------------------------------------------------------
# Embedding: the weight gradient is the op's whole backward.
# --------------------------------------------------------------------------------------------
class _Embedding(torch.autograd.Function):
    """Compiled path of :func:`embedding`."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx, scale_grad_by_freq, mask, index):
        out = F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
        # F.embedding's own normalisation: None -> -1, negative -> counted from the end.
        if padding_idx is None:
            padding_idx = -1
        elif padding_idx < 0:
            padding_idx += weight.shape[0]
        ctx.num_weights, ctx.index = weight.shape[0], index
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        ctx.save_for_backward(indices, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        indices, mask = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = kernel("embedding_weight_grad")(grad, indices, mask, ctx.index, ctx.num_weights,
                                            ctx.padding_idx, ctx.scale_grad_by_freq)
        return None, grad_w, None, None, None, None


def embedding(
    indices: Tensor, weight: Tensor, padding_idx: int | None, scale_grad_by_freq: bool,
    mask: Tensor, index: int,
) -> Tensor:
    """``F.embedding`` (no ``max_norm``, dense gradient) whose weight gradient is maskable."""
    if not _needs_grad(weight):
        return F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
    if not _mask_read_at_backward():
        if _is_dropped(mask, index):
            out = F.embedding(indices, weight.detach(), padding_idx, None, 2.0, scale_grad_by_freq, False)
            return _dropped_output(out, mask, weight)
        return F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)
    return _Embedding.apply(indices, weight, padding_idx, scale_grad_by_freq, mask, index)
