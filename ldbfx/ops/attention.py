"""Attention: functions that call ``F.linear`` inside (routed), and ``nn.MultiheadAttention``."""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .gating import masked_param
from .linears import linear
from .path import _needs_grad

# --------------------------------------------------------------------------------------------
# Functions that call F.linear on parameters internally (torchvision's shifted_window_attention).
# --------------------------------------------------------------------------------------------
class _RouteLinears(torch.overrides.TorchFunctionMode):
    """Sends every ``F.linear`` called while active to :func:`linear` for one layer.

    For functions recorded as one node (``torch.fx.wrap``) that compute their projections with
    ``F.linear``. It does not reach functions that dispatch themselves through
    ``handle_torch_function`` (``F.multi_head_attention_forward``): the mode is popped before
    their body runs, which is why multi-head attention has its own implementation below.
    """

    def __init__(self, mask: Tensor, index: int):
        super().__init__()
        self.mask, self.index = mask, index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return linear(x, weight, bias, self.mask, self.index)
        return func(*args, **kwargs)


_ROUTED: dict[str, object] = {}


def _function(qualified_name: str):
    fn = _ROUTED.get(qualified_name)
    if fn is None:
        module, _, name = qualified_name.rpartition(".")
        fn = _ROUTED[qualified_name] = getattr(importlib.import_module(module), name)
    return fn


def routed_call(function: str, mask: Tensor, index: int, *args, **kwargs):
    """``function(*args, **kwargs)`` with the ``F.linear`` calls inside masked as layer ``index``.

    ``function`` is a qualified name (a graph can only print importable references).
    """
    fn = _function(function)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    with _RouteLinears(mask, index):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: the module's non-fast path, op for op, with masked projections.
# Adapted from torch.nn.MultiheadAttention.forward and F.multi_head_attention_forward (BSD).
# --------------------------------------------------------------------------------------------
def multi_head_attention(module: torch.nn.MultiheadAttention, mask: Tensor, index: int,
                         query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Tensor | None = None, need_weights: bool = True,
                         attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """``module(query, key, value, ...)`` with its projection weight gradients maskable."""
    m = module
    if not _needs_grad(query, key, value, m.in_proj_weight, m.q_proj_weight, m.out_proj.weight):
        # Inference: the module itself, fast path included, so eval outputs stay identical.
        return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False,
    )
    if m.batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = _mha_forward(m, mask, index, query, key, value, key_padding_mask, need_weights,
                                attn_mask, average_attn_weights, is_causal)
    if m.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


def _mha_forward(m, mask, index, query, key, value, key_padding_mask, need_weights, attn_mask,
                 average_attn_weights, is_causal):
    num_heads, dropout_p = m.num_heads, m.dropout if m.training else 0.0
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False
    head_dim = embed_dim // num_heads

    def proj(x, w, b):
        return linear(x, w, b, mask, index)

    if m._qkv_same_embed_dim:  # F._in_projection_packed
        w, b = m.in_proj_weight, m.in_proj_bias
        if key is value and query is key:
            p = proj(query, w, b)
            p = p.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = p[0], p[1], p[2]
        elif key is value:
            w_q, w_kv = w.split([embed_dim, embed_dim * 2])
            b_q, b_kv = (None, None) if b is None else b.split([embed_dim, embed_dim * 2])
            q = proj(query, w_q, b_q)
            kv = proj(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q, k, v = proj(query, w_q, b_q), proj(key, w_k, b_k), proj(value, w_v, b_v)
    else:  # F._in_projection
        b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
        q = proj(query, m.q_proj_weight, b_q)
        k = proj(key, m.k_proj_weight, b_k)
        v = proj(value, m.v_proj_weight, b_v)
    src_len = k.shape[0]
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, masked_param(m.bias_k, mask, index).repeat(1, bsz, 1)])
        v = torch.cat([v, masked_param(m.bias_v, mask, index).repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    out_w, out_b = m.out_proj.weight, m.out_proj.bias
    if need_weights:
        _, _, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = proj(out, out_w, out_b)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = proj(out, out_w, out_b)
    out = out.view(tgt_len, bsz, out.size(1))
    if not is_batched:
        out = out.squeeze(1)
    return out, None
