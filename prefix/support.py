"""Which base models prefix tuning can serve: `check_base_supported(config)` is the one place that decides.

Decoder-only causal LMs whose every layer attends to the whole sequence (a sliding window would drop the prefix at
generation), and whose config gives layers, heads and head size. Every refusal is a one-line `ValueError`.
"""
from __future__ import annotations

from .errors import one_line
from .shapes import base_dims, text_config


def check_base_supported(config) -> None:
    """Raise a one-line ValueError unless prefix tuning can serve this model: a decoder-only causal LM with full
    attention in every layer (no sliding window, chunked or local attention, no recurrent layers), whose config
    gives layers, heads and head size. Training and inference both call it before loading any weights."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None) or "unknown"
    fix = "use a decoder-only model such as GPT-2, GPT-NeoX or a Llama-family model"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{mt} is an encoder-decoder model, not a causal language model: {fix}")
    auto_map = getattr(config, "auto_map", None) or {}
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # bert, roberta, ...: an encoder, even if it has a causal LM head
        raise ValueError(f"{mt} is an encoder (masked language model), not a causal language model: {fix}")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in auto_map:
        raise ValueError(f"{mt} is not a causal language model (transformers has no causal LM class for it): {fix}")
    text = text_config(config)
    full = "use a model with full attention in every layer (GPT-2, GPT-NeoX, the Llama family)"
    why = ("generation's cache would drop the prefix once a sequence passes the window, while training shows it "
           "to every token")
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        other = [t for t in dict.fromkeys(layer_types) if t != "full_attention"]
        if other:
            n = sum(t != "full_attention" for t in layer_types)
            detail, reason = "", "the prefix (per-layer keys and values) needs attention in every layer"
            if any("sliding" in t for t in other):
                detail, reason = f"; sliding_window={getattr(text, 'sliding_window', None)}", why
            elif any("chunked" in t for t in other):
                detail, reason = f"; attention_chunk_size={getattr(text, 'attention_chunk_size', None)}", why
            raise ValueError(f"{mt}: expected full attention in every layer, got {'/'.join(other)} in {n} of "
                             f"{len(layer_types)} layers (config field layer_types{detail}): {reason}; {full}")
    else:
        window = getattr(text, "sliding_window", None)
        if window is not None and getattr(text, "use_sliding_window", True) is not False:
            raise ValueError(f"{mt}: expected full attention, got sliding-window attention (config field "
                             f"sliding_window={window}): {why}; {full}, or set sliding_window to null in its "
                             "config.json if every sequence fits the window")
        chunk = getattr(text, "attention_chunk_size", None)
        if chunk is not None:
            raise ValueError(f"{mt}: expected full attention, got chunked attention (config field "
                             f"attention_chunk_size={chunk}): {why}; {full}")
    local = getattr(text, "attention_layers", None)  # GPT-Neo: "global"/"local" (windowed) per layer
    if isinstance(local, (list, tuple)) and "local" in local:
        raise ValueError(f"{mt}: expected full attention in every layer, got local (windowed) attention in "
                         f"{list(local).count('local')} layers (config field attention_layers): {why}; {full}")
    try:
        base_dims(config)
    except (AttributeError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{mt}: the config does not give layers, heads and head size ({one_line(e)}): {fix}") from e
