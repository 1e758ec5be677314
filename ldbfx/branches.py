"""Residual branches: found in the captured graph, droppable as a whole (DropBP without model edits).

A *branch* is the non-skip operand of a residual add: ``x + f(x)`` (``+``, ``+=``, ``torch.add``,
``aten.add``), also with a projection shortcut (``downsample(x) + f(x)``). Dropping a branch
behaves exactly as if its output were detached before the add: the forward is unchanged, the skip
still carries the gradient to everything before the block, and nothing inside the branch is
backpropagated (neither dX nor dW), so its parameters get no gradient and ``optimizer.step()``
leaves them and their state untouched, as for dropped layers.

**The rule that tells the skip from the branch.** For an add of ``a`` and ``b``, the *block
input* is their nearest common ancestor along activation edges (floating-point tensors; edges
that only carry a shape, a dtype, an integer mask or a parameter do not count). Each operand's
path is the part of the graph between the block input and that operand; the operand whose path
holds more layers is the branch, the other is the skip (the path back to the block's input with
fewest layers). An add is not a residual when the operands share no activation ancestor
(``x + pos_embed``; ``scores + attention_mask`` on the export front end, whose values say the
mask is an integer tensor) or when both paths hold the same number of
layers (``q * cos + rotate(q) * sin``: none; two parallel equal branches: ambiguous). Each
branch's *block* is the module whose ``forward`` performs the add (``layer1.0``, ``blocks.3``).

**Adapters are not branches.** Where both paths hold layers, the branch must also hold more
parameter elements than the skip. A projection shortcut passes (``downsample(x) + f(x)``: one
1x1 convolution against the block's convolutions); an adapter beside its base layer does not:
LoRA's ``base_layer(x) + lora_B(lora_A(x)) * scaling`` has more layers on the adapter's path (2
against 1) but far fewer parameters (``r * (d_in + d_out)`` against ``d_in * d_out``), and so
have DoRA's, VeRA's and AdaLoRA's. An add whose skip path is a single layer and which lies inside
another branch is no branch either, however heavy its other path (a LoRA of rank 128 on a
896-to-128 key projection outweighs it). Such an add is part of one layer, and its layers stay inside
the enclosing branch: a PEFT model has exactly its base model's branches (a decoder layer's
attention and MLP), under the base model's names with PEFT's prefix
(``base_model.model.model.layers.3.mlp``), and dropping one skips the backward of its frozen base
layers and of its adapters alike. The rules read only the graph (which layers and parameters
each path uses), not module names. DoRA without dropout adds to the base layer's output, which
is then the common ancestor: the adapter's layers read the layer's input, outside both paths, so
neither path holds a layer and the add is no branch by the first rule; with dropout, DoRA
recomputes the base output from the input and the add is told apart as LoRA's is.

**Adding what the rule misses.** ``ldbfx.transform(model, extra_branches=["blocks.2.fc1"])``
names a layer inside each branch the rule does not find (a tie) or finds the wrong way round (a
shortcut heavier than its branch). The first add in topological order that has the named layer
on one operand's path and not on the other's becomes a branch, that operand being the branch.

**Eligibility.** By default the branches of the first and the last block always train
(``keep_first_blocks=1``, ``keep_last_blocks=1``, the spirit of LayerDropBack's kept first and
last layers); ``branch_filter`` excludes more. A ResNet BasicBlock/Bottleneck has one branch, a
transformer block two (attention, MLP).

Example:
    >>> import torch, ldbfx
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         return x + self.fc(self.norm(x))
    >>> model = torch.nn.Sequential(*[Block() for _ in range(4)])
    >>> gm = ldbfx.transform(model)
    >>> [(b.name, b.layers, b.eligible) for b in ldbfx.branches(gm)][:2]
    [('0', ('0.norm', '0.fc'), False), ('1', ('1.norm', '1.fc'), True)]
    >>> ldbfx.set_dropped_branches(gm, ["1"])
    >>> gm(torch.randn(2, 8)).sum().backward()
    >>> model[1].fc.weight.grad is None, model[0].fc.weight.grad is None
    (True, False)
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import fx

from .errors import LdbfxError
from .records import Branch

if TYPE_CHECKING:
    from .layers import LayerPlan
    from .records import Layer
    from .module import LdbGraphModule

__all__ = ["Branch", "BranchNotFoundError", "branches", "set_dropped_branches", "dropped_branches"]

_aten = torch.ops.aten
_ADDS = {operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor}
_ADD_METHODS = {"add", "add_"}
# FX (symbolic trace, no tensor metadata): call results that are never activations.
_SHAPE_METHODS = {"size", "dim", "numel", "type", "get_device", "stride", "nelement"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


class BranchNotFoundError(LdbfxError, KeyError):
    """A branch name or index does not exist, or names a branch that may not be dropped."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class BranchPlan:
    """A residual add found in a graph, before its :class:`Branch` record exists (internal)."""

    add: str  # node names: the rewrite replaces layer nodes, keeping their names
    operand: int  # position of the branch in add.args
    start: str  # the block input
    region: tuple[str, ...]  # the branch's nodes (activation edges from the block input)
    block: str
    layers: tuple[int, ...]  # layer indices with a node inside the branch
    inner: tuple[int, ...]  # those whose gradient comes only through the branch output
    skip_layers: tuple[int, ...]


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------
def _is_add(node: fx.Node) -> bool:
    if not ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in _ADD_METHODS)):
        return False
    if len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return alpha == 1


def _is_activation(node: fx.Node) -> bool:
    """Whether ``node`` can carry a gradient to an earlier activation (see the module doc)."""
    if node.op in ("get_attr", "output"):
        return False
    if "val" in node.meta or "example_value" in node.meta:
        # torch.export: the fake value says what it is (split: a tuple; None for a node that
        # returns nothing, such as the _assert_tensor_metadata before a dtype cast)
        val = node.meta.get("val", node.meta.get("example_value"))
        values = val if isinstance(val, (tuple, list)) else (val,)
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values)
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
            and node.args[1] in _SHAPE_ATTRS:
        return False
    return True


# torch.export names a module reached through a slice of a ModuleList (Llama's
# ``self.layers[: num_hidden_layers]``) "layers.slice(None, 4, None).0" in some captures (PEFT's
# VeRA); the module's own name is "layers.0".
_SLICED = re.compile(r"\.slice\((None|\d+), (None|-?\d+), (None|1)\)\.(\d+)")


def _unslice(match: re.Match) -> str:
    start = 0 if match.group(1) == "None" else int(match.group(1))
    return f".{start + int(match.group(4))}"


def _block_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _SLICED.sub(_unslice, path) if isinstance(path, str) else None


def plan_branches(graph: fx.Graph, plans: list[LayerPlan], extra: dict[int, str] | None = None, *,
                  sizes: dict[int, int] | None = None, strict: bool = True) -> list[BranchPlan]:
    """The residual adds of ``graph`` with their branch operand, in topological order.

    ``sizes`` maps parameter ids to their element counts: where both operands' paths hold layers,
    the branch must also hold more parameter elements than the skip (the adapter rule in the
    module doc). Without it, layer counts alone decide.

    ``extra`` maps layer indices to the names the user gave them (``transform(extra_branches=)``):
    the first add in topological order with such a layer on one operand's path and not on the
    other's is a branch whatever the rule says, and that operand is the branch. A name no add
    takes raises :class:`BranchNotFoundError` when ``strict`` (the train graph; the eval graph's
    branches are only matched to those).
    """
    unbound = dict(extra or {})
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    layer_nodes = {index: [position[p.node] for p in plan.nodes] for index, plan in enumerate(plans)}
    # Ancestors along activation edges, as bitsets over node positions (Python ints).
    act = {node: _is_activation(node) for node in nodes}
    ancestors: dict[fx.Node, int] = {}
    # Computations on parameters alone (no input among their ancestors): a gate's sigmoid, DoRA's
    # weight norm and magnitude scale.
    parameter_only: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        bits = 1 << i
        if act[node]:
            for arg in node.all_input_nodes:
                if act[arg]:
                    bits |= ancestors[arg]
            if node.op != "placeholder" and all(a in parameter_only or not act[a] for a in node.all_input_nodes):
                parameter_only.add(node)
        ancestors[node] = bits
    found = []
    beside_one_layer: set[str] = set()  # adds whose skip path is one layer (see below)
    for add in nodes:
        if not _is_add(add) or not act[add]:
            continue
        a, b = add.args[0], add.args[1]
        if not (act[a] and act[b]) or a is b:
            continue
        common = ancestors[a] & ancestors[b]
        if not common:
            continue
        start = common.bit_length() - 1  # the nearest common ancestor: the block input
        reach = 1 << start  # descendants of the block input
        for node in nodes[start + 1: position[add]]:
            if act[node] and any(act[arg] and (reach >> position[arg]) & 1 for arg in node.all_input_nodes):
                reach |= 1 << position[node]

        def path_layers(operand: fx.Node) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
            region = ancestors[operand] & reach & ~(1 << start)
            # Computations on parameters alone that only the branch reads belong to it: detaching
            # the branch cuts their gradient too. Single ones (a gate's sigmoid) count for the
            # rule; chains (DoRA's weight norm and magnitude scale, read from its base layer's
            # output) join the branch only once the rule has decided, so that an adapter's
            # parameters never make its add look like a residual (users come first in this
            # reverse walk, so a chain joins whole).
            for i in range(position[add] - 1, -1, -1):
                node = nodes[i]
                if ancestors[node] == 1 << i and node in parameter_only and node.users \
                        and all((region >> position[u]) & 1 for u in node.users):
                    region |= 1 << i
            # A layer whose output is the block input is upstream of both paths, even where the
            # branch reads its parameters again (DoRA subtracts its base layer's bias).
            deciding = tuple(index for index, where in layer_nodes.items()
                             if any((region >> w) & 1 for w in where) and start not in where)
            for i in range(position[add] - 1, -1, -1):
                node = nodes[i]
                if node in parameter_only and node.users and all((region >> position[u]) & 1 for u in node.users):
                    region |= 1 << i
            touched = [index for index, where in layer_nodes.items()
                       if any((region >> w) & 1 for w in where)]
            # Inner layers get their gradient only through the branch output: none of their nodes
            # reaches a use outside the branch (an auxiliary loss, returned attention weights).
            leaky = 0
            for i in range(position[add] - 1, start, -1):
                if (region >> i) & 1 and any(
                        u is not add and act[u] and (not (region >> position[u]) & 1 or (leaky >> position[u]) & 1)
                        for u in nodes[i].users):
                    leaky |= 1 << i
            inner = [index for index in touched
                     if all((region >> w) & 1 and not (leaky >> w) & 1 for w in layer_nodes[index])]
            return region, tuple(touched), tuple(inner), deciding

        region_a, layers_a, inner_a, deciding_a = path_layers(a)
        region_b, layers_b, inner_b, deciding_b = path_layers(b)
        only_a = {i for i in layers_a if i in unbound and i not in layers_b}
        only_b = {i for i in layers_b if i in unbound and i not in layers_a}
        if only_a and only_b:
            raise BranchNotFoundError(
                f"extra_branches names layers on both operands of the add {add.name!r} "
                f"({', '.join(unbound[i] for i in sorted(only_a))} and "
                f"{', '.join(unbound[i] for i in sorted(only_b))}): name a layer of one operand only")
        if only_a or only_b:
            operand = 0 if only_a else 1
            for i in only_a | only_b:
                del unbound[i]
        elif len(deciding_a) == len(deciding_b):
            continue
        else:
            operand = 0 if len(deciding_a) > len(deciding_b) else 1
            more, fewer = (deciding_a, deciding_b) if operand == 0 else (deciding_b, deciding_a)
            if fewer and sizes is not None and _weight(more, plans, sizes) <= _weight(fewer, plans, sizes):
                continue  # an adapter beside its base layer (W x + B A x): part of one layer
        region, layers, inner, skip = ((region_a, layers_a, inner_a, layers_b) if operand == 0
                                       else (region_b, layers_b, inner_b, layers_a))
        members = tuple(nodes[i].name for i in range(start + 1, position[add]) if (region >> i) & 1)
        found.append(BranchPlan(add.name, operand, nodes[start].name, members, _block_of(add), layers,
                                inner, skip))
        if not (only_a or only_b) and len(deciding_b if operand == 0 else deciding_a) == 1:
            beside_one_layer.add(add.name)
    # An add beside a single layer inside another branch is that layer reparametrised (a
    # high-rank adapter, heavier than its base layer), not a residual of its own.
    inside = {name for plan in found for name in plan.region}
    found = [plan for plan in found if not (plan.add in beside_one_layer and plan.add in inside)]
    if unbound and strict:
        raise BranchNotFoundError(
            f"extra_branches: no residual add has {', '.join(repr(n) for n in unbound.values())} on one "
            "operand's path and not on the other's. Name a layer inside the branch of an add "
            "(x + f(x), torch.add, +=, alpha 1) that both operands reach from a common input")
    return found


def _weight(layers: tuple[int, ...], plans: list[LayerPlan], sizes: dict[int, int]) -> int:
    """Parameter elements of ``layers`` (a parameter shared by several counted once)."""
    return sum(sizes.get(i, 0) for i in {i for index in layers for i in plans[index].param_ids})


def _common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        prefix.append(atoms[0])
    return ".".join(prefix)


def _names(plans: list[BranchPlan], layer_names: tuple[str, ...]) -> list[str]:
    """Block name, plus the branch's main submodule where a block holds several branches."""
    blocks = [p.block if p.block is not None else _common_prefix(layer_names[i] for i in p.layers)
              for p in plans]
    count = Counter(blocks)
    names = []
    for plan, block in zip(plans, blocks):
        if count[block] == 1:
            names.append(block)
            continue
        depth = len(block.split(".")) if block else 0
        parts = [layer_names[i].split(".") for i in plan.layers]
        heads = [p[depth] for p in parts if len(p) > depth]
        tally = Counter(heads)
        best = max(tally.values()) if tally else 0
        head = next((h for h in reversed(heads) if tally[h] == best), plan.add)
        names.append(f"{block}.{head}" if block else head)
    seen: Counter = Counter(names)
    used: Counter = Counter()
    unique = []
    for name in names:
        if seen[name] > 1:
            used[name] += 1
            name = f"{name}#{used[name] - 1}"
        unique.append(name)
    return unique


def build_branches(plans: list[BranchPlan], layers: tuple[Layer, ...], *, keep_first_blocks: int,
                   keep_last_blocks: int, filter: Callable[[Branch], bool] | None) -> tuple[Branch, ...]:
    """Turns branch plans into :class:`Branch` records with the eligibility rule applied."""
    layer_names = tuple(layer.name for layer in layers)
    names = _names(plans, layer_names)
    # Adds in the root module's own forward: each is its own block (nothing groups them).
    keys = [p.block if p.block else f"<root>:{p.add}" for p in plans]
    blocks = list(dict.fromkeys(keys))
    order = {block: k for k, block in enumerate(blocks)}
    result = []
    for index, (plan, name) in enumerate(zip(plans, names)):
        k = order[keys[index]]
        record = Branch(index=index, name=name, block=plan.block or "",
                        layers=tuple(layer_names[i] for i in plan.layers),
                        skip_layers=tuple(layer_names[i] for i in plan.skip_layers),
                        eligible=True, reason="", node=plan.add)
        if k < keep_first_blocks:
            reason = "first block" if keep_first_blocks == 1 else f"first {keep_first_blocks} blocks"
        elif k >= len(blocks) - keep_last_blocks:
            reason = "last block" if keep_last_blocks == 1 else f"last {keep_last_blocks} blocks"
        elif filter is not None and not filter(record):
            reason = "filter"
        else:
            reason = ""
        result.append(replace(record, eligible=not reason, reason=reason))
    return tuple(result)


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
                  by_name: dict[str, fx.Node]) -> fx.Node | None:
    """Reorders the nodes between the block input and the add so the branch's own nodes are
    contiguous: first everything that does not depend on the branch (the skip path, parameter
    reads), then the branch, then what else uses the branch. The same ops run on the same values;
    a compiled region then holds the branch alone (see :mod:`ldbfx.ops.branch`). Returns the
    branch's first node, or None when reordering could change a value: a random op moved across
    another, an in-place op moved across a reader of what it overwrites (the gate still works;
    the compiled region then just holds more than the branch)."""
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
        return inside[0]
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
    return inside[0]


def insert_gates(graph: fx.Graph, plans: list[BranchPlan], indices: list[int | None],
                 root: torch.nn.Module) -> None:
    """Puts ``ops.branch(x, state, index)`` on the branch operand of each add (``indices[k]``
    None: that add gets no gate), and ``ops.branch_start(state)`` before the branch's nodes."""
    from . import ops
    from .module import STATE_ATTR

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
        head = _group_branch(graph, plan, root, by_name)
        if head is not None:
            with graph.inserting_before(head):
                graph.call_function(ops.branch_start, (state,))
        add = by_name[plan.add]
        if _is_inplace(add, root):
            # ``out += identity``: the same value out of place, as long as nothing else reads
            # the overwritten tensor (a compiled gate's fresh leaf cannot be written in place).
            if len(add.args[0].users) != 1:
                continue
            add.target = {"add_": "add", operator.iadd: operator.add, _aten.add_.Tensor: _aten.add.Tensor}.get(
                add.target, add.target)
            if _is_inplace(add, root):
                continue
        operand = add.args[plan.operand]
        with graph.inserting_after(operand):
            gate = graph.call_function(ops.branch, (operand, state, index))
        gate.meta.update({k: v for k, v in operand.meta.items() if k in ("val", "tensor_meta")})
        gate.meta["ldbfx_branch"] = index
        args = list(add.args)
        args[plan.operand] = gate
        add.args = tuple(args)
    graph.lint()


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check(gm: object) -> LdbGraphModule:
    from .mask import _check as check

    return check(gm)


def branches(gm: LdbGraphModule) -> tuple[Branch, ...]:
    """The residual branches of a transformed model, in topological order of their adds.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.

    Returns:
        A tuple of :class:`Branch` records; ``branches(gm)[i].index == i``. Empty for a model
        without residual adds.

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> [(b.name, b.layers, b.eligible) for b in ldbfx.branches(gm)]
        [('0', ('0.norm', '0.fc'), False), ('1', ('1.norm', '1.fc'), True), ('2', ('2.norm', '2.fc'), True), ('3', ('3.norm', '3.fc'), False)]
    """
    return _check(gm).ldbfx_branches


def _branch_index(gm: LdbGraphModule, branch: str | int | Branch) -> int:
    records = gm.ldbfx_branches
    if isinstance(branch, Branch):
        branch = branch.index
    if isinstance(branch, str):
        index = gm._ldbfx_branch_index.get(branch)
    elif isinstance(branch, int) and not isinstance(branch, bool):
        index = branch % len(records) if -len(records) <= branch < len(records) else None
    else:
        raise TypeError(f"branches are named by str or int index, got {type(branch).__name__}: {branch!r}")
    if index is not None and records[index].eligible:
        return index
    eligible = [b.name for b in records if b.eligible]  # for the error message only
    if index is None:
        if not records:
            raise BranchNotFoundError(
                f"no branch named {branch!r}: this model has no residual add ldbfx recognises "
                "(x + f(x)); see ldbfx.branches(gm) and the rule in ldbfx.branches' documentation")
        raise BranchNotFoundError(f"no branch named {branch!r}. Eligible branches are: "
                                  f"{', '.join(eligible) or '(none)'}")
    raise BranchNotFoundError(
        f"branch {records[index].name!r} (index {index}) may not be dropped "
        f"({records[index].reason}). Eligible branches are: {', '.join(eligible) or '(none)'}")


def set_dropped_branches(gm: LdbGraphModule, branches: Iterable[str | int | Branch]) -> None:
    """Detaches the output of ``branches`` in the backward from the next forward on.

    Nothing in a dropped branch is backpropagated (no dX, no dW); the skip path still carries the
    gradient. Its layers' parameters get no gradient and ``optimizer.step()`` leaves them and their
    optimizer state unchanged. Combines freely with :func:`ldbfx.set_dropped`. No retrace; under
    ``torch.compile`` the first non-empty call makes the model recompile once into regions split
    before each eligible branch's add, after which any branch mask runs without recompiling.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.
        branches: names, indices or :class:`Branch` records of eligible branches; ``[]`` restores
            full backprop.

    Raises:
        BranchNotFoundError: a branch does not exist or is not eligible (the message lists the
            eligible ones).

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> ldbfx.set_dropped_branches(gm, ["1", 2])
        >>> gm(torch.randn(2, 8)).sum().backward()
        >>> gm.get_submodule("1.fc").weight.grad is None, gm.get_submodule("0.fc").weight.grad is None
        (True, False)
    """
    from .mask import _ensure_skip_hook

    gm = _check(gm)
    if isinstance(branches, (str, int, Branch)):
        branches = [branches]
    indices = tuple(sorted({_branch_index(gm, b) for b in branches}))
    gm.ldbfx_state.set_dropped_branches(indices)
    if indices:
        _ensure_skip_hook()


def dropped_branches(gm: LdbGraphModule) -> tuple[str, ...]:
    """Names of the branches currently dropped, in topological order.

    Example:
        >>> import torch, ldbfx
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> gm = ldbfx.transform(torch.nn.Sequential(*[Block() for _ in range(4)]))
        >>> ldbfx.set_dropped_branches(gm, [2, "1"])
        >>> ldbfx.dropped_branches(gm)
        ('1', '2')
    """
    gm = _check(gm)
    return tuple(gm.ldbfx_branches[i].name for i in gm.ldbfx_state.dropped_branches)
