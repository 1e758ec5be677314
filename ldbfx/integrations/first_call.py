"""Capture on the first training call: for callers that never see a batch before training.

:func:`install_on_first_call` puts a forward on the model that, armed, captures the model from its
first call with gradients on (that call's inputs are the example batch, under its autocast and on
its device) and routes it through the graph, or the blocks' graphs, from then on. The Hugging Face
callback (:class:`ldbfx.hf.LdbCallback`, its one-line form) uses it: Trainer prepares the batch
(device, autocast, ``num_items_in_batch``) only inside ``train()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import LdbfxError
from ..runtime.module import LdbGraphModule
from .block_capture import find_blocks, outside_blocks_hidden
from .blocks import install_blocks, uninstall_blocks
from .install import (
    _CHECKPOINTING,
    _refuse_checkpointing,
    _refuse_unpassed_loss_kwargs,
    _route,
    _RoutedForward,
    _unroute,
)

__all__ = ["install_on_first_call", "capturing_forward"]


class _CapturingForward:
    """The installed ``forward`` of :func:`install_on_first_call`. Armed, the first call with
    gradients captures the model from its own inputs and ``gm`` runs from then on; disarmed (and
    without gradients), the model's own forward runs."""

    #: What :func:`ldbfx.install.routed_forward` and ``uninstall`` recognise it by (they cannot
    #: import this module, which imports theirs).
    captures_on_first_call = True

    def __init__(self, model: nn.Module, on_capture: Callable[[LdbGraphModule], None], options: dict[str, Any],
                 blocks: Any = None):
        self.model, self.original = model, model.forward
        self.on_capture, self.options, self.blocks = on_capture, options, blocks
        self.armed = True
        self.routed: _RoutedForward | None = None
        #: A per-block capture's graph (the model's own forward runs, through its blocks' graphs).
        self.per_block: LdbGraphModule | None = None
        try:  # what Trainer reads to choose the columns it keeps: the model's own inputs
            self.__signature__ = inspect.signature(self.original)
        except (TypeError, ValueError):
            pass
        self.__name__ = self.__qualname__ = "forward"
        self.__doc__ = getattr(self.original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        routed = self.routed
        if routed is not None:
            return routed(*args, **kwargs)
        if self.per_block is not None or not (self.armed and torch.is_grad_enabled()):
            return self.original(*args, **kwargs)
        return _capture_now(self, args, kwargs)

    def disarm(self) -> None:
        """Back to the model's own forward (what the capture routed undone), until armed again;
        the next armed call captures afresh."""
        saved = self.model.__dict__["_ldbfx_installed"]
        if self.routed is not None:
            _unroute(self.model, saved)
            self.routed = None
        if self.per_block is not None:
            uninstall_blocks(self.model, saved)
            self.per_block = None
        self.armed = False

    def __reduce__(self):
        raise LdbfxError(
            "a model that ldbfx captures on its first training call cannot be pickled or copied "
            "(torch.save(model), copy.deepcopy): save model.state_dict() or model.save_pretrained(...), "
            "or ldbfx.uninstall(model) first")


@torch._dynamo.disable
def _capture_now(capturing: _CapturingForward, args: tuple, kwargs: dict):
    # Eager, also under torch.compile (Trainer(torch_compile=True)): the compiled caller breaks
    # its graph here once, and traces through gm's graph from the next call on.
    from ..rewrite.driver import transform

    model = capturing.model
    items = kwargs.get("num_items_in_batch")
    example = kwargs
    if items is not None and not (isinstance(items, torch.Tensor) and items.is_floating_point()):
        # Trainer hands an int or a float; the graph must take any count without recompiling.
        device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        example = {**kwargs, "num_items_in_batch": torch.tensor(float(items), device=device)}
    # torch.export calls the model's own forward: the installed one (and accelerate's autocast
    # wrapper over it, whose autocast is in effect now) step aside while it does.
    hidden = {k: model.__dict__.pop(k) for k in ("forward", "_original_forward") if k in model.__dict__}
    try:
        if capturing.blocks is None:
            gm = transform(model, example_args=args, example_kwargs=example, **capturing.options)
        else:  # Trainer switched checkpointing on before this batch: the blocks keep it
            with outside_blocks_hidden(model, [b for _, b in find_blocks(model, capturing.blocks)]):
                gm = transform(model, example_args=args, example_kwargs=example, **capturing.options)
            install_blocks(model, gm, capturing.blocks, args, example, None, model.__dict__["_ldbfx_installed"])
    finally:
        model.__dict__.update(hidden)
    if capturing.blocks is None:
        routed = _RoutedForward(gm, capturing.original, model)
        _refuse_unpassed_loss_kwargs(model, routed)
        _route(model, gm, routed, model.__dict__["_ldbfx_installed"])
        capturing.routed = routed
    else:
        capturing.per_block = gm
    try:
        capturing.on_capture(gm)
    except BaseException:
        capturing.disarm()  # the model's own forward again, not a graph without its policy
        raise
    return capturing(*args, **kwargs)  # through the graph, or the blocks' graphs


def install_on_first_call(model: nn.Module, on_capture: Callable[[LdbGraphModule], None], *, blocks: Any = None,
                          **transform_options: Any) -> nn.Module:
    """Like :func:`install`, but captures ``model`` from its first call with gradients on.

    That call's inputs are the example batch (``ldbfx.transform(model, example_args=...,
    example_kwargs=..., **transform_options)``, under the autocast and on the device of that
    call; ``num_items_in_batch`` is captured as a float tensor, so the count stays an input);
    ``on_capture(gm)`` runs right after, and the model trains through ``gm`` from that call on.
    For callers that never see a batch before training (:class:`ldbfx.hf.LdbCallback`).
    :func:`uninstall` removes it, captured or not.

    Args:
        model: the model to capture and train through the graph.
        on_capture: called with the transformed module once it exists; if it raises, the model
            keeps its own forward and the error propagates.
        blocks: as :func:`install`'s: install a graph per block, captured from that call's
            inputs to each block (activation checkpointing may then be on).
        **transform_options: :func:`ldbfx.transform`'s options (``keep_first_blocks``...).

    Returns:
        ``model`` itself.

    Raises:
        LdbfxError: a graph is already installed on ``model``.

    Example:
        >>> import torch, ldbfx
        >>> from ldbfx.integrations.first_call import install_on_first_call
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
        >>> graphs = []
        >>> _ = install_on_first_call(model, graphs.append)
        >>> model(torch.randn(2, 4)).sum().backward()       # captured now, then run through gm
        >>> ldbfx.installed(model) is graphs[0]
        True
        >>> ldbfx.uninstall(model)
    """
    if "_ldbfx_installed" in model.__dict__:
        raise LdbfxError("an ldbfx graph is already installed on this model; ldbfx.uninstall(model) first")
    capturing = _CapturingForward(model, on_capture, transform_options, blocks)
    saved = {"forward": model.__dict__.get("forward")}
    model.forward = capturing
    if blocks is None:  # per block, the blocks checkpoint as the model's own do
        for name in _CHECKPOINTING:
            model.__dict__[name] = _refuse_checkpointing
    model.__dict__["_ldbfx_installed"] = saved
    return model


def capturing_forward(model: nn.Module) -> _CapturingForward | None:
    """The forward :func:`install_on_first_call` installed (beneath accelerate's wrapper too)."""
    for forward in (model.__dict__.get("forward"), model.__dict__.get("_original_forward")):
        if isinstance(forward, _CapturingForward):
            return forward
    return None
