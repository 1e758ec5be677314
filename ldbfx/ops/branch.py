"""The gate on a residual branch's output: unchanged forward, a detached output when dropped.

* **Eager**: :func:`branch` reads ``state.branch_mask[index]`` (a CPU read) and returns
  ``out.detach()`` when the branch is dropped. That *is* the semantic reference: autograd then
  never reaches the branch, so no backward op inside it runs and its saved activations are freed
  with the branch's graph as soon as the forward moves on.
* **Compiled**: a compiled backward is one graph; nothing in it can skip a whole subgraph for a
  run-time mask (``torch.cond`` in training recomputes its branch's forward inside the backward:
  read from its source, see design.md). So, once branch drop is in use (``state.branch_cut``, which Dynamo
  guards on: one recompile), the gate is a graph break: the decision runs in Python between two
  compiled regions, each compiled once. A dropped branch's region then has no consumer in the
  autograd graph and its compiled backward never runs. The gate returns a fresh leaf
  (``detach().requires_grad_()``), not a plain detached tensor, so the next region sees the same
  ``requires_grad`` for every mask and is not recompiled. The decision is taken outside every
  compiled graph, so CUDA graphs (``mode="reduce-overhead"``) replay only whole regions and hold
  no drop decision (by construction; not yet run on a GPU).

In dense mode (DDP) a dropped branch's parameters get zero gradients, as dropped layers' do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.state import LdbState
from .path import _WithZeroGrads


def _detached(out: Tensor, state: LdbState, index: int, leaf: bool) -> Tensor:
    state.record_branch(index)
    cut = out.detach()
    if state.dense:
        params = state.branch_params(index)
        if params:
            return _WithZeroGrads.apply(cut, *params)
    return cut.requires_grad_() if leaf else cut


@torch._dynamo.disable
def _split() -> None:
    """Nothing, outside the compiled graph: Dynamo ends a region here (a graph break)."""


def branch_start(state: LdbState) -> None:
    """Placed before a branch's first node: under ``torch.compile`` with branch drop in use, the
    branch gets a compiled region of its own, whose backward belongs to the branch alone."""
    if torch.compiler.is_compiling() and state.branch_cut and torch.is_grad_enabled():
        _split()


@torch._dynamo.disable
def _compiled_gate(out: Tensor, state: LdbState, index: int) -> Tensor:
    # Runs eagerly between two compiled regions (a graph break).
    if not bool(state.branch_mask[index]):
        return out
    return _detached(out, state, index, leaf=True)


def branch(out: Tensor, state: LdbState, index: int) -> Tensor:
    """Returns ``out`` itself, or ``out`` detached while branch ``index`` is dropped."""
    if not (torch.is_grad_enabled() and out.requires_grad):
        return out
    if torch.compiler.is_compiling():
        return _compiled_gate(out, state, index) if state.branch_cut else out
    if not bool(state.branch_mask[index]):
        return out
    return _detached(out, state, index, leaf=False)
