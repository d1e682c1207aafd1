"""Training state for `--resume`: fp32 master weights, Adam moments, counters and RNG, without pickle.

DeepSpeed's own checkpoints are unpickled with `weights_only=False`; this folder holds safetensors and JSON only:

    <save_name>.state/encoder.safetensors    full fp32 encoder parameters + the fp32 anchor
    <save_name>.state/optimizer.safetensors  exp_avg/<param>, exp_avg_sq/<param> (full, whatever the ZeRO stage)
    <save_name>.state/rng.safetensors        torch RNG state(s)
    <save_name>.state/trainer.json           step, best dev loss, optimizer step count, loss scaler, arguments

Tensors are gathered whole (DeepSpeed's tensor-fragment API), so every rank must call `gather_state` /
`restore_state` together; only rank 0 writes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from safetensors.torch import load_file, save_file

MOMENTS = ("exp_avg", "exp_avg_sq")
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the real optimizer here


def _plain_state(engine, p):
    """Optimizer state of a parameter the optimizer updates directly (no DeepSpeed fp32 copy)."""
    return _base_optimizer(engine).state.setdefault(p, {})


def full_fp32(engine, p) -> torch.Tensor:
    v = safe_get_full_fp32_param(p)
    return (p.detach() if v is None else v).float().cpu().clone()


def _full_moment(engine, p, key) -> torch.Tensor:
    v = safe_get_full_optimizer_state(p, key)
    if v is None:
        v = _plain_state(engine, p).get(key)
    return torch.zeros(p.shape) if v is None else v.float().cpu().clone()


def optimizer_step_count(engine) -> int:
    """Optimizer steps taken (Adam's bias-correction counter)."""
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def gather_params(engine, named_params) -> dict:
    """Full fp32 master copies of the trainable parameters -- collective under ZeRO."""
    return {n: full_fp32(engine, p) for n, p in named_params}


def ensure_optimizer_state(engine) -> None:
    """Allocate zeroed Adam state now (optimizers and DeepSpeed create it lazily at the first step), so a
    restored state has somewhere to go."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    base = _base_optimizer(engine)
    for group in base.param_groups:
        for p in group["params"]:
            st = base.state[p]
            if not st:
                st["step"] = 0 if isinstance(base, DeepSpeedCPUAdam) else torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def gather_state(engine, named_params) -> tuple[dict, dict, dict]:
    """(fp32 params, moments, scaler fields) -- collective under ZeRO."""
    ensure_optimizer_state(engine)
    params = gather_params(engine, named_params)
    moments = {f"{k}/{n}": _full_moment(engine, p, k) for n, p in named_params for k in MOMENTS}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    fields = {f: getattr(scaler, f) for f in SCALER_FIELDS if scaler is not None and hasattr(scaler, f)}
    fields = {k: (v.item() if torch.is_tensor(v) else v) for k, v in fields.items()}
    return params, moments, fields


def write_state(folder: Path, params: dict, anchor: torch.Tensor, moments: dict, trainer: dict) -> None:
    """Write the whole folder beside `folder`, then swap it in: a crash leaves the previous state intact."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({**params, "anchor": anchor.float().cpu().contiguous()}, str(tmp / "encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2, default=str), encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_state(folder: Path) -> Path | None:
    """The state folder, or the previous one if a crash hit `write_state` between its two renames."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def read_state(folder: Path) -> tuple[dict, dict, dict, dict]:
    missing = [n for n in ("encoder.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")
               if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"--resume: {folder} lacks {', '.join(missing)}; "
                                "it is not a complete training state (start without --resume)")
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    return (load_file(str(folder / "encoder.safetensors")), load_file(str(folder / "optimizer.safetensors")),
            load_file(str(folder / "rng.safetensors")), trainer)


@torch.no_grad()
def restore_state(engine, named_params, params: dict, moments: dict, trainer: dict, rng: dict) -> None:
    step = trainer["optimizer_steps"]
    ensure_optimizer_state(engine)
    for n, p in named_params:
        value = params[n].to(p.device)
        if safe_get_full_fp32_param(p) is not None:
            safe_set_full_fp32_param(p, value)
        p.data.copy_(value.to(p.dtype))  # the working copy DeepSpeed would have derived from the fp32 master
        for k in MOMENTS:
            m = moments[f"{k}/{n}"].to(p.device)
            if safe_get_full_optimizer_state(p, k) is not None:
                safe_set_full_optimizer_state(p, m, k)
            else:
                _plain_state(engine, p)[k] = m.to(p.dtype)
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = type(st["step"])(step) if not torch.is_tensor(st["step"]) else torch.tensor(float(step))
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for f, v in trainer.get("loss_scaler", {}).items():
        setattr(scaler, f, v)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
