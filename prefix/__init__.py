"""Prefix tuning for frozen Hugging Face causal LMs: the encoder, the model wrapper, the file format."""
from .encoder import PrefixEncoder, table_to_cache, text_key_values
from .model import PrefixLM, is_trainable, prefix_hidden_states, prefix_positions
from .shapes import PrefixShape, base_dims, prefix_shape, split_table

__all__ = [
    "PrefixEncoder", "PrefixLM", "PrefixShape", "base_dims", "is_trainable", "prefix_hidden_states", "prefix_positions", "prefix_shape",
    "split_table", "table_to_cache", "text_key_values",
]
