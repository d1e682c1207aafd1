"""The prefix reaches the model inside attention, not through the KV cache.

Hugging Face drops `past_key_values` when a decoder layer is gradient-checkpointed, so a prefix handed over as a
cache silently disappears in training. Instead the table travels as a keyword argument (`prefix_table`), which the
model forwards to every attention call and which checkpointing keeps, and this attention function concatenates the
layer's prefix keys/values in front of the real ones. Real tokens keep positions P, P+1, ... (the caller passes
`position_ids`), so the result is exactly that of a model whose cache held the prefix.

Call `use_prefix_attention(model)` once; without a `prefix_table` argument the model computes plain SDPA attention.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_NAME = "prefix_sdpa"


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prefix_table=None, **kwargs):
    """query (B, Hq, T, D); key/value (B, Hkv, S, D); prefix_table (P, L*2*Hkv*D) or (B, P, L*2*Hkv*D)."""
    if prefix_table is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, num_kv_heads, kv_len, head_dim = key.shape
    q_len = query.shape[2]
    # (..., P, L, 2, Hkv, D) -> this layer's (2, ..., Hkv, P, D)
    table = prefix_table.view(*prefix_table.shape[:-1], -1, 2, num_kv_heads, head_dim)
    layer = table[..., module.layer_idx, :, :, :]  # (..., P, 2, Hkv, D)
    layer = layer.movedim(-3, 0).movedim(-3, -2).to(key.dtype)  # (2, ..., Hkv, P, D)
    prefix_len = layer.shape[-2]
    pk = layer[0].expand(batch, num_kv_heads, prefix_len, head_dim)  # (B, Hkv, P, D)
    pv = layer[1].expand(batch, num_kv_heads, prefix_len, head_dim)
    key = torch.cat([pk, key], dim=2)  # (B, Hkv, P+S, D)
    value = torch.cat([pv, value], dim=2)

    if attention_mask is None:  # the mask builder skipped an all-causal mask; rebuild it, bottom-right aligned
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
        attention_mask = attention_mask.expand(batch, 1, q_len, kv_len)
    if attention_mask.dtype == torch.bool:
        visible = torch.ones(attention_mask.shape[:-1] + (prefix_len,), dtype=torch.bool, device=query.device)
    else:  # additive float mask: 0 where visible
        visible = torch.zeros(attention_mask.shape[:-1] + (prefix_len,), dtype=attention_mask.dtype, device=query.device)
    attention_mask = torch.cat([visible, attention_mask], dim=-1)  # every query sees the whole prefix
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


AttentionInterface.register(ATTN_NAME, prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_prefix_attention(model) -> None:
    """Route `model`'s attention through `prefix_attention` (also for models loaded with another implementation)."""
    model.set_attn_implementation(ATTN_NAME)
