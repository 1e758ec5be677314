"""Prototype (c): per-block capture + install, on ldbfx's public API only.

One whole-model analysis (ldbfx.transform of the whole model: layer order, eligibility with
keep_first/keep_last, branches and their blocks, tied parameters), then each decoder block is
captured alone (torch.export from the inputs it received in one eager call), rewritten
(ldbfx.transform(block, ...), every local layer/branch "eligible", global eligibility applied by
the controller) and installed as the block's forward (ldbfx.install(block, bgm)): the block
object, its parameters and its hooks stay the user's; the model's own forward runs and calls the
blocks through nn.Module.__call__, so FSDP2's pre-forward unshard, checkpoint wrappers and
block.compile() see the block.

State: one LdbState per block (what ldbfx.transform gives today). The controller maps global
layer/branch names to (block gm, local name).  `share_code=True` makes every block whose rewritten
code is identical run the SAME generated forward function (block 0's), which is what lets
block.compile() compile once for all blocks.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import ldbfx


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF's _no_split_modules classes (LlamaDecoderLayer): the blocks FSDP/ckpt/compile wrap."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in kinds]


def _record_inputs(model, blocks, example_kwargs):
    seen = {}
    handles = []
    for name, block in blocks:
        def pre(m, args, kwargs, name=name):
            seen.setdefault(name, (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                                   dict(kwargs)))
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**example_kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


class Blockwise:
    """The controller: global names -> per-block graphs."""

    def __init__(self, full, blocks, bgms):
        self.full = full  # the whole-model analysis (its graph is not run)
        self.blocks = dict(blocks)
        self.bgms = bgms  # block name -> LdbGraphModule
        self.layers = ldbfx.layers(full)
        self.branches = ldbfx.branches(full)
        self._where = {}
        for layer in self.layers:
            for bname in bgms:
                if layer.name.startswith(bname + "."):
                    self._where[layer.name] = (bname, layer.name[len(bname) + 1:])
        self._bwhere = {}
        for b in self.branches:
            for bname in bgms:
                if b.name.startswith(bname + "."):
                    self._bwhere[b.name] = (bname, b.name[len(bname) + 1:])

    def set_dropped(self, names):
        per = {b: [] for b in self.bgms}
        for name in names:
            layer = next(l for l in self.layers if l.name == name)
            if not layer.eligible:
                raise ldbfx.LayerNotFoundError(f"{name} is not eligible ({layer.reason})")
            if name not in self._where:
                raise NotImplementedError(f"{name} lies outside every block (root forward runs unrewritten)")
            bname, local = self._where[name]
            per[bname].append(local)
        for bname, local in per.items():
            ldbfx.set_dropped(self.bgms[bname], local)

    def set_dropped_branches(self, names):
        per = {b: [] for b in self.bgms}
        for name in names:
            b = next(x for x in self.branches if x.name == name)
            if not b.eligible:
                raise ldbfx.BranchNotFoundError(f"{name} not eligible ({b.reason})")
            bname, local = self._bwhere[name]
            per[bname].append(local)
        if names:  # one recompile ever, for all blocks alike (per-block states would each flip it)
            for bgm in self.bgms.values():
                bgm.ldbfx_state.branch_cut = True
        for bname, local in per.items():
            ldbfx.set_dropped_branches(self.bgms[bname], local)

    def uninstall(self):
        for name, block in self.blocks.items():
            ldbfx.uninstall(block)


def install_blocks(model: nn.Module, example_kwargs: dict, *, share_code: bool = True, **options) -> Blockwise:
    blocks = _blocks(model)
    full = ldbfx.transform(model, example_kwargs=example_kwargs, **options)  # the one analysis
    inputs = _record_inputs(model, blocks, example_kwargs)
    bgms = {}
    shared = None
    for name, block in blocks:
        args, kwargs = inputs[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bgm = ldbfx.transform(block, example_args=args, example_kwargs=kwargs,
                                  keep_first=0, keep_last=0, keep_first_blocks=0, keep_last_blocks=0)
        if share_code:
            if shared is None:
                shared = bgm
            elif bgm.code == shared.code:
                # The same generated function for every identical block: Dynamo sees one code
                # object (what regional compilation needs to compile once).
                # (Dynamo guards on type(self.gm): one class per GraphModule instance would
                # recompile per block.)
                bgm.__class__ = type(shared)
                # torch.export's guard modules are generated code per capture, and Dynamo guards on
                # their code object too: identical blocks share block 0's.
                for key, value in shared._modules.items():
                    if key.startswith("_ldbfx_") and key in bgm._modules:
                        bgm._modules[key] = value
        ldbfx.install(block, bgm)
        bgms[name] = bgm
    return Blockwise(full, blocks, bgms)
