"""Attention that reads a shared prefix's keys and values without copying them per row.

Every document of a batch attends to the same system-prompt prefix. The stock path
concatenates the prefix cache onto each row's keys (a copy of prefix × batch per layer,
then a grouped-query expansion); this function instead runs two fused attentions, the
whole batch's queries against the one prefix copy and each row's queries against its
own tokens under its custom mask, and merges them exactly by their log-sum-exps
(measured: 1.8× faster than a materialised softmax with a 1,500-token prefix). A batch of
one row (a long document) instead concatenates the prefix onto its keys for one fused call:
with no copy per row to save, one call beats two.

Registered with transformers as ``shared_prefix``; the prefix is passed per call as the
``prefix_kv`` keyword (a list of (key, value) per layer, each [1, heads, P, head_dim],
see ``expand_heads``).
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
    prefix_key, prefix_value = prefix_kv[module.layer_idx]  # already expanded to all query heads
    if prefix_key.shape[1] != heads:
        raise ValueError(f"prefix_kv has {prefix_key.shape[1]} heads, the model {heads}: expand it with expand_heads")
    groups = heads // kv_heads
    own_mask = torch.zeros(attention_mask.shape, dtype=query.dtype).masked_fill(~attention_mask, float("-inf"))
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if batch == 1:  # one row: prefix and own keys in one fused call (measured 1.4x faster than two for a long document)
        visible = torch.zeros((1, 1, tokens, prefix_key.shape[2]), dtype=query.dtype)
        out, _ = _flash(query, torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2), scale=scale,
                        attn_mask=torch.cat([visible, own_mask], -1))
        return out.transpose(1, 2).contiguous(), None
    # the whole batch's queries against the one prefix copy, as one long query sequence
    flat = query.transpose(0, 1).reshape(1, heads, batch * tokens, dim)
    from_prefix, lse_prefix = _flash(flat, prefix_key, prefix_value, scale=scale)
    from_prefix = from_prefix.reshape(heads, batch, tokens, dim).transpose(0, 1)
    lse_prefix = lse_prefix.reshape(heads, batch, tokens).transpose(0, 1)
    from_own, lse_own = _flash(query, key, value, scale=scale, attn_mask=own_mask)
    lse = torch.logaddexp(lse_prefix, lse_own)
    out = from_prefix * torch.exp(lse_prefix - lse).unsqueeze(-1).to(query.dtype) \
        + from_own * torch.exp(lse_own - lse).unsqueeze(-1).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _flash(query, key, value, *, scale, attn_mask=None):
    """Fused CPU attention returning (output, log-sum-exp), so two partial attentions can be merged."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=attn_mask, scale=scale)


def expand_heads(layers, heads: int):
    """Repeat each layer's prefix keys and values from kv heads to query heads, once per prefix."""
    return [(k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1))
            for k, v in layers]


AttentionInterface.register(NAME, shared_prefix_attention)
