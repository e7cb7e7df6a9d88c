"""Attention that reads a shared prefix's keys and values without copying them per row.

Every document of a batch attends to the same system-prompt prefix. The stock path
concatenates the prefix cache onto each row's keys (a copy of prefix × batch per layer,
then a grouped-query expansion); this function instead scores queries against the one
prefix copy with a single batched matmul per layer, and against the row's own tokens
with the row's custom mask, then combines both in one softmax.

Registered with transformers as ``shared_prefix``; the prefix is passed per call as the
``prefix_kv`` keyword (a list of (key, value) per layer, each [1, kv_heads, P, head_dim]).
Without ``prefix_kv`` it is plain causal attention (used to compute the prefix itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_kv=None, **kwargs):
    """Attention over [shared prefix | own tokens]; returns [batch, tokens, heads, head_dim]."""
    batch, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    if prefix_kv is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=tokens > 1, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    prefix_key, prefix_value = prefix_kv[module.layer_idx]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * tokens, dim)
    flat = grouped.transpose(0, 1).reshape(kv_heads, batch * groups * tokens, dim)
    prefix_scores = torch.matmul(flat, prefix_key[0].transpose(-1, -2)).float() * scale
    prefix_scores = prefix_scores.reshape(kv_heads, batch, groups * tokens, -1).transpose(0, 1)
    own_scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    own_mask = attention_mask[:, :, :, -tokens:].expand(batch, groups, tokens, tokens)
    own_mask = own_mask.reshape(batch, 1, groups * tokens, tokens)
    own_scores = own_scores.masked_fill(~own_mask, float("-inf"))
    peak = torch.maximum(prefix_scores.amax(-1, keepdim=True), own_scores.amax(-1, keepdim=True))
    prefix_weights = torch.exp(prefix_scores - peak)
    own_weights = torch.exp(own_scores - peak)
    total = prefix_weights.sum(-1, keepdim=True) + own_weights.sum(-1, keepdim=True)
    dtype = value.dtype
    from_prefix = torch.matmul(
        (prefix_weights / total).to(dtype).transpose(0, 1).reshape(kv_heads, batch * groups * tokens, -1),
        prefix_value[0],
    ).reshape(kv_heads, batch, groups * tokens, dim).transpose(0, 1)
    from_own = torch.matmul((own_weights / total).to(dtype), value)
    out = (from_prefix + from_own).reshape(batch, heads, tokens, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, shared_prefix_attention)
