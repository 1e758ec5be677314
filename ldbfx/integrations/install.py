"""Train through the rewritten graph while keeping the model object (Hugging Face users' way).

``Trainer``, ``save_pretrained``, ``generate`` and PEFT act on the ``PreTrainedModel`` itself, not
on a ``GraphModule``. :func:`install` therefore routes the model's own ``forward`` through the
transformed module ``gm``: the model object, its class, methods and parameters stay the user's,
and every call that can reach a backward (``torch.is_grad_enabled()``) runs ``gm``'s graph, whose
dropped layers skip their weight gradients. Calls without gradients (evaluation under
``no_grad``, ``generate``) run the model's original ``forward``: the graph computes exactly the
same values, and the original also takes inputs the example batch did not have (a KV cache).

Why not swap leaf modules in place, as torchao's ``quantize_`` does? A dropped layer's saving
comes from the op that consumes the weight, which the graph rewrites wherever the weight is used
(tied embeddings, functional uses); swapping ``nn.Linear`` modules would miss those and need one
Python wrapper per layer on the hot path. Routing ``forward`` keeps one graph, one mask read per
op, and the exact contract already tested for ``gm``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import torch
from torch import nn

from ..errors import LdbfxError
from ..runtime.module import LdbGraphModule, captured_from, changes_since_capture, recheck_modes
from .blocks import install_blocks, uninstall_blocks

__all__ = ["install", "uninstall", "installed", "routed_forward", "check_unchanged"]


class _RoutedForward:
    """The installed ``model.forward``: ``gm`` when gradients are on, else the original."""

    def __init__(self, gm: LdbGraphModule, original, model: nn.Module):
        self.gm, self.original, self.model = gm, original, model
        self.inputs = inspect.signature(gm.forward)  # what the captured graph takes
        # What Hugging Face's Trainer reads to choose the dataset columns it keeps: the model's own
        # inputs, as without ldbfx. A column the example batch lacked (an attention_mask) then
        # reaches the call and is refused below, where the captured inputs alone would have made
        # Trainer drop it silently. **kwargs is what makes Trainer pass num_items_in_batch (and
        # leave the loss of an accumulated step to the model): kept only where the graph takes it.
        try:
            own = inspect.signature(original)
        except (TypeError, ValueError):  # no signature to read: the captured inputs
            own = self.inputs
        self.takes_loss_kwargs = "num_items_in_batch" in self.inputs.parameters
        # The count's dtype as captured: Trainer hands a float (its count divided by the number of
        # devices sharing a batch), a loop may hand an int; the graph fixes one.
        self.items_dtype = next((getattr(n.meta.get("val"), "dtype", None) for n in gm.graph.nodes
                                 if n.op == "placeholder" and n.target == "num_items_in_batch"), None)
        var_keyword = [p for p in own.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        # As Trainer decides for the plain model: its accepts_loss_kwargs (PEFT: the base model's)
        # where it sets one (ConvNext, Gemma3... set False), else whether forward takes **kwargs.
        declared = getattr(_loss_kwargs_targets(model)[-1], "accepts_loss_kwargs", None)
        self.plain_takes_loss_kwargs = bool(var_keyword) if declared is None else bool(declared)
        #: Whether a plain Trainer would pass ``num_items_in_batch`` to this model and the graph
        #: cannot take it (the loss is then averaged per micro-batch and per rank, not per token).
        self.drops_loss_kwargs = self.plain_takes_loss_kwargs and not self.takes_loss_kwargs
        self.__signature__ = own.replace(parameters=[
            p for p in own.parameters.values() if self.takes_loss_kwargs or p not in var_keyword])
        # torch.export orders the graph's inputs as the example batch's keys, which need not be the
        # model's order (a tokenizer gives BERT input_ids, token_type_ids, attention_mask; its
        # forward takes input_ids, attention_mask, token_type_ids). Positional inputs are therefore
        # bound to the model's own signature and passed by name, where the model's signature names
        # the graph's inputs (or takes them in **kwargs: num_items_in_batch); otherwise (a forward
        # with *args) they go in the graph's order.
        self.own = own
        #: Run once, eagerly, with the next training call's inputs before ``gm`` computes it (the
        #: Trainer callback's sensitivity allocation uses it): ``before_call(args, kwargs)``.
        self.before_call = None
        self.by_name = (all(name in own.parameters or var_keyword for name in self.inputs.parameters)
                        and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in own.parameters.values()))
        self.__name__ = self.__qualname__ = "forward"
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        try:
            if args and self.by_name:
                args, kwargs = (), _by_name(self.own.bind(*args, **kwargs))
            self.inputs.bind(*args, **kwargs)
        except TypeError as cause:
            missing = "missing a required argument: 'labels'" in str(cause)  # inspect's wording
            raise LdbfxError(
                f"model.forward was called with inputs {sorted(kwargs)} (+{len(args)} positional), "
                f"which the captured graph cannot take ({cause}): the graph takes exactly the "
                f"inputs of the example batch given to ldbfx.transform: {self.inputs}. "
                + ("Trainer leaves out labels when it computes the loss itself "
                   "(label_smoothing_factor, compute_loss_func): capture without them then. "
                   if missing else "")
                + "Transform again with an example batch that has the inputs of this call, or "
                "ldbfx.uninstall(model)") from None
        items = kwargs.get("num_items_in_batch")
        if items is not None and self.items_dtype is not None:
            items = torch.as_tensor(items)
            if items.is_floating_point() and not self.items_dtype.is_floating_point:
                raise LdbfxError(
                    f"num_items_in_batch arrived as {items.dtype}, but the graph was captured with "
                    f"{self.items_dtype} and would truncate it: capture with a float count, "
                    "example_kwargs={**batch, 'num_items_in_batch': torch.tensor(1.0)}")
            kwargs["num_items_in_batch"] = items.to(self.items_dtype)
        # gm is its own root module: model.train()/eval() set the shared children's flags but
        # not gm's, which picks the train or eval graph. Follow the model's mode.
        self.gm.training = self.model.training
        if self.before_call is not None:
            _run_once(self, args, kwargs)
        if torch.compiler.is_compiling():
            return self.gm(*args, **kwargs)
        try:
            return self.gm(*args, **kwargs)
        except AssertionError as cause:  # torch.export's input guards
            if not str(cause).startswith("Guard failed"):
                raise
            raise LdbfxError(
                f"this batch is outside the shapes the graph was captured for ({cause}): capture "
                "with dynamic_shapes='auto' (the default; LdbCallback(policy, dynamic_shapes=...) "
                "passes it on) from an example whose dimensions are not 1 (export fixes a size-1 "
                "dimension), or give every batch the example's shapes (Trainer: "
                "dataloader_drop_last=True and padding to one length)") from None

    def __deepcopy__(self, memo):  # a copied model routes to a copy of gm over its own modules
        return _RoutedForward(copy.deepcopy(self.gm, memo), copy.deepcopy(self.original, memo),
                              copy.deepcopy(self.model, memo))

    def __reduce__(self):  # torch.save(model) pickles the instance attribute that install set
        raise LdbfxError(
            "a model with an ldbfx graph installed cannot be pickled (torch.save(model)): save "
            "model.state_dict() or model.save_pretrained(...), which hold the same weights, or "
            "ldbfx.uninstall(model) first")


@torch._dynamo.disable
def _run_once(routed: _RoutedForward, args: tuple, kwargs: dict) -> None:
    # Outside any compiled graph: under torch.compile, arming it costs one recompile, and the
    # cached graph for "nothing armed" serves again after.
    hook, routed.before_call = routed.before_call, None
    hook(args, kwargs)


def _by_name(bound: inspect.BoundArguments) -> dict[str, Any]:
    """A call's arguments by parameter name, a ``**kwargs`` parameter's entries spread out."""
    named = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


#: Hugging Face's switches for activation checkpointing (the second is the newer name, not in 5.0).
_CHECKPOINTING = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


def _refuse_checkpointing(*args, **kwargs):
    raise LdbfxError(
        "gradient checkpointing cannot be enabled while a whole-model ldbfx graph is installed: the "
        "graph does not checkpoint, so activation memory would silently stay as without it. "
        "Install per block instead, where each block checkpoints as the model's own: "
        "ldbfx.install(model, gm, blocks='auto', example_kwargs=batch), or "
        "LdbCallback(policy, blocks='auto') (Trainer's gradient_checkpointing=True chooses it)")


def _loss_kwargs_targets(model: nn.Module) -> list[nn.Module]:
    """The model, and PEFT's base model: where Trainer looks for ``accepts_loss_kwargs``."""
    targets = [model]
    base = getattr(model, "get_base_model", None)
    if callable(base) and isinstance(base(), nn.Module) and base() is not model:
        targets.append(base())
    return targets


def install(model: nn.Module, gm: LdbGraphModule, *, blocks: Any = None, example_args: tuple | None = None,
            example_kwargs: dict[str, Any] | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Makes ``model.forward`` train through ``gm`` (transformed from ``model``).

    After this, anything that calls the model (Hugging Face ``Trainer``, a plain loop, PEFT's
    wrapper) trains through the rewritten graph while ``model`` stays the same object:
    ``save_pretrained``, ``generate`` and ``state_dict`` work as before. With gradients on, the
    call must pass exactly the example batch's inputs; without gradients, the original forward
    runs (same values). Trainer passes ``num_items_in_batch`` (and leaves the loss of an
    accumulated step to the model, normalised per token) only if the example batch had it, as a
    0-d float tensor; otherwise it averages the loss per micro-batch (``LdbCallback`` warns).
    ``model.activation_checkpointing_enable()`` (and its old name,
    ``gradient_checkpointing_enable``) is refused while installed.

    With ``blocks``, the model keeps its module boundaries instead (FSDP2 per block, activation
    checkpointing, ``block.compile()``, hooks on blocks): its own ``forward`` runs, and each block
    runs its own rewritten graph as its ``forward``; ``gm`` stays the model's analysis and state,
    what :func:`ldbfx.set_dropped` and the policies take (see :mod:`ldbfx.integrations.blocks`).
    Layers outside the blocks then always train. Install before ``fully_shard``,
    ``checkpoint_wrapper`` and Hugging Face's checkpointing switch.

    Args:
        model: the model given to :func:`ldbfx.transform`.
        gm: the module it returned.
        blocks: ``None`` (the whole graph), ``"auto"`` (Hugging Face's ``_no_split_modules``, the
            decoder layers), a module class or tuple of classes, or qualified module names.
        example_args, example_kwargs: for a ``gm`` captured with ``torch.export``, the example
            batch (each block is captured from the inputs it receives in one call of it).
        param_dtype: for a ``gm`` captured with ``torch.export``, the dtype the blocks compute in
            under FSDP2's ``MixedPrecisionPolicy(param_dtype=...)`` (an exported graph fixes the
            dtypes it saw): each block is captured with its parameters and inputs in it.

    Returns:
        ``model`` itself.

    Raises:
        LdbfxError: ``gm`` was not transformed from ``model``, or a graph is already installed.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> gm = ldbfx.transform(model)
        >>> ldbfx.install(model, gm) is model
        True
        >>> ldbfx.set_dropped(gm, ["4"])
        >>> model(torch.randn(2, 4)).sum().backward()   # through gm: layer 4 skips its dW
        >>> model[4].weight.grad is None
        True
        >>> ldbfx.uninstall(model)
    """
    if not isinstance(gm, LdbGraphModule):
        raise TypeError(f"install expects the module returned by ldbfx.transform, got {type(gm).__name__}")
    if "_ldbfx_installed" in model.__dict__:
        raise LdbfxError("an ldbfx graph is already installed on this model; ldbfx.uninstall(model) first")
    if captured_from(gm, model):
        check_unchanged(model, gm)  # say what changed since, before "another model's graph"
    mine = dict(model.named_parameters())
    if any(mine.get(name) is not p for name, p in gm.named_parameters()):
        raise LdbfxError("gm was not transformed from this model (its parameters are not the "
                         "model's); call ldbfx.install(model, ldbfx.transform(model, ...))")
    if blocks is None and param_dtype is not None:
        raise LdbfxError("param_dtype is for a per-block install (blocks=...): the whole graph takes the "
                         "dtype it was captured in")
    if blocks is not None:
        # The model's own forward stays (its saved entry says so: uninstall leaves it alone).
        install_blocks(model, gm, blocks, example_args, example_kwargs, param_dtype, {"keeps_forward": True})
        return model
    routed = _RoutedForward(gm, model.forward, model)
    _refuse_unpassed_loss_kwargs(model, routed)
    saved = {"forward": model.__dict__.get("forward")}
    model.forward = routed
    _route(model, gm, routed, saved)
    return model


def _refuse_unpassed_loss_kwargs(model: nn.Module, routed: _RoutedForward) -> None:
    if routed.takes_loss_kwargs and not routed.plain_takes_loss_kwargs:
        raise LdbfxError(
            f"the example batch has num_items_in_batch, but {type(model).__name__} takes no loss "
            "kwargs (accepts_loss_kwargs is False, or forward has no **kwargs), so Trainer never "
            "passes it and leaves the loss of an accumulated step to itself: capture without it")


def _route(model: nn.Module, gm: LdbGraphModule, routed: _RoutedForward, saved: dict[str, Any]) -> None:
    """What :func:`install` changes on ``model`` besides ``forward``, recorded in ``saved`` for
    :func:`uninstall`."""
    for name in _CHECKPOINTING:
        model.__dict__[name] = _refuse_checkpointing
    # model.train()/eval() set the modes of gm's modules without gm knowing: an exported graph
    # checks them at its next call (a pass over the modules, as train() itself makes).
    saved.setdefault("train", model.__dict__.get("train"))
    model.__dict__["train"] = functools.partial(_train_and_check, model, gm)
    for target in _loss_kwargs_targets(model):  # what Trainer reads before the signature
        saved.setdefault("accepts_loss_kwargs", []).append((target, target.__dict__.get("accepts_loss_kwargs")))
        target.__dict__["accepts_loss_kwargs"] = routed.takes_loss_kwargs
    model.__dict__["_ldbfx_installed"] = saved


def _train_and_check(model: nn.Module, gm: LdbGraphModule, mode: bool = True) -> nn.Module:
    type(model).train(model, mode)
    recheck_modes(gm)
    return model


def check_unchanged(model: nn.Module, gm: LdbGraphModule) -> None:
    """Raises :class:`LdbfxError` if ``model`` changed since ``gm`` was captured in a way the
    graph would not follow (see :func:`ldbfx.module.changes_since_capture`)."""
    changes = changes_since_capture(gm, model)
    if changes:
        raise LdbfxError(
            f"the model changed after ldbfx.transform, and its captured graph would silently not "
            f"follow: {'; '.join(changes)}. Make such changes before ldbfx.transform(model, ...), "
            "then transform and install again (Trainer makes two itself: set neftune_noise_alpha="
            "None, and give model.config the tokenizer's pad/bos/eos token ids before transform)")


def installed(model: nn.Module) -> LdbGraphModule | None:
    """The graph installed on ``model`` by :func:`install`, or None.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> ldbfx.installed(model) is None
        True
        >>> gm = ldbfx.transform(model)
        >>> ldbfx.install(model, gm) is model and ldbfx.installed(model) is gm
        True
    """
    saved = model.__dict__.get("_ldbfx_installed")
    if saved is not None and "graph" in saved:  # per block
        return saved["graph"]
    routed = routed_forward(model)
    return None if routed is None else routed.gm


def routed_forward(model: nn.Module) -> _RoutedForward | None:
    """The installed forward, also where accelerate wrapped it for mixed precision
    (``Trainer(bf16=True)`` keeps it as ``model._original_forward``), and once an
    :func:`install_on_first_call` capture took place."""
    for forward in (model.__dict__.get("forward"), model.__dict__.get("_original_forward")):
        if isinstance(forward, _RoutedForward):
            return forward
        if getattr(forward, "captures_on_first_call", False):  # ldbfx.integrations.first_call's
            return forward.routed
    return None


def uninstall(model: nn.Module) -> None:
    """Restores ``model``'s own ``forward`` (and what :func:`install` changed). No-op if none.

    The graph stays usable on its own (``gm(x)``); the model trains without ldbfx again. An
    autocast wrapper that accelerate put around the installed forward (``Trainer(bf16=True)``)
    goes with it: the next ``Trainer`` wraps the model again.

    Example:
        >>> import torch, ldbfx
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> gm = ldbfx.transform(model)
        >>> ldbfx.install(model, gm) is model
        True
        >>> ldbfx.uninstall(model)
        >>> ldbfx.installed(model) is None, "forward" in model.__dict__
        (True, False)
    """
    saved: dict[str, Any] | None = model.__dict__.pop("_ldbfx_installed", None)
    if saved is None:
        return
    if not saved.get("keeps_forward"):
        model.__dict__.pop("forward", None)
        if saved["forward"] is not None:
            model.__dict__["forward"] = saved["forward"]
    original = model.__dict__.get("_original_forward")
    if isinstance(original, _RoutedForward) or getattr(original, "captures_on_first_call", False):
        # accelerate's mixed-precision wrapper (Trainer(bf16=True)) kept it there; dropped with it
        del model.__dict__["_original_forward"]
    for name in _CHECKPOINTING:
        model.__dict__.pop(name, None)
    _unroute(model, saved)
    uninstall_blocks(model, saved)


def _unroute(model: nn.Module, saved: dict[str, Any]) -> None:
    """Undoes what :func:`_route` changed (``saved`` then no longer holds it)."""
    if "train" in saved:
        model.__dict__.pop("train", None)
        train = saved.pop("train")
        if train is not None:
            model.__dict__["train"] = train
    for target, value in saved.pop("accepts_loss_kwargs", []):
        target.__dict__.pop("accepts_loss_kwargs", None)
        if value is not None:
            target.__dict__["accepts_loss_kwargs"] = value
