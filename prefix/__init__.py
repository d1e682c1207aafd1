"""Prefix tuning for frozen Hugging Face causal LMs: the encoder, the model wrapper, the file format.

The names below load on first use (PEP 562), so that a submodule without torch (flags.py, tasks.py) imports
without it: the command lines answer --help before torch loads."""
from importlib import import_module

_WHERE = {
    "PrefixEncoder": "encoder", "table_to_cache": "encoder", "text_key_values": "encoder",
    "PrefixLM": "model", "is_trainable": "model", "prefix_hidden_states": "model", "prefix_positions": "model",
    "PrefixShape": "shapes", "base_dims": "shapes", "prefix_shape": "shapes", "split_table": "shapes",
}

__all__ = [
    "PrefixEncoder", "PrefixLM", "PrefixShape", "base_dims", "is_trainable", "prefix_hidden_states", "prefix_positions", "prefix_shape",
    "split_table", "table_to_cache", "text_key_values",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
