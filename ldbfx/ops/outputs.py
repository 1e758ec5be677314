"""The graph's outputs on a step whose drops leave nothing trainable to backpropagate to.

DropBP's reference skips the backward of such a step, and ldbfx's compiled and dense paths give
a loss that still backpropagates (fresh leaves, zero gradients). The eager path detaches dropped
branches' outputs and dropped layers' parameters, so when a step's drops cut every path to a
trainable parameter (every eligible branch dropped while the kept blocks train nothing: LoRA with
``layers_to_transform`` leaving out the first and last layers, or ``keep_first_blocks=0``), its
loss would need no gradient and ``loss.backward()`` would raise "element 0 of tensors does not
require grad". :func:`reachable`, on the train graph's outputs, then gives the dropped parts'
trainable parameters zero gradients through the outputs, as dense mode does: ``loss.backward()``
runs, an fp16 ``GradScaler`` finds gradients to check, and the optimizer hook turns the zeros back
into ``None`` (those layers are in the skip record), so the step updates nothing, as in the
reference. Any other step returns the outputs as they are (a check of their ``requires_grad``,
once per forward; nothing that grows with the number of layers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.state import LdbState
from .path import _WithZeroGrads

#: What a cut-off output hangs on when no dropped part holds a trainable parameter: a leaf that
#: needs a gradient and never gets one (the backward below returns none); never a parameter.
_ANCHOR = torch.zeros((), requires_grad=True)


class _Anchored(torch.autograd.Function):
    """``out``'s values, as an output that needs a gradient; its backward reaches nothing."""

    @staticmethod
    def forward(ctx, out, anchor):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def reachable(state: LdbState, *outputs):
    """The graph's outputs, tied to the dropped parameters when none of them needs a gradient.

    Args:
        state: the model's run-time state (what is dropped now).
        *outputs: the graph's output values, flattened.

    Returns:
        ``outputs`` themselves, or on a step that reaches nothing trainable, the same values as
        outputs whose backward gives the dropped parts' parameters zero gradients.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return outputs
    if not (state.dropped or state.dropped_branches):
        return outputs
    floating = [isinstance(o, Tensor) and o.is_floating_point() for o in outputs]
    if not any(floating) or any(o.requires_grad for o, f in zip(outputs, floating) if f):
        return outputs
    params = [p for i in state.dropped_branches for p in state.branch_params(i)]
    params += [p for i in state.dropped for p in state.params(i) if p.requires_grad]
    if params:
        return tuple(_WithZeroGrads.apply(o, *params) if f else o for o, f in zip(outputs, floating))
    return tuple(_Anchored.apply(o, _ANCHOR) if f else o for o, f in zip(outputs, floating))
