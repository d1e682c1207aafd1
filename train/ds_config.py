"""The DeepSpeed config of a run: a shipped/user JSON file as the base, command-line flags on top."""
from __future__ import annotations

import json
import os
from pathlib import Path


def load_ds_file(path: str | None) -> dict:
    """The JSON at `path`; {} when there is none, in which case `write_built_config` writes the built one there."""
    if not path or to_be_written(path):
        return {}
    if Path(path).is_dir():
        raise ValueError(f"--deepspeed_config {path}: expected a JSON file, got a directory; name a file (an existing "
                         "one is read, a missing one is written with the configuration built from the flags)")
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--deepspeed_config {path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def to_be_written(path: str | None) -> bool:
    """Two conventions meet in --deepspeed_config: DeepSpeed reads the file, while the seed reference (rinna's
    prefix-tuning-gpt, and the article's `--deepspeed_config ./ds_config.json` run from an empty folder) writes the
    configuration it built from its flags there. An existing file is read; a missing one is written."""
    return bool(path) and not os.path.lexists(path)


def write_built_config(path: str, cfg: dict) -> None:
    """Write the resolved configuration where --deepspeed_config names a missing file (rank 0, atomically, so another
    rank that looks meanwhile reads either nothing or the whole file, which resolves to the same config)."""
    from ..prefix.io import atomic_write_text

    parent = Path(path).expanduser().parent
    if not parent.is_dir():
        raise ValueError(f"the folder {parent} does not exist; create it, or name an existing DeepSpeed JSON")
    atomic_write_text(Path(path).expanduser(), json.dumps(cfg, indent=2) + "\n")


def build_ds_config(args, world_size: int) -> dict:
    """The resolved config; the flags that were given (not None/False) win over the file."""
    cfg = load_ds_file(args.deepspeed_config)
    # Batch sizes: flag, else file, else default. DeepSpeed checks train_batch_size = micro * accum * world.
    micro = args.batch_size or cfg.get("train_micro_batch_size_per_gpu") or 8
    accum = args.n_accum_steps or cfg.get("gradient_accumulation_steps") or 1
    if isinstance(micro, str) or isinstance(accum, str):
        raise ValueError("--deepspeed_config: 'auto' batch sizes are not supported; give numbers or the flags "
                         "--batch_size / --n_accum_steps")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * world_size
    zero = dict(cfg.get("zero_optimization") or {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 2)
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    cfg["zero_optimization"] = zero
    wanted = "fp16" if args.fp16 else "bf16" if args.bf16 else args.precision
    if wanted == "auto" and precision(cfg) == "fp32":
        wanted = auto_precision()
    if wanted == "fp16":
        cfg["fp16"] = {"initial_scale_power": 16, **cfg.get("fp16", {}), "enabled": True}
        cfg["bf16"] = {"enabled": False}
    elif wanted == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["fp16"] = {"enabled": False}
    elif wanted == "fp32":
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
    if args.grad_clip is not None:
        cfg["gradient_clipping"] = args.grad_clip
    cfg.setdefault("gradient_clipping", 1.0)
    cfg.pop("optimizer", None)  # prefixtune builds the optimizer (DeepSpeedCPUAdam when offloading)
    cfg.pop("scheduler", None)  # and sets the learning rate itself, once per optimizer step
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def auto_precision() -> str:
    """bf16 where it is fast (CUDA with bf16, CPUs with AMX or AVX512-BF16), fp16 on older GPUs, else fp32."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return "fp32"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"


def unsupported_precision(prec: str) -> str | None:
    """Why this machine's accelerator cannot train in `prec` (and what to use instead), or None if it can."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    where = "this CPU" if acc.device_name() == "cpu" else f"this {acc.device_name()} device"
    if prec == "fp16" and not acc.is_fp16_supported():
        hint = " (DeepSpeed needs AVX512-FP16 or AMX-FP16 for it)" if acc.device_name() == "cpu" else ""
        return (f"fp16 is not supported on {where}{hint}: use --bf16, or --precision auto to pick what this machine "
                "runs (a DeepSpeed config with fp16 enabled needs --bf16 or --precision fp32 to override it)")
    if prec == "bf16" and not acc.is_bf16_supported():
        return f"bf16 is not supported on {where}: use --fp16, or --precision auto"
    return None


def precision(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def offloads(cfg: dict) -> bool:
    return (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") == "cpu"
