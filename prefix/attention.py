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


class PrefixAttentionCore(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v for GQA shapes, with a hand-written backward that keeps only q, k, v and the
    16-bit probabilities. On CPU, PyTorch's fused SDPA backward with a mask costs ~4x its forward (7.5 ms against
    1.1 ms per SmolLM2 layer at 8 x 72 tokens, bf16); this explicit form is what HF's eager attention computes."""

    @staticmethod
    def forward(ctx, query, key, value, bias, scale):
        # query (B, Hq, T, D); key/value (B, Hkv, S, D); bias (B, 1, T, S) additive, in the query's dtype
        batch, num_heads, q_len, head_dim = query.shape
        num_kv, kv_len = key.shape[1], key.shape[2]
        rep = num_heads // num_kv
        # query head h reads key/value head h // rep (repeat_kv's order): group the rep heads as extra rows
        q = (query * scale).reshape(batch, num_kv, rep * q_len, head_dim)  # (B, Hkv, R*T, D)
        scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, num_kv, rep, q_len, kv_len)
        scores = scores + bias[:, :, None]  # (B, Hkv, R, T, S)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
        probs = probs.view(batch, num_kv, rep * q_len, kv_len)  # (B, Hkv, R*T, S)
        out = torch.matmul(probs, value)  # (B, Hkv, R*T, D)
        ctx.save_for_backward(q, key, value, probs)
        ctx.scale, ctx.q_shape = scale, query.shape
        return out.view(batch, num_heads, q_len, head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, key, value, probs = ctx.saved_tensors
        grad_out = grad_out.reshape(q.shape)  # (B, Hkv, R*T, D)
        grad_value = torch.matmul(probs.transpose(-1, -2), grad_out)  # (B, Hkv, S, D)
        wide = torch.promote_types(q.dtype, torch.float32)
        grad_probs = torch.matmul(grad_out, value.transpose(-1, -2)).to(wide)  # (B, Hkv, R*T, S)
        p = probs.to(wide)
        grad_scores = (p * (grad_probs - (grad_probs * p).sum(-1, keepdim=True))).to(q.dtype)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale).view(ctx.q_shape)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), q)  # q carries the scale already
        return grad_query, grad_key, grad_value, None, None

# Above this many scores per head (queries x keys) the explicit form's passes over its (T, P+T) probabilities cost more
# than the fused kernel's backward. Measured in the trainer (SmolLM2 bf16, batch 8, 2-core CPU, tokens/s explicit vs
# SDPA): 256 tokens 805 vs 712, 384 tokens 811 vs 702, 256 tokens with P=256 673 vs 496, 512 tokens 406 vs 534.
EXPLICIT_MAX_SCORES = 400 * 416


def _explicit(query, key, dropout, kwargs) -> bool:
    """Training on CPU over short rows: the explicit attention core. CUDA keeps SDPA's fused kernels."""
    return (query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
            and not dropout and query.shape[2] * key.shape[2] <= EXPLICIT_MAX_SCORES
            and query.shape[1] % key.shape[1] == 0
            and not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks")))


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
    if _explicit(query, key, dropout, kwargs):
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
        else:
            bias = attention_mask.to(query.dtype)
        scale = scaling if scaling is not None else head_dim ** -0.5
        out = PrefixAttentionCore.apply(query, key, value, bias, scale)  # (B, Hq, T, D)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


AttentionInterface.register(ATTN_NAME, prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_prefix_attention(model) -> None:
    """Route `model`'s attention through `prefix_attention` (also for models loaded with another implementation)."""
    model.set_attn_implementation(ATTN_NAME)
