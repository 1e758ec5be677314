"""Graph surgery for branch drop: each eligible branch's nodes grouped just before its residual
add, and a gate on the add's branch operand (the branches themselves are found by
:mod:`ldbfx.analysis.branches`).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

if TYPE_CHECKING:
    from ..analysis.branches import BranchPlan

__all__ = ["insert_gates"]

_aten = torch.ops.aten


def _is_random(node: fx.Node, root: torch.nn.Module) -> bool:
    """Whether ``node`` draws random numbers (moving it would change what it draws)."""
    if node.op == "call_module":
        try:
            module = root.get_submodule(node.target)
        except AttributeError:
            return False
        return isinstance(module, torch.nn.modules.dropout._DropoutNd) or "Drop" in type(module).__name__
    name = getattr(node.target, "__name__", str(node.target))
    return any(word in name for word in ("dropout", "bernoulli", "rand", "normal", "drop_path", "uniform",
                                         "multinomial", "exponential", "cauchy", "geometric"))


_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten", "unflatten",
                 "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "select", "t", "chunk", "split",
                 "unbind", "as_strided", "contiguous", "detach", "__getitem__", "movedim", "diagonal"}


def _is_inplace(node: fx.Node, root: torch.nn.Module) -> bool:
    if node.op == "call_module":
        try:
            return getattr(root.get_submodule(node.target), "inplace", False) is True
        except AttributeError:
            return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):  # torch.export: aten.add_.Tensor, aten.copy_
            return target._schema.is_mutable
        name = getattr(target, "__name__", "")
        return node.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__")) \
            or target is operator.setitem or (name.startswith("i") and getattr(operator, name, None) is target)
    return False


def _may_alias(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with an input (a view)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return any(a.alias_info is not None for a in target._schema.returns)
        return getattr(target, "__name__", "") in _VIEW_METHODS or target in (torch.flatten, torch.reshape)
    return node.op != "call_module"


def _group_branch(graph: fx.Graph, plan: BranchPlan, root: torch.nn.Module,
                  by_name: dict[str, fx.Node]) -> list[fx.Node] | None:
    """Reorders the nodes between the block input and the add so the branch's own nodes are
    contiguous: first everything that does not depend on the branch (the skip path, parameter
    reads), then the branch, then what else uses the branch. The same ops run on the same values;
    a compiled region then holds the branch alone (see :mod:`ldbfx.ops.branch`). Returns the
    branch's nodes in their new order, or None when reordering could change a value: a random op
    moved across another, an in-place op moved across a reader of what it overwrites (the gate
    still works; the compiled region then just holds more than the branch)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    add, begin = by_name[plan.add], by_name[plan.start]
    operand = add.args[plan.operand]
    window = nodes[position[begin] + 1: position[add]]
    region = {by_name[name] for name in plan.region}
    depends: set[fx.Node] = set()  # on the branch, through any edge
    for node in window:
        if node in region or any(arg in depends for arg in node.all_input_nodes):
            depends.add(node)
    feeds = {operand}  # ancestors of the branch output inside the window, through any edge
    for node in reversed(window):
        if node in feeds:
            feeds.update(node.all_input_nodes)
    # Inside: the branch, and what only the branch reads (its parameters, their gates), so a
    # dropped branch's region leaves every one of its parameters without a gradient.
    inside_set: set[fx.Node] = set()
    for node in reversed(window):
        if node in feeds and (node in depends or (node.users and all(u in inside_set for u in node.users))):
            inside_set.add(node)
    for node in window:  # an in-place op on the branch's own tensor stays with it (drop path)
        if _is_inplace(node, root) and node.args and node.args[0] in inside_set:
            inside_set.add(node)
    before = [n for n in window if n not in depends and n not in inside_set]
    inside = [n for n in window if n in inside_set]
    after = [n for n in window if n in depends and n not in inside_set]
    if not inside:
        return None
    order = before + inside + after
    if order == window:
        return inside
    group = {**{n: 0 for n in before}, **{n: 1 for n in inside}, **{n: 2 for n in after}}
    random_ops = [n for n in window if _is_random(n, root)]
    if random_ops != [n for n in order if n in set(random_ops)]:
        return None  # random ops drawn in another order would draw other numbers
    placed = set()  # the new order must stay topological (an in-place op pulled into the branch)
    for node in order:
        if any(arg in group and arg not in placed for arg in node.all_input_nodes):
            return None
        placed.add(node)
    # An in-place op is safe to reorder around only when what it overwrites is a fresh
    # (non-view) result of its own group that no other group reads, directly or through a view.
    for node in window:
        if not _is_inplace(node, root):
            continue
        target = node.args[0] if node.args else None
        if not (isinstance(target, fx.Node) and group.get(target) == group[node] and not _may_alias(target)):
            return None
        readers, seen = list(target.users), set()
        while readers:
            user = readers.pop()
            if user in seen:
                continue
            seen.add(user)
            if group.get(user) != group[node]:
                return None
            if _may_alias(user):
                readers.extend(user.users)
    anchor = begin
    for node in order:
        anchor.append(node)
        anchor = node
    return inside


def insert_gates(graph: fx.Graph, plans: list[BranchPlan], indices: list[int | None],
                 root: torch.nn.Module) -> None:
    """Puts ``ops.branch(x, state, index)`` on the branch operand of each add (``indices[k]``
    None: that add gets no gate), and ``ops.branch_start(state, index)`` before the branch's
    nodes. ``index`` is given to ``branch_start`` only where the branch's nodes run contiguously up
    to the gated operand and nothing outside reads them: only there may a dropped branch run
    without autograd (nothing else would have backpropagated into it)."""
    from .. import ops
    from ..runtime.module import STATE_ATTR

    state = None
    by_name = {node.name: node for node in graph.nodes}
    # Outer branches first: an inner branch's nodes then stay contiguous inside the outer one and
    # its own grouping (and split point) is made last, where it stays.
    for plan, index in reversed(list(zip(plans, indices))):
        if index is None:
            continue
        if state is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                state = graph.get_attr(STATE_ATTR)
        inside = _group_branch(graph, plan, root, by_name)
        gate = _gate(graph, plan, root, by_name, state, index)
        if inside is not None:
            own = set(inside)
            alone = gate is not None and inside[-1] is gate.args[0] and all(
                user in own or user is gate or _is_check(user) for node in inside for user in node.users)
            with graph.inserting_before(inside[0]):
                graph.call_function(ops.branch_start, (state, index if alone else None))
    graph.lint()


def _is_check(node: fx.Node) -> bool:
    """torch.export's metadata assertions (``aten._assert_tensor_metadata``): they read a value and
    give nothing, so running them without autograd changes nothing."""
    return not node.users and getattr(node.target, "__name__", "").startswith("_assert")


def _gate(graph: fx.Graph, plan: BranchPlan, root: torch.nn.Module, by_name: dict[str, fx.Node],
          state: fx.Node, index: int) -> fx.Node | None:
    """The gate on the add's branch operand, or None where the add cannot take one."""
    from .. import ops

    add = by_name[plan.add]
    if _is_inplace(add, root):
        # ``out += identity``: the same value out of place, as long as nothing else reads
        # the overwritten tensor (a compiled gate's fresh leaf cannot be written in place).
        if len(add.args[0].users) != 1:
            return None
        add.target = {"add_": "add", operator.iadd: operator.add, _aten.add_.Tensor: _aten.add.Tensor}.get(
            add.target, add.target)
        if _is_inplace(add, root):
            return None
    operand = add.args[plan.operand]
    with graph.inserting_after(operand):
        gate = graph.call_function(ops.branch, (operand, state, index))
    gate.meta.update({k: v for k, v in operand.meta.items() if k in ("val", "tensor_meta")})
    gate.meta["ldbfx_branch"] = index
    args = list(add.args)
    args[plan.operand] = gate
    add.args = tuple(args)
    return gate
