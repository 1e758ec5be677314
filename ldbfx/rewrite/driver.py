"""The graph pass: :func:`transform` rewrites every layer so its weight gradient is maskable.

Before (``print(model_traced.code)``)::

    conv1 = self.conv1(x);  x = None
    bn1 = self.bn1(conv1);  conv1 = None

After (``print(ldbfx.transform(model).code)``)::

    _ldbfx_mask = self._ldbfx_mask
    conv1_weight = self.conv1.weight
    conv1 = ldbfx_ops_conv(x, conv1_weight, None, (2, 2), (3, 3), (1, 1), 1, _ldbfx_mask, 0)
    ...

The forward computation is unchanged op for op; the functions of :mod:`ldbfx.ops` read
``_ldbfx_mask[index]`` to decide whether layer ``index`` computes its weight gradient.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from .. import ops
from .gates import insert_gates
from ..analysis.branches import Branch, build_branches, plan_branches
from ..errors import BranchNotFoundError, NoEligibleLayerWarning, TraceError
from .handlers import GENERIC_PARAM, Rewriter, param_of
from ..analysis.layers import LayerPlan, build_layers, layer_edges, plan_layers
from ..runtime.module import STATE_ATTR, LdbGraphModule
from ..records import Filter, TransformConfig
from ..capture.trace import trace_model

__all__ = ["TransformConfig", "transform"]


def _rewrite(graph: fx.Graph, root: nn.Module, plans: list[LayerPlan],
             index_of: Callable[[LayerPlan], int | None]) -> None:
    """Rewrites the nodes of ``plans`` (all found first, then mutated, as FX passes do)."""
    rw = Rewriter(graph, root)
    for plan in plans:
        index = index_of(plan)
        if index is None:  # eval-only parameters unknown to the train graph: left as they are
            continue
        for node_plan in plan.nodes:
            node = node_plan.node
            if node_plan.handler is GENERIC_PARAM:
                for arg in node.all_input_nodes:
                    param = param_of(arg, root)
                    if param is not None and id(param) in plan.param_ids:
                        node.replace_input_with(arg, rw.masked(arg, index))
                continue
            name = node.name
            with graph.inserting_before(node):
                new = node_plan.handler.rewrite(rw, node, index)
            new.meta.update(node.meta)
            new.meta["ldbfx"] = {"layer": index, "kind": node_plan.handler.kind}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            # Give the replacement the original name, so gm.code reads like the model's trace.
            graph._graph_namespace._used_names.discard(name)
            new._rename(name)
    graph.lint()


def transform(
    model: nn.Module,
    *,
    keep_first: int = 4,
    keep_last: int = 1,
    filter: Filter | None = None,
    keep_first_blocks: int = 1,
    keep_last_blocks: int = 1,
    branch_filter: Callable[[Branch], bool] | None = None,
    extra_branches: Iterable[str] = (),
    tracer_class: type[fx.Tracer] | None = None,
    tracer_kwargs: dict[str, Any] | None = None,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    example_args: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = "auto",
) -> LdbGraphModule:
    """Captures ``model`` once and makes each layer's weight gradient skippable at run time.

    Two front ends capture the graph. Without an example batch, ``torch.fx`` traces the model
    symbolically (torchvision, timm, custom models: no input needed, module-level graph). With
    ``example_args`` / ``example_kwargs``, ``torch.export`` captures it from that batch (Hugging
    Face transformers and any other exportable model; see :mod:`ldbfx.capture.export`). Both give the
    same kind of module with the same contract.

    The returned module computes exactly what ``model`` computes (same ops, train and eval), shares
    its parameter and module objects (an optimizer built on either trains both) and has the same
    ``state_dict()`` keys. Choose what to skip with :func:`ldbfx.set_dropped`; nothing is dropped
    until then.

    Args:
        model: any module: ``torch.fx``-traceable (torchvision, timm, custom models) unless an
            example batch is given, which captures it with ``torch.export`` instead.
        keep_first: the first layers (topological order) that always train. Default: ``4``.
        keep_last: the last layers that always train. Default: ``1``.
        filter: ``(module, name) -> bool``; layers for which it is False always train.
            Default: ``None``.
        keep_first_blocks: the first blocks whose residual branches always train (see
            :func:`ldbfx.branches`). Default: ``1``.
        keep_last_blocks: the last blocks whose residual branches always train. Default: ``1``.
        branch_filter: ``(ldbfx.Branch) -> bool``; branches for which it is False always train.
            Default: ``None``.
        extra_branches: layer names (as :func:`ldbfx.layers` names them), one inside each
            residual branch the discovery rule misses (two paths with as many layers) or
            orients the wrong way (a shortcut with more layers than its branch); the first add
            with that layer on one operand only becomes a branch on that operand. Default: ``()``.
        tracer_class: a ``torch.fx.Tracer`` subclass to use instead of ldbfx's. Default: ``None``.
        tracer_kwargs: keyword arguments for ``tracer_class``. Default: ``None``.
        leaf_modules: module types or qualified names to keep as single calls. Default: ``()``.
        autowrap_functions: functions to record as single calls. Default: ``()``.
        concrete_args: arguments to fix while tracing (``torch.fx`` semantics). Default: ``None``.
        example_args: positional inputs of one example batch: capture with ``torch.export``.
            Default: ``None``.
        example_kwargs: keyword inputs of one example batch (``input_ids``, ``attention_mask``,
            ``labels``...): capture with ``torch.export``. Default: ``None``.
        dynamic_shapes: with an example, which dimensions may change between batches:
            ``"auto"`` (every dimension the model allows, e.g. batch and sequence length), ``None``
            (the example's shapes only) or ``torch.export``'s own format. Default: ``"auto"``.

    Returns:
        An :class:`ldbfx.LdbGraphModule` (a ``torch.fx.GraphModule``).

    Raises:
        TraceError: ``model`` could not be captured; the message names the cause and the fixes.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(8)])
        >>> gm = ldbfx.transform(model)
        >>> ldbfx.set_dropped(gm, ["4", "6"])    # skip two layers' weight gradients
        >>> gm(torch.randn(2, 8)).sum().backward()
        >>> model[4].weight.grad is None, model[5].weight.grad is None
        (True, False)

        A Hugging Face model, captured from an example batch:

        >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
        >>> llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, use_cache=False))  # doctest: +SKIP
        >>> ids = torch.randint(0, 100, (2, 16))  # doctest: +SKIP
        >>> gm = ldbfx.transform(llama, example_kwargs={"input_ids": ids, "labels": ids})  # doctest: +SKIP
    """
    config = TransformConfig(keep_first, keep_last, filter, keep_first_blocks, keep_last_blocks,
                             branch_filter, extra_branches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LdbGraphModule):
        raise TypeError("this module was already transformed by ldbfx; transform the original model")
    _refuse_quantized(model)
    if example_args is not None or example_kwargs is not None:
        fx_only = {"tracer_class": tracer_class, "tracer_kwargs": tracer_kwargs,
                   "leaf_modules": tuple(leaf_modules), "autowrap_functions": tuple(autowrap_functions),
                   "concrete_args": concrete_args}
        given = [name for name, value in fx_only.items() if value]
        if given:
            raise TypeError(f"{', '.join(given)} configure torch.fx tracing, but an example batch "
                            "selects torch.export capture; pass one or the other")
        from ..capture.export import (
            export_model,  # imports nothing heavy; keeps the FX path's imports
        )

        traced = export_model(model, example_args or (), example_kwargs, dynamic_shapes)
    else:
        traced = trace_model(
            model, tracer_class=tracer_class, tracer_kwargs=tracer_kwargs, leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions, concrete_args=concrete_args,
        )
    plans = plan_layers(traced.train_graph, model)
    layers = build_layers(plans, model, keep_first=config.keep_first, keep_last=config.keep_last,
                          filter=config.filter)
    edges = layer_edges(traced.train_graph, plans)
    extra = _extra_branch_layers(config, layers)
    sizes = {id(p): p.numel() for p in model.parameters()}
    branch_plans = plan_branches(traced.train_graph, plans, extra, sizes=sizes)
    branch_records = build_branches(branch_plans, layers, keep_first_blocks=config.keep_first_blocks,
                                    keep_last_blocks=config.keep_last_blocks, filter=config.branch_filter)
    gated = [b.index if b.eligible else None for b in branch_records]
    _rewrite(traced.train_graph, model, plans, _index_by_position(plans))
    insert_gates(traced.train_graph, branch_plans, gated, model)
    _tie_outputs(traced.train_graph)
    if traced.eval_graph is not None:
        layer_of_param = {i: index for index, plan in enumerate(plans) for i in plan.param_ids}
        eval_plans = plan_layers(traced.eval_graph, model)
        eval_index = lambda plan: layer_of_param.get(plan.param_ids[0])  # noqa: E731
        # The same branch in the other mode's graph: the same layers inside (by parameters).
        by_layers = {b.layers: g for b, g in zip(branch_plans, gated) if g is not None}
        eval_extra = {i: extra[eval_index(p)] for i, p in enumerate(eval_plans) if eval_index(p) in extra}
        eval_branches = plan_branches(traced.eval_graph, eval_plans, eval_extra, sizes=sizes,
                                      strict=False)
        eval_gated = [by_layers.get(tuple(eval_index(eval_plans[i]) for i in b.layers))
                      for b in eval_branches]
        _rewrite(traced.eval_graph, model, eval_plans, eval_index)
        insert_gates(traced.eval_graph, eval_branches, eval_gated, model)
    if not any(layer.eligible for layer in layers):
        warnings.warn(
            f"ldbfx.transform found no eligible layer in {type(model).__name__} "
            f"({len(layers)} layers, keep_first={config.keep_first}, keep_last={config.keep_last}"
            f"{', filter set' if config.filter else ''}): the model trains exactly as before. "
            "Lower keep_first/keep_last or relax the filter to drop layers.",
            NoEligibleLayerWarning, stacklevel=2,
        )
    return LdbGraphModule(model, traced.train_graph, traced.eval_graph, traced.constants, layers,
                          edges, config, traced.attributes, branch_records,
                          tuple(b.inner for b in branch_plans), autocast=traced.autocast)


def _refuse_quantized(model: nn.Module) -> None:
    """Quantized base weights (QLoRA) are stored as integers (bitsandbytes' ``Params4bit``, uint8)
    or as tensor subclasses (torchao's ``NF4Tensor``) that dequantize inside their own ops: no
    handler of ldbfx knows them, and a capture would run their dequantization as plain ops."""
    for name, p in model.named_parameters():
        subclass = type(p.data) is not torch.Tensor and type(p.data).__name__ != "DTensor"
        if not (p.is_floating_point() or p.is_complex()) or subclass:
            raise TraceError(
                f"parameter {name!r} holds quantized weights ({type(p).__name__}, {p.dtype}): ldbfx "
                "captures and rewrites floating-point layers and cannot serve a quantized base "
                "(QLoRA with bitsandbytes 4/8-bit or torchao NF4). Fine-tune the LoRA adapters on a "
                "bf16 base (from_pretrained(..., dtype=torch.bfloat16), no quantization_config) with "
                "ldbfx, or train the quantized model without ldbfx")


def _tie_outputs(graph: fx.Graph) -> None:
    """Passes the train graph's outputs through ``ops.reachable`` (see :mod:`ldbfx.ops.outputs`)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves: list[fx.Node] = []
    fx.node.map_arg(output.args[0], lambda n: leaves.append(n) if n not in leaves else None)
    if not leaves:
        return
    with graph.inserting_before(output):
        state = graph.get_attr(STATE_ATTR)
        tied = graph.call_function(ops.reachable, (state, *leaves))
        items = {leaf: graph.call_function(operator.getitem, (tied, k)) for k, leaf in enumerate(leaves)}
    for leaf, item in items.items():
        item.meta.update({k: v for k, v in leaf.meta.items() if k in ("val", "tensor_meta")})
    output.args = (fx.node.map_arg(output.args[0], items.__getitem__),)


def _extra_branch_layers(config: TransformConfig, layers) -> dict[int, str]:
    """``extra_branches`` as layer index -> name; an unknown name raises, listing the layers."""
    index = {layer.name: layer.index for layer in layers}
    unknown = [name for name in config.extra_branches if name not in index]
    if unknown:
        raise BranchNotFoundError(
            f"extra_branches: no layer named {', '.join(repr(n) for n in unknown)}. Layers are: "
            f"{', '.join(index) or '(none)'}")
    return {index[name]: name for name in config.extra_branches}


def _index_by_position(plans: list[LayerPlan]) -> Callable[[LayerPlan], int]:
    positions = {id(plan): i for i, plan in enumerate(plans)}
    return lambda plan: positions[id(plan)]

