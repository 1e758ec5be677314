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

from ..runtime.branch_mask import branches, dropped_branches, set_dropped_branches
from ..errors import BranchNotFoundError
from ..records import Branch

if TYPE_CHECKING:
    from .layers import LayerPlan
    from ..records import Layer

# The run-time API (ldbfx.runtime.branch_mask) is re-exported: ``ldbfx.branches`` was its home.
__all__ = ["Branch", "BranchNotFoundError", "BranchPlan", "plan_branches", "build_branches", "branches",
           "set_dropped_branches", "dropped_branches"]

_aten = torch.ops.aten
_ADDS = {operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor}
_ADD_METHODS = {"add", "add_"}
# FX (symbolic trace, no tensor metadata): call results that are never activations.
_SHAPE_METHODS = {"size", "dim", "numel", "type", "get_device", "stride", "nelement"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


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
