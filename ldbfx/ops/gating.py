"""Parameters whose gradient is gated, not skipped: other uses of a parameter (norm affines,
additive embeddings, scales), BatchNorm's exact mirror, and leaf modules without a handler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import kernel
from .path import (
    _dense,
    _dropped_output,
    _is_dropped,
    _mask_read_at_backward,
    _needs_grad,
)


# --------------------------------------------------------------------------------------------
# Any other use of a parameter: gate its gradient. The consuming op still computes it (norms,
# additive embeddings, scales: cheap), but a dropped layer's parameter gets no gradient.
# --------------------------------------------------------------------------------------------
class _MaskedParam(torch.autograd.Function):
    """Compiled path of :func:`masked_param`: an identity whose gradient reads the mask."""

    @staticmethod
    def forward(ctx, param, mask, index):
        ctx.index = index
        ctx.save_for_backward(mask)
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return kernel("masked_grad")(grad, mask, ctx.index), None, None


def masked_param(param: Tensor, mask: Tensor, index: int) -> Tensor:
    """Returns ``param`` itself, but its gradient is dropped while layer ``index`` is dropped."""
    if not _needs_grad(param):
        return param
    if not _mask_read_at_backward():
        if not _is_dropped(mask, index):
            return param
        if _dense(mask):  # marked dirty there: a copy, never an alias (the parameter's version)
            return _dropped_output(param.detach().clone(), mask, param)
        return param.detach()
    return _MaskedParam.apply(param, mask, index)


def batch_norm(module: torch.nn.modules.batchnorm._BatchNorm, x: Tensor,
               weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``module(x)`` for a BatchNorm module, with ``weight``/``bias`` standing for its affine
    parameters. Mirrors ``_BatchNorm.forward`` line for line, so running statistics and
    ``num_batches_tracked`` evolve exactly as in the original module."""
    if module.momentum is None:
        factor = 0.0
    else:
        factor = module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    if module.training:
        bn_training = True
    else:
        bn_training = module.running_mean is None and module.running_var is None
    use_stats = not module.training or module.track_running_stats
    return F.batch_norm(
        x,
        module.running_mean if use_stats else None,
        module.running_var if use_stats else None,
        weight, bias, bn_training, factor, module.eps,
    )


def module_call(module: torch.nn.Module, params: dict[str, Tensor], args: tuple, kwargs: dict):
    """Calls a leaf module with some of its parameters replaced (``torch.func.functional_call``).

    The generic path for leaf modules ldbfx has no dedicated handler for: correct semantics, no
    saved compute.
    """
    if not torch.is_grad_enabled():
        return module(*args, **kwargs)
    return torch.func.functional_call(module, params, args, kwargs, strict=False)
