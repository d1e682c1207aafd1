"""The prefix file: one self-describing safetensors file, and atomic writes for every file the project makes.

    tensor  "prefix"  float32 [P, L*2*H_kv*D], element order (position, layer, key/value, head, head_dim)
    header  format, format_version, task, base_model, architecture, num_layers, num_kv_heads, head_dim,
            prefix_len, train_args (JSON)

The order is the one rinna's prefix-tuning-gpt and PEFT use, so a table moves between them with a reshape.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .shapes import PrefixShape, base_dims

FORMAT = "prefixtune"
FORMAT_VERSION = "1"
SHAPE_KEYS = ("num_layers", "num_kv_heads", "head_dim")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_prefix(path, table: torch.Tensor, shape: PrefixShape, *, task: str, base_model: str, architecture: str,
                train_args: dict | None = None) -> None:
    if tuple(table.shape) != (shape.prefix_len, shape.width):
        raise ValueError(f"prefix table has shape {tuple(table.shape)}, expected {(shape.prefix_len, shape.width)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "base_model": str(base_model),
        "architecture": architecture,
        **{k: str(v) for k, v in shape.as_dict().items()},
        "train_args": json.dumps(train_args or {}, default=str),
    }
    with atomic_path(path) as tmp:
        save_file({"prefix": table.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)


def load_prefix(path) -> tuple[torch.Tensor, PrefixShape, dict]:
    """Read and check a prefix file: (table [P, width] fp32, shape, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prefix file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "prefix" not in keys:
                raise ValueError(f"{path}: no tensor 'prefix' (found {keys}); is this a prefixtune prefix file?")
            table = f.get_tensor("prefix").float()
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: header field format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(expected {FORMAT_VERSION!r}); upgrade prefixtune")
    try:
        shape = PrefixShape(*(int(meta[k]) for k in (*SHAPE_KEYS, "prefix_len")))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: header lacks a valid {e} field") from e
    if tuple(table.shape) != (shape.prefix_len, shape.width):
        raise ValueError(f"{path}: tensor 'prefix' has shape {tuple(table.shape)}, "
                         f"but the header says {(shape.prefix_len, shape.width)}")
    meta["train_args"] = json.loads(meta.get("train_args") or "{}")
    return table, shape, meta


def check_compatible(path, shape: PrefixShape, meta: dict, config) -> None:
    """Raise a ValueError naming every dimension where the prefix does not fit the base model `config`."""
    have = dict(zip(SHAPE_KEYS, base_dims(config)))
    bad = [f"{k}: prefix has {getattr(shape, k)}, base model has {have[k]}" for k in SHAPE_KEYS if getattr(shape, k) != have[k]]
    if bad:
        raise ValueError(
            f"{path} was trained on {meta.get('base_model')} ({meta.get('architecture')}) and does not fit this base "
            f"model ({getattr(config, 'model_type', '?')}): " + "; ".join(bad) + ". Load it with the model it was trained on."
        )
