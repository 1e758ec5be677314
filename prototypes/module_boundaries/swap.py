"""Prototype (b): a module swap, torchao quantize_-style. The capture only analyses (one
ldbfx.transform of the whole model gives layer order, eligibility, tied parameters, branches and
ONE state with global indices); the model's own forward runs; layers become modules with the same
state_dict whose forward calls ldbfx.ops with the analysis's mask and global index.

* nn.Linear -> class swapped to _LdbLinear (forward = ops.linear), nn.Embedding -> _LdbEmbedding.
* any other module owning a layer's parameters (RMSNorm's weight): a pre-hook shadows the
  parameter with ops.masked_param(...) in the instance __dict__ for the call, a post-hook removes it.
* branches: the module whose output is the add's operand (self_attn -> (out, w), mlp) gets a
  forward hook returning ops.branch(out, state, index); ops.branch_start as a pre-hook on the
  first module of the branch (input_layernorm / post_attention_layernorm).
* state.record_forward() in a root pre-hook (the eager ops decide at forward time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ldbfx
from ldbfx import ops


class _LdbLinear(nn.Linear):
    def forward(self, x):
        return ops.linear(x, self.weight, self.bias, self._ldbfx_mask, self._ldbfx_index)


class _LdbEmbedding(nn.Embedding):
    def forward(self, ids):
        return ops.embedding(ids, self.weight, self.padding_idx, self.scale_grad_by_freq,
                             self._ldbfx_mask, self._ldbfx_index)


def _shadow_pre(module, args):
    for name in module._ldbfx_gated:
        module.__dict__[name] = ops.masked_param(module._parameters[name], module._ldbfx_mask, module._ldbfx_index)


def _shadow_post(module, args, out):
    for name in module._ldbfx_gated:
        module.__dict__.pop(name, None)


def swap(model: nn.Module, example_kwargs: dict, **options):
    full = ldbfx.transform(model, example_kwargs=example_kwargs, **options)
    state, mask = full.ldbfx_state, full._ldbfx_mask
    owner_of = {}
    for layer in ldbfx.layers(full):
        owners = {p.rpartition(".")[0] for p in layer.params}
        if len(owners) != 1:
            raise NotImplementedError(f"layer {layer.name} spans modules {owners} (tied): needs one index on each")
        owner_of[owners.pop()] = layer.index
    for name, index in owner_of.items():
        m = model.get_submodule(name)
        m.__dict__["_ldbfx_mask"] = mask
        m._ldbfx_index = index
        if type(m) is nn.Linear:
            m.__class__ = _LdbLinear
        elif type(m) is nn.Embedding:
            m.__class__ = _LdbEmbedding
        else:
            m._ldbfx_gated = tuple(n for n, p in m._parameters.items() if p is not None)
            m.register_forward_pre_hook(_shadow_pre)
            m.register_forward_hook(_shadow_post)
    for b in ldbfx.branches(full):
        if not b.eligible:
            continue  # no gate where it can never be dropped (the graph gates only eligible ones)
        sub = model.get_submodule(b.name)  # model.layers.2.self_attn / .mlp: its output is the add operand
        first = model.get_submodule(b.layers[0])  # the branch's first layer (its norm)
        first.register_forward_pre_hook(lambda m, a, s=state: ops.branch_start(s))

        def gate(m, args, out, s=state, i=b.index):
            if isinstance(out, tuple):
                return (ops.branch(out[0], s, i), *out[1:])
            return ops.branch(out, s, i)
        sub.register_forward_hook(gate)
    model.register_forward_pre_hook(lambda m, a: state.record_forward() if torch.is_grad_enabled() else None)
    return full
