"""Symbolic tracing for :func:`ldbfx.transform`: one graph per training mode, readable errors.

Tracing executes ``forward`` once with proxies, so Python-level branches are frozen into the graph.
Two of them matter for an exact copy of a model:

* ``self.training`` branches of modules that are traced through (``F.dropout(x, p,
  self.training)``, torchvision's ``StochasticDepth``, timm's heads): a graph traced in train mode
  keeps its dropout in eval mode. ldbfx therefore traces the model in *both* modes and, when the
  graphs differ, the returned module runs the graph of its current mode.
* Tensors created during tracing (``torch.tensor(...)`` inside ``forward``) become
  ``_tensor_constant`` attributes that FX sets on the *user's* model as plain attributes, which
  ``.to(device)`` would not move. ldbfx removes them from the user's model and keeps them as
  non-persistent buffers of the graph module (moved by ``.to``, absent from ``state_dict``).
"""

from __future__ import annotations

import functools

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import TraceError

__all__ = ["LdbfxTracer", "TracedModel", "trace_model", "has_hooks", "autocast_state"]


def _timm_fx_registries() -> tuple[set[type], set[Callable]]:
    """timm's own FX registries (``register_notrace_module`` / ``register_notrace_function``).

    Read only when timm is already imported (a timm model implies it is), so ``import ldbfx``
    never imports timm.
    """
    fx_helpers = sys.modules.get("timm.layers._fx")
    if fx_helpers is None:
        return set(), set()
    return set(getattr(fx_helpers, "_leaf_modules", ())), set(
        getattr(fx_helpers, "_autowrap_functions", ())
    )


class LdbfxTracer(fx.Tracer):
    """``torch.fx.Tracer`` with extra leaf modules, timm's registries, and failure locations.

    Args:
        leaf_modules: module types, or qualified module names, to keep as single calls instead of
            tracing through them.
        autowrap_functions: functions to record as single calls (``torch.fx.wrap`` semantics).
    """

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable[Callable] = ()):
        timm_leaves, timm_functions = _timm_fx_registries()
        leaf_modules = list(leaf_modules)
        self.leaf_types = tuple(timm_leaves | {m for m in leaf_modules if isinstance(m, type)})
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        super().__init__(autowrap_functions=tuple(timm_functions | set(autowrap_functions)))
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module: the first handler to see it
                self.failed_module = (self.path_of_module(m), type(m).__qualname__)
            raise


@dataclass
class TracedModel:
    """The result of :func:`trace_model`."""

    train_graph: fx.Graph
    eval_graph: fx.Graph | None  # None when both modes trace to the same code
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # Modules and plain attributes the graphs need besides the model's (torch.export's guard
    # module and its input/output specs): kept by the transformed module, absent from state_dict.
    attributes: dict[str, Any] = field(default_factory=dict)
    # torch.export only: the autocast the graph was captured under (it fixes the dtypes it saw).
    autocast: tuple | None = None


class CheckpointCalled(Exception):
    """Raised while capturing when ``forward`` calls ``torch.utils.checkpoint``."""

    def __init__(self, function: Any):
        super().__init__()
        self.function = function


def _refuse_checkpoint(function, *args, **kwargs):
    raise CheckpointCalled(function)


class no_checkpoint:
    """While capturing, ``torch.utils.checkpoint.checkpoint`` (and what calls it:
    ``checkpoint_sequential``, ``checkpoint_wrapper``, Hugging Face's gradient checkpointing)
    raises: torch.fx and torch.export would both inline the checkpointed function and silently
    keep all of its activations. ``checkpoint`` looks its implementation up in its own module, so
    patching that one name catches every import style (``from torch.utils.checkpoint import
    checkpoint``, a ``functools.partial`` bound before the capture)."""

    def __enter__(self):
        import torch.utils.checkpoint as ckpt

        self._module, self._impl = ckpt, ckpt._checkpoint_impl
        ckpt._checkpoint_impl = _refuse_checkpoint

    def __exit__(self, *exc):
        self._module._checkpoint_impl = self._impl


def checkpoint_error(model: nn.Module, called: CheckpointCalled, caller: str | None = None) -> TraceError:
    """The refusal of a forward that calls ``torch.utils.checkpoint``: names the calling module
    (``caller``, known to the FX tracer) or else the checkpointed one, when the function is a
    module's (the module, its bound ``forward`` or a partial of them)."""
    function = called.function
    while isinstance(function, functools.partial):
        function = function.func
    owner = function if isinstance(function, nn.Module) else getattr(function, "__self__", None)
    name = next((n for n, m in model.named_modules() if m is owner), None) if isinstance(owner, nn.Module) else None
    if caller:
        location = f"{caller} calls torch.utils.checkpoint"
    elif name is not None:
        location = f"module '{name or type(owner).__qualname__}' ({type(owner).__qualname__}) is checkpointed"
    else:
        location = f"{type(model).__qualname__}.forward calls torch.utils.checkpoint"
    return TraceError(
        f"{location}: a captured graph would inline the checkpointed "
        "code and keep all of its activations (memory would silently grow). Turn activation "
        "checkpointing off before ldbfx.transform (timm: model.set_grad_checkpointing(False); "
        "Hugging Face: model.activation_checkpointing_disable(), gradient_checkpointing_disable() in "
        "older transformers; or remove checkpoint_wrapper / torch.utils.checkpoint), or, on the FX "
        "path, make the module that calls it a leaf: leaf_modules=[...] (it then trains as one "
        "gated layer, without savings)")


def _trace_one(model: nn.Module, tracer: fx.Tracer, concrete_args: dict[str, Any] | None) -> fx.Graph:
    try:
        with no_checkpoint():
            return tracer.trace(model, concrete_args=concrete_args)
    except CheckpointCalled as called:
        where = getattr(tracer, "failed_module", None)
        raise checkpoint_error(model, called, f"module '{where[0]}' ({where[1]})"
                               if where and where[0] else None) from None
    except Exception as cause:
        where = getattr(tracer, "failed_module", None)
        location = (f"inside module '{where[0]}' ({where[1]})" if where and where[0]
                    else f"in {type(model).__qualname__}.forward")
        fixes = [
            f"make the module a leaf so it is called as a whole: "
            f"ldbfx.transform(model, leaf_modules=[{where[1] if where else 'TheModule'}])",
            "if forward branches on an argument's value (a flag, None), fix it with "
            "concrete_args={'arg': value}",
            "capture with torch.export from an example batch instead (Hugging Face models, "
            "data-dependent code): ldbfx.transform(model, example_args=(x,)) or "
            "ldbfx.transform(model, example_kwargs={'input_ids': ids, 'labels': ids})",
        ]
        raise TraceError(
            f"torch.fx could not trace {type(model).__qualname__}: the failure happened {location}: "
            f"{type(cause).__name__}: {cause}\nPossible fixes:\n  - " + "\n  - ".join(fixes)
        ) from cause


def _collect_constants(model: nn.Module, graph: fx.Graph) -> dict[str, torch.Tensor]:
    """Takes the tensors FX stored on the user's model during tracing (in graph order)."""
    found = {}
    for node in graph.nodes:
        if node.op == "get_attr" and "." not in node.target and node.target.startswith("_tensor_constant"):
            if node.target in model.__dict__:
                found[node.target] = model.__dict__.pop(node.target)
    return found


def _same_constants(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip(a.values(), b.values())
    )


def trace_model(
    model: nn.Module,
    *,
    tracer_class: type[fx.Tracer] | None = None,
    tracer_kwargs: dict[str, Any] | None = None,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
) -> TracedModel:
    """Traces ``model`` in train and in eval mode; restores every submodule's mode afterwards.

    Raises:
        TraceError: the model is not traceable; the message names the module and the fixes.
    """

    def make_tracer() -> fx.Tracer:
        if tracer_class is None:
            return LdbfxTracer(leaf_modules, autowrap_functions)
        return tracer_class(**(tracer_kwargs or {}))

    if tracer_class is None:
        _refuse_global_hooks()
    modes = [(m, m.training) for m in model.modules()]  # restore mixed modes exactly
    try:
        model.train()
        train_graph = _trace_one(model, make_tracer(), concrete_args)
        optional = _dereferenced_optional_inputs(model, train_graph, concrete_args)
        if optional:
            # Traced as proxies, these None-default arguments took their "given" branch
            # (`if mask is not None:` is always true for a proxy), so the graph would fail when
            # they are left out. Trace them as None, their default: calls that leave them out then
            # compute what the model computes, and a call that passes one gets FX's clear error.
            _collect_constants(model, train_graph)
            concrete_args = {**(concrete_args or {}), **{name: None for name in optional}}
            train_graph = _trace_one(model, make_tracer(), concrete_args)
        train_constants = _collect_constants(model, train_graph)
        model.eval()
        eval_graph = _trace_one(model, make_tracer(), concrete_args)
        eval_constants = _collect_constants(model, eval_graph)
    finally:
        for module, mode in modes:
            module.training = mode
    _refuse_inlined_hooks(model, train_graph)
    # Tensor constants get fresh names per trace: compare the code with names unified, and values.
    if _normalized_code(train_graph) == _normalized_code(eval_graph) and _same_constants(
        train_constants, eval_constants
    ):
        return TracedModel(train_graph, None, train_constants)
    return TracedModel(train_graph, eval_graph, {**train_constants, **eval_constants})


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks or backward hooks of its own."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _refuse_inlined_hooks(model: nn.Module, graph: fx.Graph) -> None:
    """Hooks on a module that tracing inlined (or on the model itself) would never run.

    Leaf modules are still called by the graph, so their hooks run (ldbfx calls a hooked leaf
    module as a whole: see ``handlers.module_handler``). A module traced *through* exists in the
    graph only as the ops of its ``forward``: its hooks, ``weight_norm``'s old pre-hook included,
    are silently lost. Refused with the module's name and the ways out.
    """
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    inlined = {""} | {path for node in graph.nodes for path, _ in node.meta.get("nn_module_stack", {}).values()}
    for name, module in model.named_modules():
        if name in inlined and name not in called and has_hooks(module):
            if name:
                where = f"module '{name}' ({type(module).__qualname__})"
                leaf = (f"pass leaf_modules=['{name}'] so the graph calls it as a whole (its hooks "
                        "run; it then trains as one gated layer, without savings), or ")
            else:
                where, leaf = f"the model ({type(model).__qualname__})", ""
            raise TraceError(
                f"{where} has forward or backward hooks, but tracing inlines it, so they would never "
                f"run. Either {leaf}remove the hooks before ldbfx.transform and register them on the "
                "returned module's submodules (torch.nn.utils.weight_norm: use "
                "torch.nn.utils.parametrizations.weight_norm)")


def _refuse_global_hooks() -> None:
    """Global module hooks (``register_module_forward_hook``) would not run for rewritten layers."""
    from torch.nn.modules import module as nn_module

    hooks = [getattr(nn_module, name, {}) for name in (
        "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks")]
    if any(hooks):
        raise TraceError(
            "global module hooks are registered (torch.nn.modules.module.register_module_forward_hook "
            "or similar): the rewritten graph calls its layers' ops, not their modules, so those hooks "
            "would not run for them. Remove them before ldbfx.transform")


def autocast_state() -> tuple:
    """The autocast dtype in effect on the CPU and on CUDA (``None`` where off)."""
    return tuple(torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cpu", "cuda"))


def _dereferenced_optional_inputs(model: nn.Module, graph: fx.Graph,
                                  concrete_args: dict[str, Any] | None) -> list[str]:
    """Forward arguments defaulting to ``None`` that the graph uses as tensors.

    A placeholder the graph dereferences (a method call on it, an attribute, an operator) can
    only have come from a branch such as ``if mask is not None: mask.view(...)``, which tracing
    always takes. timm's Hiera (``forward(x, mask=None)``) is one: before this check its graph
    failed at the first call without a mask (``'NoneType' object has no attribute 'view'``).
    An argument that is only passed on to modules or functions (which may accept ``None``) is
    left a placeholder.
    """
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    defaults = {name: p.default for name, p in signature.parameters.items()}
    found = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if defaults.get(name, inspect.Parameter.empty) is not None or name in (concrete_args or {}):
            continue
        for user in node.users:
            method_on_it = user.op == "call_method" and user.args and user.args[0] is node
            operator_on_it = user.op == "call_function" and (
                user.target is getattr or getattr(user.target, "__module__", None) in ("_operator", "operator"))
            if method_on_it or operator_on_it:
                found.append(name)
                break
    return found


def _normalized_code(graph: fx.Graph) -> str:
    import re

    code = graph.python_code(root_module="self").src
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", code)
