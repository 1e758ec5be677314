"""Capturing blocks for a per-block install (:mod:`ldbfx.integrations.blocks`): which modules are
blocks, the inputs each receives in a call of the example batch, and each block's own rewritten
graph, captured with everything that stays outside it (checkpointing switches, hooks on it) set
aside and, for FSDP2's mixed precision, in the dtype it will compute in.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import LdbfxError
from ..rewrite.driver import transform
from ..runtime.module import LdbGraphModule

__all__ = ["AUTO", "find_blocks", "call_kinds", "structure_key", "example_variants", "record_inputs",
           "refuse_shared", "outside_blocks_hidden", "capture_block", "share_code"]

#: ``blocks="auto"``: Hugging Face's ``_no_split_modules`` (the decoder layers FSDP and
#: checkpointing wrap).
AUTO = "auto"


def find_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model``: ``(qualified name, module)``, outermost matches, in module order.

    Args:
        model: the model.
        blocks: ``"auto"`` (Hugging Face's ``_no_split_modules`` classes), a module class or a
            tuple of classes, or an iterable of qualified module names.

    Raises:
        LdbfxError: nothing matches, or ``"auto"`` on a model that names no blocks.
    """
    if blocks == AUTO:
        kinds = set(getattr(model, "_no_split_modules", None) or ())
        if not kinds:
            raise LdbfxError(
                f"blocks='auto' reads Hugging Face's _no_split_modules, which {type(model).__name__} does "
                "not set: name the blocks, blocks=(MyBlock,) or blocks=['layers.0', 'layers.1', ...]")
        matches = lambda name, m: type(m).__name__ in kinds  # noqa: E731
    elif isinstance(blocks, type) or (isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks)):
        matches = lambda name, m: isinstance(m, blocks)  # noqa: E731
    elif isinstance(blocks, Iterable) and not isinstance(blocks, str):
        names = set(blocks)
        missing = names - {name for name, _ in model.named_modules()}
        if missing:
            raise LdbfxError(f"blocks names modules the model does not have: {sorted(missing)}")
        matches = lambda name, m: name in names  # noqa: E731
    else:
        raise TypeError(f"blocks must be 'auto', a module class (or tuple of them) or module names, got {blocks!r}")
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and matches(name, module) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    if not found:
        raise LdbfxError(f"no module of {type(model).__name__} matches blocks={blocks!r}")
    return found


def _input_kind(value: Any) -> Any:
    """What a block's graph fixed about one input: a tensor is an input, ``None`` and plain
    values (``use_cache=False``) are baked in, a tuple or list is each of its items."""
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, (tuple, list)):
        return tuple(_input_kind(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value)


def call_kinds(args: tuple, kwargs: dict) -> tuple:
    return tuple(_input_kind(a) for a in args), {k: _input_kind(v) for k, v in kwargs.items()}


def structure_key(kinds: tuple) -> tuple:
    """``kinds`` as a dict key (keyword inputs in name order)."""
    return kinds[0], tuple(sorted(kinds[1].items()))


def example_variants(kwargs: dict) -> list[dict]:
    """The example batch, and where it has an unpadded ``attention_mask``, the same batch with
    its first position masked: Hugging Face hands the blocks no mask for an unpadded batch and a
    mask tensor for a padded one, two input structures an exported block graph fixes. Both are
    captured, so padded and unpadded batches train alike."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 1 and bool(mask.all())):
        return [kwargs]
    padded = mask.clone()
    padded[:, 0] = 0
    return [kwargs, {**kwargs, "attention_mask": padded}]


def record_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Each block's inputs in one eager, gradient-free call of the example batch (buffers such
    as BatchNorm statistics restored after)."""
    seen: dict[str, tuple] = {}
    calls: dict[str, int] = {}

    def keep(value):
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    def recorder(name):
        def pre_hook(module, call_args, call_kwargs):
            calls[name] = calls.get(name, 0) + 1
            if name not in seen:
                seen[name] = (torch.utils._pytree.tree_map(keep, call_args),
                              torch.utils._pytree.tree_map(keep, call_kwargs))
        return pre_hook

    handles = [block.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, block in blocks]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    uncalled = [name for name, _ in blocks if name not in seen]
    if uncalled:
        raise LdbfxError(f"the example batch never reached block(s) {uncalled[:5]}: they cannot be captured")
    refuse_shared([name for name, count in calls.items() if count > 1])
    return seen


def refuse_shared(names: list[str]) -> None:
    if names:
        raise LdbfxError(
            f"block(s) {names[:5]} run more than once per forward (shared weights, ALBERT-like): each call is "
            "its own residual branches in the model's graph, which one block graph cannot tell apart. "
            "Install the whole graph (ldbfx.install(model, gm)) for such a model")


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def outside_blocks_hidden(model: nn.Module, blocks: Iterable[nn.Module]) -> Iterator[None]:
    """While capturing for a per-block install: Hugging Face's checkpointing switches off, and no
    hooks on the blocks or on modules outside them. They stay outside the blocks' graphs, where
    ``nn.Module.__call__`` runs them and the installed forward checkpoints; the whole model's
    graph is only the analysis, never run. Hooks *inside* a block stay, and are refused by the
    block's capture (its graph would inline them)."""
    blocks = list(blocks)
    inner = {id(m) for block in blocks for m in block.modules() if m is not block}
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    hidden = [(m, name, getattr(m, name)) for m in model.modules() if id(m) not in inner
              for name in _HOOKS if getattr(m, name, None)]
    for m in switched:
        m.gradient_checkpointing = False
    for m, name, hooks in hidden:
        setattr(m, name, type(hooks)())
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True
        for m, name, hooks in hidden:
            setattr(m, name, hooks)


@contextlib.contextmanager
def _parameters_in(block: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The block's floating-point parameters in ``dtype`` while it is captured (what FSDP2's
    ``MixedPrecisionPolicy(param_dtype=...)`` gives its forward), the same objects, restored
    bit for bit after."""
    if dtype is None:
        yield
        return
    kept = [(p, p.data) for p in block.parameters() if p.is_floating_point()]
    try:
        for p, data in kept:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in kept:
            p.data = data


def capture_block(name: str, block: nn.Module, gm: LdbGraphModule, inputs: tuple | None,
                   param_dtype: torch.dtype | None) -> LdbGraphModule:
    """The block's own rewritten graph: every layer and branch may drop locally (the model's
    analysis decides which do); the extra branches the user named, in the block's names."""
    prefix = name + "."
    extra = tuple(n[len(prefix):] for n in gm.ldbfx_config.extra_branches if n.startswith(prefix))
    options = dict(keep_first=0, keep_last=0, keep_first_blocks=0, keep_last_blocks=0, extra_branches=extra)
    if inputs is not None:
        if param_dtype is not None:  # FSDP2 casts a sharded module's floating-point inputs too
            inputs = torch.utils._pytree.tree_map(
                lambda v: v.to(param_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, inputs)
        options.update(example_args=tuple(inputs[0]), example_kwargs=dict(inputs[1]))
    with warnings.catch_warnings(), outside_blocks_hidden(block, [block]), _parameters_in(block, param_dtype):
        warnings.simplefilter("ignore")  # a block without layers: the model's analysis says so
        graph = transform(block, **options)
    # The block's own parameters through the block's dict, not a copy of it: FSDP2 swaps its
    # entries (sharded, unsharded), and the graph must read those. (Buffers stay the graph's:
    # its constants live there beside the block's buffers, which FSDP2 leaves in place.)
    graph.__dict__["_parameters"] = block._parameters
    return graph


def share_code(graphs: list[LdbGraphModule]) -> None:
    """Blocks whose rewritten code is the same run the first one's class (``forward``) and
    torch.export guard modules: Dynamo guards on both, so one compile serves them all."""
    firsts: dict[tuple[str, str], LdbGraphModule] = {}
    for graph in graphs:
        key = (graph.code, graph.eval_code)
        first = firsts.setdefault(key, graph)
        if first is graph:
            continue
        guards = {k: v for k, v in first._modules.items() if k.startswith("_ldbfx_")}
        if set(guards) != {k for k in graph._modules if k.startswith("_ldbfx_")}:
            continue
        graph.__class__ = type(first)
        graph._modules.update(guards)
