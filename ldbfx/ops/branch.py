"""The gate on a residual branch's output: unchanged forward, a detached output when dropped.

* **Eager**: :func:`branch` reads ``state.branch_mask[index]`` (a CPU read) and returns
  ``out.detach()`` when the branch is dropped. That *is* the semantic reference: autograd then
  never reaches the branch, so no backward op inside it runs. Where the branch's nodes run
  contiguously and only the gate reads them (the rewrite checks), :func:`branch_start` goes
  further: a branch dropped when it begins runs without autograd, so it records no graph and
  saves no activation at all, and a checkpoint's recompute, which saves nothing for it either,
  stops before a dropped last branch. The gate turns autograd back on (the grad mode is restored
  by the graph's forward if an op inside raises).
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


def branch_start(state: LdbState, index: int | None = None) -> None:
    """Placed before a branch's first node. Under ``torch.compile`` with branch drop in use, the
    branch gets a compiled region of its own, whose backward belongs to the branch alone. Eager,
    with ``index`` (the branch runs alone up to its gate), a dropped branch runs without autograd
    (``state.branch_off``, which its gate, :func:`branch`, clears, turning autograd back on).
    A state, not a value passed along the graph: a graph split between the two (Learn&Drop's cut)
    must see no new value crossing it."""
    if torch.compiler.is_compiling():
        if state.branch_cut and torch.is_grad_enabled():
            _split()
        return
    if index is not None and torch.is_grad_enabled() and bool(state.branch_mask[index]):
        torch._C._set_grad_enabled(False)
        state.branch_off = index


@torch._dynamo.disable
def _compiled_gate(out: Tensor, state: LdbState, index: int) -> Tensor:
    # Runs eagerly between two compiled regions (a graph break).
    if not bool(state.branch_mask[index]):
        return out
    return _detached(out, state, index, leaf=True)


def branch(out: Tensor, state: LdbState, index: int) -> Tensor:
    """Returns ``out`` itself, or ``out`` detached while branch ``index`` is dropped."""
    if state.branch_off == index:  # :func:`branch_start` ran the branch without autograd
        state.branch_off = None
        torch._C._set_grad_enabled(True)
        return _detached(out, state, index, leaf=False)
    if not (torch.is_grad_enabled() and out.requires_grad):
        return out
    if torch.compiler.is_compiling():
        return _compiled_gate(out, state, index) if state.branch_cut else out
    if not bool(state.branch_mask[index]):
        return out
    return _detached(out, state, index, leaf=False)
