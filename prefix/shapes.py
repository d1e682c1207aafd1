"""How big a prefix is for a given base model: one place reads the Hugging Face config."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PrefixShape:
    """Shape of a prefix table `[P, L*2*H_kv*D]`, element order (position, layer, key/value, head, head_dim)."""

    num_layers: int  # L
    num_kv_heads: int  # H_kv: key/value heads, fewer than query heads under grouped-query attention
    head_dim: int  # D
    prefix_len: int  # P

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def as_dict(self) -> dict:
        return asdict(self)


def text_config(config):
    """The decoder's text config of a (possibly multimodal) config: where layers, heads and windows are read."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def base_dims(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a GPT-NeoX, GPT-2 or Llama-family config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = config.num_hidden_layers  # GPT-2 maps n_layer onto this name
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_layers, num_kv_heads, head_dim


def prefix_shape(config, prefix_len: int) -> PrefixShape:
    num_layers, num_kv_heads, head_dim = base_dims(config)
    return PrefixShape(num_layers, num_kv_heads, head_dim, prefix_len)


def split_table(table, shape: PrefixShape):
    """`[..., P, L*2*H*D]` -> `[L, 2, ..., H, P, D]`: per layer, keys and values as attention consumes them."""
    lead = table.shape[:-2]
    t = table.view(*lead, shape.prefix_len, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
    n = len(lead)
    # (..., P, L, 2, H, D) -> (L, 2, ..., H, P, D)
    order = [n + 1, n + 2, *range(n), n + 3, n, n + 4]
    return t.permute(order)
