"""Per-block install: the model's own ``forward`` runs, and each block runs its own rewritten graph.

A whole-model graph calls the layers' ops, never the modules' ``forward``, so the tools that
hang on a block's call see nothing: FSDP2's ``fully_shard(block)`` (it unshards in the block's
pre-forward hook), activation checkpointing (``checkpoint_wrapper``, Hugging Face's
``gradient_checkpointing_enable()``, ``torch.utils.checkpoint`` in a forward), regional
compilation (``block.compile()``) and any hook on a block. ``ldbfx.install(model, gm,
blocks=...)`` keeps those boundaries:

* ``gm`` (the whole model's :func:`ldbfx.transform`) stays the *analysis*: the layer order, which
  layers and branches may drop (``keep_first``, ``keep_last_blocks``...), and the model's state that
  :func:`ldbfx.set_dropped`, :func:`ldbfx.set_dropped_branches` and every policy write. It is not
  run.
* Each block is captured alone (``torch.fx``, or ``torch.export`` from the inputs it received in one
  eager call of the example batch), rewritten, and installed as *that block's* ``forward``. The
  block object, its parameters and the hooks on it stay; the model's own ``forward`` calls it
  through ``nn.Module.__call__``.
* The blocks' states follow the model's: writing a mask writes each block's through a map from
  global to local indices (:class:`ldbfx.state.BlockLink`), and each block's backward records what
  it skipped for the optimizer hook, as a whole graph does.
* Identical blocks share one generated class and ``forward``: Dynamo guards on the code and the
  class, so ``block.compile()`` on each block compiles once for all of them, for any mask.

Layers outside every block (the embeddings, the final norm, a language model's head) run in the
model's own ``forward``, unrewritten: they always train, and :func:`ldbfx.layers` says so.

Example:
    >>> import torch, ldbfx
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), *[Block() for _ in range(4)], torch.nn.Linear(8, 2))
    >>> gm = ldbfx.transform(model, keep_first=1, keep_first_blocks=0, keep_last_blocks=0)
    >>> _ = ldbfx.install(model, gm, blocks=Block)
    >>> ldbfx.set_dropped_branches(gm, ["2"])
    >>> model(torch.randn(2, 8)).sum().backward()   # model's own forward; block 2's branch detached
    >>> model[2].fc.weight.grad is None, model[3].fc.weight.grad is None
    (True, False)
    >>> ldbfx.uninstall(model)
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import torch
from torch import nn

from ..errors import LdbfxError
from ..records import Branch, Layer
from ..runtime.module import LdbGraphModule, recheck_modes
from ..runtime.state import BlockLink
from .block_capture import (
    call_kinds,
    capture_block,
    example_variants,
    find_blocks,
    record_inputs,
    refuse_shared,
    share_code,
    structure_key,
)

__all__ = ["install_blocks", "uninstall_blocks", "block_graphs", "InstalledBlock"]

#: Where a block keeps its :class:`InstalledBlock` (its ``forward`` is ``_block_forward`` bound to it).
ROUTED_ATTR = "_ldbfx_block"

OUTSIDE = "outside the blocks (per-block install: the model's own forward runs it, unrewritten)"


class InstalledBlock:
    """What a per-block install keeps on each block (``block._ldbfx_block``); the block's
    ``forward`` is :func:`_block_forward` bound to the block.

    Attributes:
        block: the block.
        graph: its rewritten graph (its state follows the model's, see :class:`BlockLink`).
        graphs: for exported graphs, the graph per structure of the inputs it was captured with
            (which are ``None``, plain values such as ``use_cache=False``; an unpadded and a padded
            batch where the example batch had an ``attention_mask``): a call with another
            structure is refused, not silently computed without what the capture lacked. ``None``
            for an FX graph, which takes any.
        own: the block's own instance ``forward`` where it had one (else the class's runs, looked
            up at each call: ``fully_shard`` swaps the block's class, and Hugging Face wraps the
            new class's ``forward`` again).
        hf_checkpointing: the block is a Hugging Face ``GradientCheckpointingLayer``, which
            checkpoints in its class's ``forward``; an instance's ``forward`` bypasses that, so
            :func:`_block_forward` applies the same rule around the graph.
    """

    def __init__(self, block: nn.Module, graph: LdbGraphModule, graphs: dict[tuple, LdbGraphModule] | None):
        self.block, self.graph, self.graphs = block, graph, graphs
        self.own = block.__dict__.get("forward")
        self.hf_checkpointing = any(c.__name__ == "GradientCheckpointingLayer" for c in type(block).__mro__)

    def original(self, *args, **kwargs):
        """The block's own forward."""
        if self.own is not None:
            return self.own(*args, **kwargs)
        return type(self.block).forward(self.block, *args, **kwargs)

    def __reduce__(self):
        # deepcopy too (an EMA copy): a copy's block graphs would not follow the model's masks.
        raise LdbfxError("a model with ldbfx block graphs installed cannot be pickled or copied (torch.save(model), "
                         "copy.deepcopy): save model.state_dict(), or ldbfx.uninstall(model) first and install "
                         "again on each copy")


def _block_forward(block: nn.Module, *args, **kwargs):
    """What an installed block's ``forward`` runs (bound to the block: one function for every
    block, so Dynamo, which guards on the identity of a callable it meets inside a checkpoint,
    compiles one graph for all).

    Hugging Face's checkpointing is applied around the graph as its class would. A recompute runs
    the graph again in the backward and reads the masks then (the same as the forward's: masks
    change between steps); the skips it records again are the same set. A dropped branch saves
    nothing (it runs without autograd, ``ops.branch_start``), and a non-reentrant checkpoint
    (Hugging Face's default) recomputes only what the backward unpacks: neither a block whose
    branches are all dropped nor a dropped last branch is recomputed. A reentrant one recomputes
    every block whole."""
    routed = block.__dict__[ROUTED_ATTR]
    if not torch.is_grad_enabled():  # no backward: the block's own code, same values
        return routed.original(*args, **kwargs)
    graph = routed.graph
    if routed.graphs is not None:
        kinds = call_kinds(args, kwargs)
        graph = routed.graphs.get(structure_key(kinds))
        if graph is None:
            raise LdbfxError(_structure_error(next(iter(routed.graphs)), kinds))
    graph.training = block.training  # gm is not the block's child: follow its mode
    if routed.hf_checkpointing and block.gradient_checkpointing and block.training:
        return block._gradient_checkpointing_func(functools.partial(graph, **_without_cache(block, kwargs)), *args)
    return graph(*args, **kwargs)


def _without_cache(block: nn.Module, kwargs: dict) -> dict:
    """What Hugging Face's ``forward_with_checkpointing`` drops before checkpointing: the cache a
    recompute would update twice. (The graph was captured without one: this only keeps the
    structure HF's own path gives.)"""
    if kwargs.get("use_cache"):
        kwargs = {**kwargs, "use_cache": False}
    if not getattr(block, "_can_checkpoint_with_cache", False):
        for name in ("cache", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs = {**kwargs, name: None}
    return kwargs


def _structure_error(captured: tuple, now: tuple) -> str:
    (cargs, ckw), (nargs, nkw) = captured, now
    ckw = dict(ckw)  # (a key: its items)
    differ = [k for k in sorted(set(ckw) | set(nkw)) if ckw.get(k, "absent") != nkw.get(k, "absent")]
    said = ", ".join(f"{k}: captured {_say(ckw.get(k, 'absent'))}, now {_say(nkw.get(k, 'absent'))}" for k in differ)
    if cargs != nargs:
        said = (said + "; " if said else "") + f"positional inputs: captured {_say(cargs)}, now {_say(nargs)}"
    return (f"this block was called with inputs of another structure than its graph was captured with ({said}): "
            "an exported graph fixes which inputs are None and the plain values it saw, so it would silently "
            "compute without them. Capture from an example batch shaped like the training batches (with their "
            "attention_mask if they are padded; with num_items_in_batch=torch.tensor(1.0) where Trainer passes "
            "it, which Hugging Face hands on to every decoder layer), then install again")


def _say(kind: Any) -> str:
    if kind is torch.Tensor:
        return "a tensor"
    if isinstance(kind, tuple):
        return "(" + ", ".join(_say(k) for k in kind) + ")"
    if isinstance(kind, type):
        return kind.__name__
    return repr(kind)


def _link(gm: LdbGraphModule, name: str, graph: LdbGraphModule, by_layers: dict[frozenset, int]) -> BlockLink:
    """Maps the model's layer and branch indices to the block's. Layers by parameter identity
    (names differ by the block's prefix, and a tied parameter is one layer however it is used);
    branches by the layers inside them (a branch's name is where its ops sit, which the block's
    own graph may place one module deeper), else by name."""
    state = gm.ldbfx_state
    owner = {id(p): index for index in range(len(gm.ldbfx_layers)) for p in state.params(index)}
    layers: dict[int, list[int]] = {}
    global_of: dict[int, int] = {}
    for local in graph.ldbfx_layers:
        found = {owner.get(id(p)) for p in graph.ldbfx_state.params(local.index)}
        if len(found) != 1 or None in found:
            raise LdbfxError(f"block {name!r}: its layer {local.name!r} matches no single layer of the model's "
                             "graph (was the model changed after ldbfx.transform?)")
        global_of[local.index] = index = found.pop()
        layers.setdefault(index, []).append(local.index)
    branches = {}
    local_index = graph.ldbfx_capture.layer_index
    for local in graph.ldbfx_branches:
        inside = frozenset(global_of[local_index[n]] for n in local.layers)
        index = by_layers.get(inside) if inside else None
        if index is None:
            index = gm.ldbfx_capture.branch_index.get(f"{name}.{local.name}" if local.name else name)
        if index is not None:
            branches[index] = local.index
    return BlockLink(graph.ldbfx_state, {g: tuple(v) for g, v in layers.items()}, branches)


def _served(gm: LdbGraphModule, model: nn.Module, blocks: list[tuple[str, nn.Module]],
            links: list[BlockLink]) -> tuple[tuple[Layer, ...], tuple[Branch, ...]]:
    """The analysis's layers and branches, those the blocks cannot serve made ineligible: a layer
    with a parameter of a module outside every block (the root's forward also uses it there,
    unrewritten), or with no use inside a block graph; a branch no block graph gates."""
    inside = {id(p) for _, block in blocks for p in block.parameters()}
    linked = {g for link in links for g in link.layers}
    gated = {g for link in links for g in link.branches}
    state = gm.ldbfx_state
    def reason(layer: Layer) -> str:
        if not all(id(p) in inside for p in state.params(layer.index)):
            return OUTSIDE
        return "" if layer.index in linked else "no block's graph uses it (the model's forward does, unrewritten)"

    layers = tuple(
        layer if not layer.eligible or not reason(layer) else dataclasses.replace(layer, eligible=False, reason=reason(layer))
        for layer in gm.ldbfx_layers)
    branches = tuple(
        branch if not branch.eligible or branch.index in gated
        else dataclasses.replace(branch, eligible=False, reason="no block's graph gates it (outside the blocks)")
        for branch in gm.ldbfx_branches)
    return layers, branches


def install_blocks(model: nn.Module, gm: LdbGraphModule, blocks: Any, example_args: tuple | None,
                   example_kwargs: dict | None, param_dtype: torch.dtype | None, saved: dict[str, Any]) -> None:
    """Captures, links and installs every block of ``model`` (see the module doc), and makes
    ``model.train()``/``eval()`` recheck the blocks' modes; what it changed goes into ``saved``,
    which becomes ``model._ldbfx_installed`` (:func:`uninstall_blocks` undoes it).
    """
    state = gm.ldbfx_state
    if state.rows:
        raise LdbfxError("frozen rows (ChannelDropBack) are not served by a per-block install: "
                         "ldbfx.set_frozen_rows(gm, {}) first, or install the whole graph")
    if state.pinned_eval:
        raise LdbfxError("Learn&Drop's graph split is not served by a per-block install: install the whole graph")
    found = find_blocks(model, blocks)
    capture = gm.ldbfx_capture
    inputs: dict[str, tuple] | None = None
    if capture.exported:
        if example_args is None and example_kwargs is None:
            raise LdbfxError(
                "gm was captured with torch.export, so each block is too, from the inputs it receives "
                "in one call of the example batch: ldbfx.install(model, gm, blocks=..., "
                "example_kwargs=batch) with the batch given to ldbfx.transform")
        # Per block: inputs by structure (the example batch's first).
        inputs = {name: {} for name, _ in found}
        for example in example_variants(dict(example_kwargs or {})):
            for name, recorded in record_inputs(model, found, tuple(example_args or ()), example).items():
                inputs[name].setdefault(structure_key(call_kinds(*recorded)), recorded)
    elif param_dtype is not None:
        raise LdbfxError("param_dtype is for graphs captured with torch.export, which fix the dtypes they see; "
                         "an FX graph follows the parameters' dtype as it is: leave it out")
    # One graph per block and input structure; identical blocks share code per structure.
    variants: list[dict[tuple | None, LdbGraphModule]] = []
    for name, block in found:
        recorded = {None: None} if inputs is None else inputs[name]
        variants.append({key: capture_block(name, block, gm, example, param_dtype) for key, example in recorded.items()})
    for key in variants[0]:
        share_code([v[key] for v in variants if key in v])
    graphs = [(name, graph) for (name, _), v in zip(found, variants) for graph in v.values()]
    index = capture.layer_index
    by_layers: dict[frozenset, int] = {}
    for branch in gm.ldbfx_branches:
        if branch.layers:
            key = frozenset(index[n] for n in branch.layers)
            if key in by_layers:  # the same layers in two branches: one block called twice
                refuse_shared([branch.name])
            by_layers[key] = branch.index
    links = [_link(gm, name, graph, by_layers) for name, graph in graphs]
    layers, branches = _served(gm, model, found, links)
    gm.__dict__["ldbfx_capture"] = dataclasses.replace(capture, layers=layers, branches=branches)
    state.link_blocks(tuple(links))
    for link in links:  # an explicit dense_gradients() choice made before install holds per block too
        link.state.dense, link.state.dense_auto = state.dense, state.dense_auto
    state.set_dropped(tuple(i for i in state.dropped if layers[i].eligible))  # the blocks take the masks
    state.set_dropped_branches(tuple(i for i in state.dropped_branches if branches[i].eligible))
    installed = []
    for (name, block), by_key in zip(found, variants):
        installed.append((block, block.__dict__.get("forward")))
        block.__dict__[ROUTED_ATTR] = InstalledBlock(block, next(iter(by_key.values())),
                                                     None if inputs is None else by_key)
        block.__dict__["forward"] = types.MethodType(_block_forward, block)
    saved.update(graph=gm, capture=capture, blocks=installed)
    saved.setdefault("train", model.__dict__.get("train"))
    model.__dict__["train"] = functools.partial(_train_and_check_blocks, model)
    model.__dict__["_ldbfx_installed"] = saved


def _train_and_check_blocks(model: nn.Module, mode: bool = True) -> nn.Module:
    """The installed ``model.train``: each exported block graph checks its modules' modes at
    its next call (``model.train()`` set them without the graphs knowing)."""
    type(model).train(model, mode)
    for module in model.modules():
        routed = module.__dict__.get(ROUTED_ATTR)
        if routed is not None:
            for graph in (routed.graphs or {None: routed.graph}).values():
                recheck_modes(graph)
    return model


def uninstall_blocks(model: nn.Module, saved: dict[str, Any]) -> None:
    """Undoes :func:`install_blocks` (no-op if ``saved`` holds none): each block's own
    ``forward``, ``model.train``, and the analysis's capture; the drops stay (eligible per block,
    eligible in the whole graph)."""
    if "graph" not in saved:
        return
    for block, forward in saved.pop("blocks"):
        block.__dict__.pop("forward", None)
        block.__dict__.pop(ROUTED_ATTR, None)
        if forward is not None:
            block.__dict__["forward"] = forward
    gm = saved.pop("graph")
    gm.ldbfx_state.absorb_block_records()  # a step after uninstall still skips what they skipped
    gm.ldbfx_state.link_blocks(())
    gm.__dict__["ldbfx_capture"] = saved.pop("capture")
    if "train" in saved:  # (uninstall's _unroute may have restored it already)
        model.__dict__.pop("train", None)
        train = saved.pop("train")
        if train is not None:
            model.__dict__["train"] = train


def block_graphs(model: nn.Module) -> dict[nn.Module, LdbGraphModule]:
    """Each installed block and the graph it runs for the example batch's input structure (empty
    where no per-block install is)."""
    return {m: m.__dict__[ROUTED_ATTR].graph for m in model.modules() if ROUTED_ATTR in m.__dict__}
