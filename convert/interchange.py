"""Move prefixes between prefixtune, PEFT prefix tuning and rinna's prefix-tuning-gpt; rename a prefix's task.

All three store the same table, `[P, L*2*H_kv*D]` in (position, layer, key/value, head, head_dim) order, so
conversion is metadata: PEFT keeps it as `prompt_embeddings` in `adapter_model.safetensors` with an
`adapter_config.json` (`prefix_projection: false`); rinna's `.checkpoint` is that tensor saved by `torch.save`.

No command replaces an existing --out without `overwrite`, and every file is written to a temporary name beside
it and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..prefix import prefix_shape
from ..prefix.errors import one_line

# prefix.io's save_file: the file written in place (no safetensors temporary beside it), with open()'s mode
from ..prefix.io import (
    atomic_path,
    atomic_write_text,
    check_compatible,
    current_umask,
    load_prefix,
    save_file,
    save_prefix,
)
from .ft_layout import task_name_problem

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _check_out_file(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder, expected a .safetensors file path; pass a file name")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: pass --overwrite to replace it, or another --out")


def _check_task(task, where: str) -> None:
    problem = task_name_problem(task)
    if problem:
        raise ValueError(f"{where}: {problem}; pass another --task")


def to_peft(prefix_path, out_dir, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a folder for the adapter; pass another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty: pass --overwrite to replace its adapter files, or "
                         "another --out")
    table, shape, meta = load_prefix(prefix_path)
    if shape.prefix_len < 1:
        raise ValueError(f"{prefix_path}: header field prefix_len is 0, expected >= 1; pass a trained prefix")
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
        "num_virtual_tokens": shape.prefix_len, "num_layers": shape.num_layers,
        # PEFT's grouped-query convention: key/value heads and their width
        "num_attention_heads": shape.num_kv_heads, "token_dim": shape.num_kv_heads * shape.head_dim,
        "num_transformer_submodules": 1, "prefix_projection": False, "encoder_hidden_size": shape.head_dim,
        "base_model_name_or_path": meta.get("base_model"), "revision": None, "modules_to_save": None,
    }
    if not out.exists():  # a new folder appears whole: built beside it, then renamed
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            save_file({"prompt_embeddings": table.contiguous()}, str(tmp / PEFT_FILES[0]), metadata={"format": "pt"})
            (tmp / PEFT_FILES[1]).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            os.chmod(tmp, 0o777 & ~_umask())
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    with atomic_path(out / PEFT_FILES[0]) as tmp:
        save_file({"prompt_embeddings": table.contiguous()}, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / PEFT_FILES[1], json.dumps(config, indent=2) + "\n")
    return out


def _umask() -> int:
    return current_umask()


def _base_config(model):
    from transformers import AutoConfig

    from ..prefix.resolve import resolve_model

    where, kwargs = resolve_model(model)
    return AutoConfig.from_pretrained(where, **kwargs)


def _import(table: torch.Tensor, source: str, model, out, task: str, how: str) -> Path:
    if table.dim() != 2:
        raise ValueError(f"{source}: expected a 2-D prefix table [P, L*2*H_kv*D], got shape {tuple(table.shape)}")
    if table.shape[0] < 1:
        raise ValueError(f"{source}: expected a prefix of length P >= 1, got an empty table of shape "
                         f"{tuple(table.shape)}; pass the checkpoint of a trained prefix")
    config = _base_config(model)
    shape = prefix_shape(config, table.shape[0])
    if table.shape[1] != shape.width:
        raise ValueError(f"{source}: table width {table.shape[1]} does not fit {model} (L*2*H_kv*D = "
                         f"{shape.num_layers}*2*{shape.num_kv_heads}*{shape.head_dim} = {shape.width}); "
                         "pass the --model it was trained on")
    check_compatible(source, shape, {"base_model": model, "architecture": config.model_type}, config)
    save_prefix(out, table.float(), shape, task=task, base_model=str(model), architecture=config.model_type,
                train_args={"imported_from": how, "source": str(source)})
    return Path(out)


def from_peft(adapter_dir, model, out, task: str | None = None, overwrite: bool = False) -> Path:
    adapter_dir, out = Path(adapter_dir), Path(out)
    _check_out_file(out, overwrite)
    _check_task(task or adapter_dir.resolve().name, "--task" if task else "task from the adapter folder's name")
    task = task or adapter_dir.resolve().name
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; pass a PEFT adapter folder")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are read; "
                                "re-save with safe_serialization=True)")
    tensors = load_file(str(weights))
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{weights}: no tensor 'prompt_embeddings' (found {sorted(tensors)})")
    return _import(tensors["prompt_embeddings"], str(weights), model, out, task, "peft")


def from_rinna(checkpoint, model, out, task: str, overwrite: bool = False) -> Path:
    """rinna's `.checkpoint` is a bare tensor saved with torch.save; it is read with weights_only=True."""
    out = Path(out)
    _check_out_file(out, overwrite)
    _check_task(task, "--task")
    import pickle

    if Path(checkpoint).is_dir():
        raise ValueError(f"{checkpoint} is a folder, expected rinna's .checkpoint file (a tensor saved with "
                         "torch.save); pass the file")
    try:
        table = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # PyTorch's message advises weights_only=False: running the file's code
        raise ValueError(f"{checkpoint}: not a plain tensor checkpoint: it holds Python objects besides tensors, "
                         "and prefixtune never unpickles those; pass rinna's .checkpoint (the prefix table saved "
                         "alone with torch.save), or save the table as a tensor first") from None
    except Exception as e:  # noqa: BLE001 - a file that is not a torch.save archive at all
        raise ValueError(f"{checkpoint}: not a tensor file saved with torch.save ({one_line(e)}); "
                         "pass rinna's .checkpoint file") from None
    if isinstance(table, dict):  # some forks save {"model": tensor}
        tensors = [v for v in table.values() if torch.is_tensor(v)]
        if len(tensors) != 1:
            raise ValueError(f"{checkpoint}: expected one prefix tensor, found keys {sorted(table)}")
        table = tensors[0]
    if not torch.is_tensor(table):
        raise ValueError(f"{checkpoint}: expected a tensor, got {type(table).__name__}")
    return _import(table, str(checkpoint), model, out, task, "rinna prefix-tuning-gpt")
