"""Capture with ``torch.export``: the front end for models ``torch.fx`` cannot trace.

Hugging Face transformers (v5 removed their FX tracer), models with data-dependent Python and
anything else ``torch.export.export(strict=False)`` handles are captured from an example batch::

    gm = ldbfx.transform(model, example_kwargs={"input_ids": ids, "labels": ids})

The exported graph is ATen-level (``aten.linear``, ``aten.embedding``, ``aten.conv2d``...), and
every parameter is a ``get_attr`` of the model's own qualified name, so the rewrite of
:mod:`ldbfx.rewrite.driver` applies unchanged with the ATen handlers of :mod:`ldbfx.rewrite.handlers`.
Three properties of an export matter for an exact copy, each handled here:

* **Train/eval is baked in** (dropout becomes ``aten.dropout(train=True)``): the model is exported
  once per mode, as the FX front end traces once per mode.
* **Inputs that alias are merged**: an example with ``labels=input_ids`` (the same tensor) gives a
  graph that reads one placeholder for both, which would silently use the labels as inputs once
  they differ. Example tensors are therefore cloned before export.
* **Shapes are specialised** unless declared dynamic: by default every dimension of every example
  tensor is ``Dim.AUTO``, so export keeps dynamic whatever the model allows (batch, sequence) and
  specialises the rest; a call whose shape breaks a guard raises (``_guards_fn``), never runs
  silently on the wrong shape.
"""

from __future__ import annotations

import inspect
from operator import attrgetter
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .trace import (
    CheckpointCalled,
    TracedModel,
    _refuse_global_hooks,
    autocast_state,
    checkpoint_error,
    has_hooks,
    no_checkpoint,
)

__all__ = ["export_model", "auto_dynamic_shapes"]

#: Attributes of ``ExportedProgram.module()`` that its generated code reads (``self._in_spec``).
_SPEC_ATTRS = ("_in_spec", "_out_spec")


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by ``forward``'s names.

    Export then keeps each dimension dynamic unless the model needs it fixed (a channel count, an
    image size a position embedding is built for) or the example has size 0 or 1 there, so give
    an example batch with at least 2 samples and 2 tokens.
    """
    auto = torch.export.Dim.AUTO
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def leaf(x):
        return {d: auto for d in range(x.dim())} if isinstance(x, torch.Tensor) else None

    return {name: pytree.tree_map(leaf, value) for name, value in bound.items()}


def _configs_with_cache(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs of ``model``'s modules that ask for a KV cache."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if getattr(config, "use_cache", None) is True:
            found.setdefault(id(config), config)
    return list(found.values())


def _cloned(value: Any) -> Any:
    """Clones every tensor leaf, so no two inputs alias (export would merge them into one)."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, value)


def _export_error(model: nn.Module, cause: Exception) -> TraceError:
    text = f"{type(cause).__name__}: {cause}"
    fixes = [
        "make sure the model runs on the example: model(*example_args, **example_kwargs)",
        "pass dynamic_shapes=... (torch.export's format) or dynamic_shapes=None for static shapes "
        "if a dynamic dimension is the problem",
    ]
    if "Cache" in text and "pytree" in text:
        fixes.insert(0, ("the model returns a key/value cache, which is for generation, not training: "
                         "leave use_cache out of the example batch (ldbfx then captures without a cache)"))
    first = text.splitlines()[0] if text else type(cause).__name__
    return TraceError(
        f"torch.export could not capture {type(model).__qualname__}: {first[:500]}\n"
        "Possible fixes:\n  - " + "\n  - ".join(fixes))


def _export_one(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> fx.GraphModule:
    try:
        with no_checkpoint():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except CheckpointCalled as called:
        raise checkpoint_error(model, called) from None
    except Exception as cause:  # export raises many types; all mean "not capturable as given"
        raise _export_error(model, cause) from cause
    module = program.module()
    guards = getattr(module, "_guards_fn", None)
    if guards is not None:
        try:
            guards(*fx_pytree.tree_flatten_spec((args, kwargs), module._in_spec))
        except NameError:
            # torch's generated guard code cannot address inputs that reach forward through
            # **kwargs (PEFT's PeftModel.forward): it refers to an undefined name. Without the
            # guard module, a shape outside what was captured fails in the op that needs it.
            module = program.module(check_guards=False)
    return module


def _owned(model: nn.Module, exported: fx.GraphModule, prefix: str) -> dict[str, Any]:
    """What the graph reads that is not the model's own: guard modules, lifted constants.

    Parameters and buffers resolve, by qualified name, to the model's very objects (checked), so
    the transformed module reads and updates the user's tensors. Anything else is renamed with
    ``prefix`` (two modes' graphs each have a ``_guards_fn``) and kept by the transformed module.
    """
    owned: dict[str, Any] = {}
    for node in exported.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        value = attrgetter(node.target)(exported)
        try:
            mine = attrgetter(node.target)(model)
        except AttributeError:
            mine = None
        if mine is value:
            continue
        if isinstance(value, nn.Parameter) or mine is not None:
            raise TraceError(
                f"torch.export gave a copy of {node.target!r} rather than the model's own tensor; "
                "the transformed model would not train the model's parameters. Please report this "
                "with your torch version")
        name = prefix + node.target.replace(".", "_")
        owned[name] = value
        node.target = name
    exported.graph.owning_module = None  # the transformed module will own it (and these names)
    return owned


def _code(exported: fx.GraphModule, prefix: str) -> str:
    return exported.graph.python_code("self").src.replace(prefix, "")


def export_model(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = "auto",
) -> TracedModel:
    """Exports ``model`` in train and in eval mode; restores every submodule's mode afterwards.

    Args:
        model: the module to capture.
        example_args: positional inputs of one example batch.
        example_kwargs: keyword inputs of one example batch (Hugging Face models take these).
        dynamic_shapes: ``"auto"`` (every dimension ``Dim.AUTO``), ``None`` (static), or
            ``torch.export``'s own specification.

    Returns:
        The two graphs (``eval_graph`` None when they agree) and what they own.

    Raises:
        TraceError: export failed; the message gives the cause and the fixes.
    """
    _refuse_global_hooks()
    if not isinstance(example_args, tuple):
        raise TypeError(f"example_args must be a tuple of positional inputs, got {type(example_args).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    args, kwargs = _cloned((example_args, dict(example_kwargs or {})))
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes must be 'auto', None or torch.export's format, got {dynamic_shapes!r}")
        dynamic_shapes = auto_dynamic_shapes(model, args, kwargs)
    # Hugging Face marks each checkpointed module with `gradient_checkpointing = True`.
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise TraceError(
            f"{type(model).__qualname__} has gradient checkpointing on: the captured graph would "
            "not checkpoint (activation memory would silently grow). Call "
            "model.activation_checkpointing_disable() (gradient_checkpointing_disable() in older "
            "transformers) before ldbfx.transform; to train with it, switch it on again after "
            "ldbfx.install(model, gm, blocks='auto', example_kwargs=batch), which keeps each "
            "block's checkpointing")
    hooked = [name or type(model).__qualname__ for name, m in model.named_modules() if has_hooks(m)]
    if hooked:
        # Export runs forward (and its hooks) once, at capture: the graph then holds whatever the
        # hooks computed, and they would never run again. Refused, as the FX front end refuses
        # hooks on the modules it inlines.
        raise TraceError(
            f"module(s) {', '.join(hooked[:5])} have forward or backward hooks: torch.export runs them "
            "once while capturing and the graph never runs them again. Remove the hooks before "
            "ldbfx.transform (with an example batch, every module is inlined)")
    modes = [(m, m.training) for m in model.modules()]
    # A training graph never returns a key/value cache (it is for generation), and returning one
    # fails the capture: capture without it, leaving the user's config as it is.
    caches = [] if "use_cache" in kwargs else _configs_with_cache(model)
    try:
        for config in caches:
            config.use_cache = False
        model.train()
        train = _export_one(model, args, kwargs, dynamic_shapes)
        model.eval()
        evaluation = _export_one(model, args, kwargs, dynamic_shapes)
    finally:
        for module, mode in modes:
            module.training = mode
        for config in caches:
            config.use_cache = True
    owned = _owned(model, train, "_ldbfx_train")
    eval_owned = _owned(model, evaluation, "_ldbfx_eval")
    same = _code(train, "_ldbfx_train") == _code(evaluation, "_ldbfx_eval")
    if not same:
        owned.update(eval_owned)
    for attr in _SPEC_ATTRS:
        if getattr(train, attr) != getattr(evaluation, attr):
            raise TraceError(f"{type(model).__qualname__} takes or returns a different structure in "
                             f"train and eval mode ({attr}); ldbfx needs one structure for both")
        owned[attr] = getattr(train, attr)
    constants = {k: v for k, v in owned.items() if isinstance(v, torch.Tensor)}
    attributes = {k: v for k, v in owned.items() if not isinstance(v, torch.Tensor)}
    # The graph fixes the dtypes it saw: the forward refuses to run under another autocast.
    return TracedModel(train.graph, None if same else evaluation.graph, constants, attributes, autocast_state())
