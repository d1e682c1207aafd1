"""Read a Hugging Face checkpoint one tensor at a time: safetensors or .bin, sharded or not.

Converting a 3.6B model must not need the whole model in memory: safetensors are read tensor by tensor,
.bin shards are memory-mapped (`torch.load(weights_only=True, mmap=True)`) one shard at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def checkpoint_files(model_dir: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"]
            return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors, pytorch_model.bin or their .index.json: "
                            "pass a Hugging Face model folder")


def iter_tensors(model_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, holding at most one tensor (or one mmapped shard)."""
    for path in checkpoint_files(Path(model_dir)):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(shard):
                yield name, shard.pop(name)
            del shard
