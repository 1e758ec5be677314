"""Layer discovery: the parameterized nodes of a traced graph, grouped, ordered and filtered.

A *layer* is a parameterized node of the FX graph: a leaf-module call that owns parameters
(``nn.Conv2d``, ``nn.MultiheadAttention``), or a function/method call that consumes parameters
through ``get_attr`` (``F.linear(x, self.weight)``, a class token, a position embedding).
Nodes that share a parameter (weight tying, a module called twice) form *one* layer, so a
parameter never belongs to two layers and its gradient is skipped only when the whole layer is.
Layers are numbered in topological order of their first node; by default all but the first
``keep_first`` and the last ``keep_last`` trainable layers are eligible for dropping
(LayerDropBack, paper §4: "the last layer as well as the first four layers ... are always
updated"). Frozen layers (no parameter with ``requires_grad``) are never eligible and are not
counted, so under a frozen base model (LoRA) the first and last *adapters* stay kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from ..rewrite import handlers
from ..rewrite.handlers import Handler
from ..records import Filter, Layer

if TYPE_CHECKING:
    from ..runtime.module import LdbGraphModule

# Beside the public API: the pass's stage (plan, then build) that ldbfx.rewrite.driver runs.
__all__ = ["Layer", "layers", "LayerPlan", "plan_layers", "build_layers", "layer_edges"]

@dataclass
class NodePlan:
    """A parameterized node and how to rewrite it (internal)."""

    node: fx.Node
    param_ids: list[int]
    handler: Handler


@dataclass
class LayerPlan:
    """The nodes of one layer before its :class:`Layer` record exists (internal)."""

    nodes: list[NodePlan]
    param_ids: list[int]


def _node_params(node: fx.Node, root: nn.Module) -> list[tuple[int, nn.Parameter]]:
    if node.op == "call_module":
        try:
            module = root.get_submodule(node.target)
        except AttributeError:  # the graph's own (torch.export's guard module): no parameters
            return []
        return [(id(p), p) for p in module.parameters()]
    params = (handlers.param_of(arg, root) for arg in node.all_input_nodes)
    return [(id(p), p) for p in params if p is not None]


def _handler(node: fx.Node, root: nn.Module) -> Handler:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return handlers.module_handler(node, module, root) or handlers.GENERIC_MODULE
    return handlers.function_handler(node, root) or handlers.GENERIC_PARAM


def plan_layers(graph: fx.Graph, root: nn.Module) -> list[LayerPlan]:
    """Groups the graph's parameterized nodes into layers, in topological order."""
    node_plans: list[NodePlan] = []
    parent: dict[int, int] = {}  # union-find over parameter ids

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        params = _node_params(node, root)
        if not params:
            continue
        ids = list(dict.fromkeys(i for i, _ in params))
        for i in ids:
            parent.setdefault(i, i)
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
        node_plans.append(NodePlan(node, ids, _handler(node, root)))

    groups: dict[int, LayerPlan] = {}
    for plan in node_plans:  # graph order, so groups come out in order of their first node
        group = groups.setdefault(find(plan.param_ids[0]), LayerPlan([], []))
        group.nodes.append(plan)
        group.param_ids.extend(i for i in plan.param_ids if i not in group.param_ids)
    return list(groups.values())


def _layer_name(plan: LayerPlan, root: nn.Module, names: dict[int, str]) -> str:
    first = plan.nodes[0].node
    if first.op == "call_module":
        return first.target
    params = [names[i] for i in plan.param_ids]
    owners = {p.rpartition(".")[0] for p in params}
    if len(owners) == 1:
        owner = owners.pop()
        owned = {id(p) for p in root.get_submodule(owner).parameters(recurse=False)} if owner else set()
        if owner and owned == set(plan.param_ids):
            return owner
    return params[0] if len(params) == 1 else "+".join(params)


def _type_name(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if isinstance(node.target, torch._ops.OpOverload):  # torch.export graphs: aten.linear.default
        return node.target.overloadpacket.__name__
    return getattr(node.target, "__name__", str(node.target))


def build_layers(
    plans: list[LayerPlan],
    root: nn.Module,
    *,
    keep_first: int,
    keep_last: int,
    filter: Filter | None,
) -> tuple[Layer, ...]:
    """Turns layer plans into :class:`Layer` records with the eligibility rule applied."""
    names = {id(p): n for n, p in root.named_parameters()}
    params_by_id = {id(p): p for p in root.parameters()}
    result = []
    # keep_first/keep_last count *trainable* layers: with a frozen base model (PEFT's LoRA), the
    # first and last layers that actually train are the adapters, and those are what stay kept.
    trainable = [i for i, plan in enumerate(plans)
                 if any(params_by_id[p].requires_grad for p in plan.param_ids)]
    position = {index: k for k, index in enumerate(trainable)}
    n = len(trainable)
    for index, plan in enumerate(plans):
        first = plan.nodes[0].node
        name = _layer_name(plan, root, names)
        if first.op == "call_module":
            module = root.get_submodule(first.target)
        else:
            owner = names[plan.param_ids[0]].rpartition(".")[0]
            module = root.get_submodule(owner)
        if index not in position:
            reason = "frozen"
        elif position[index] < keep_first:
            reason = f"first {keep_first}"
        elif position[index] >= n - keep_last:
            reason = f"last {keep_last}"
        elif filter is not None and not filter(module, name):
            reason = "filter"
        else:
            reason = ""
        kinds = list(dict.fromkeys(p.handler.kind for p in plan.nodes))
        result.append(Layer(
            index=index,
            name=name,
            params=tuple(names[i] for i in plan.param_ids),
            eligible=not reason,
            reason=reason,
            op=first.op,
            type=_type_name(first, root),
            kind="+".join(kinds),
            saves_compute=all(p.handler.saves_compute for p in plan.nodes),
            numel=sum(params_by_id[i].numel() for i in plan.param_ids),
            nodes=tuple(p.node.name for p in plan.nodes),
        ))
    return tuple(result)


def layer_edges(graph: fx.Graph, plans: list[LayerPlan]) -> tuple[tuple[int, int], ...]:
    """Edges ``(a, b)``: an output of layer ``a`` reaches layer ``b`` without crossing a layer."""
    layer_of = {p.node: i for i, plan in enumerate(plans) for p in plan.nodes}
    reach: dict[fx.Node, frozenset[int]] = {}
    edges: set[tuple[int, int]] = set()
    for node in graph.nodes:
        incoming = frozenset().union(*(reach.get(a, frozenset()) for a in node.all_input_nodes))
        if node in layer_of:
            b = layer_of[node]
            edges.update((a, b) for a in incoming if a != b)
            reach[node] = frozenset({b})
        else:
            reach[node] = incoming
    return tuple(sorted(edges))


def layers(gm: LdbGraphModule) -> tuple[Layer, ...]:
    """The layers of a transformed model, in topological order.

    Args:
        gm: a module returned by :func:`ldbfx.transform`.

    Returns:
        A tuple of :class:`Layer` records; ``layers(gm)[i].index == i``.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> gm = ldbfx.transform(model)
        >>> [(l.name, l.eligible) for l in ldbfx.layers(gm)][3:]
        [('3', False), ('4', True), ('5', False)]
    """
    from ..runtime.module import LdbGraphModule

    if not isinstance(gm, LdbGraphModule):
        raise TypeError(
            f"expected a module returned by ldbfx.transform, got {type(gm).__name__}; "
            "call gm = ldbfx.transform(model) first"
        )
    return gm.ldbfx_layers

