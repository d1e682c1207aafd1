"""Training state for `--resume`: fp32 master weights, Adam moments, counters and RNG, without pickle.

DeepSpeed's own checkpoints are unpickled with `weights_only=False`; this folder holds safetensors and JSON only:

    <save_name>.state/encoder.safetensors    full fp32 encoder parameters + the fp32 anchor
    <save_name>.state/optimizer.safetensors  exp_avg/<param>, exp_avg_sq/<param> (full, whatever the ZeRO stage)
    <save_name>.state/rng.safetensors        every rank's torch RNG state(s): cpu.<rank>, cuda.<rank>
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
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file

from ..prefix.io import file_mode

MOMENTS = ("exp_avg", "exp_avg_sq")
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the real optimizer here


def _plain_state(engine, p):
    """Optimizer state of a parameter the optimizer updates directly (no DeepSpeed fp32 copy)."""
    return _base_optimizer(engine).state.setdefault(p, {})


def _stage0_master(engine, p):
    """Where DeepSpeed's ZeRO-0 fp16/bf16 optimizers keep `p`'s fp32 master copy, which the tensor-fragment API
    does not see: (the fp32 tensor the optimizer steps and keys its state by, slice of it that is `p`), or None.

    Without this, ZeRO-0 with fp16/bf16 saved the 16-bit working copy, and a resume wrote into `p.data` only: the
    first step copied the untouched master (the step-0 values) back over it.
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, FP16_Optimizer):  # one flat fp32 tensor per parameter group
        for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for q in group:
                if q is p:
                    return flat, slice(offset, offset + q.numel())
                offset += q.numel()
    elif isinstance(opt, FP16_UnfusedOptimizer):  # one fp32 tensor per parameter
        for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for q, master in zip(group, masters):
                if q is p:
                    return master, slice(0, master.numel())
    return None


def full_fp32(engine, p) -> torch.Tensor:
    v = safe_get_full_fp32_param(p)
    if v is None:
        where = _stage0_master(engine, p)
        v = p.detach() if where is None else where[0].detach().view(-1)[where[1]].view(p.shape)
    return v.float().cpu().clone()


def _full_moment(engine, p, key) -> torch.Tensor:
    v = safe_get_full_optimizer_state(p, key)
    if v is None:
        where = _stage0_master(engine, p)
        if where is not None:
            st = _base_optimizer(engine).state.get(where[0], {}).get(key)
            v = None if st is None else st.view(-1)[where[1]].view(p.shape)
        else:
            v = _plain_state(engine, p).get(key)
    return torch.zeros(p.shape) if v is None else v.float().cpu().clone()


def _loss_scaler(engine):
    """The object holding fp16's dynamic loss scale: ZeRO's `loss_scaler`; the ZeRO-0 fp16 optimizers keep it in
    `loss_scale_config` (without it a resume restarted at 2**16 and skipped other overflow steps)."""
    opt = engine.optimizer
    return getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)


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
    params = [p for group in base.param_groups for p in group["params"]]
    # ZeRO-3 hands its flat fp32 partitions to the optimizer only for the duration of a step
    known = {id(p) for p in params}
    params += [p for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) if id(p) not in known]
    for p in params:
        st = base.state[p]
        if not st:
            st["step"] = 0 if isinstance(base, DeepSpeedCPUAdam) else torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def gather_state(engine, named_params) -> tuple[dict, dict, dict, dict]:
    """(fp32 params, moments, scaler fields, RNG states) -- collective."""
    ensure_optimizer_state(engine)
    params = gather_params(engine, named_params)
    moments = {f"{k}/{n}": _full_moment(engine, p, k) for n, p in named_params for k in MOMENTS}
    scaler = _loss_scaler(engine)
    fields = {f: getattr(scaler, f) for f in SCALER_FIELDS if scaler is not None and hasattr(scaler, f)}
    fields = {k: (v.item() if torch.is_tensor(v) else v) for k, v in fields.items()}
    return params, moments, fields, gather_rng()


def gather_rng() -> dict:
    """Every rank's RNG states -- each rank draws its own dropout masks -- as {"cpu.<rank>": ...}; collective."""
    import torch.distributed as dist

    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    states = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
    return {f"{k}.{rank}": v.cpu() for rank, st in enumerate(states) for k, v in st.items()}


def write_state(folder: Path, params: dict, anchor: torch.Tensor, moments: dict, rng: dict, trainer: dict) -> None:
    """Write the whole folder beside `folder`, then swap it in: a crash leaves the previous state intact."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({**params, "anchor": anchor.float().cpu().contiguous()}, str(tmp / "encoder.safetensors"))
        save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2, default=str), encoding="utf-8")
        for f in tmp.iterdir():  # safetensors creates its files 0600 whatever the umask: give them open()'s mode
            os.chmod(f, file_mode())
    except BaseException:  # disk full, interrupted: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.is_dir():
        old.rename(folder)  # a kill between the renames left the only state in .old: keep it until the new one is in
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


def _set_working_copy(p, value: torch.Tensor) -> None:
    """Write `value` into the parameter the forward pass uses; under ZeRO-3 it is partitioned (empty here), so
    gather it, write on rank 0 and let DeepSpeed re-partition -- every rank must call this together."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.device, p.dtype).view(p.shape))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


@torch.no_grad()
def restore_state(engine, named_params, params: dict, moments: dict, trainer: dict, rng: dict) -> None:
    """Put a saved state back -- into DeepSpeed's fp32 masters, its optimizer state and the working copies."""
    step = trainer["optimizer_steps"]
    ensure_optimizer_state(engine)
    base = _base_optimizer(engine)
    for n, p in named_params:
        value = params[n]
        hp = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # a ZeRO or bf16 optimizer holds the master
        where = None if hp else _stage0_master(engine, p)
        if hp:
            safe_set_full_fp32_param(p, value.to(p.device))
        elif where is not None:
            where[0].data.view(-1)[where[1]] = value.view(-1).to(where[0].device)
        _set_working_copy(p, value)
        for k in MOMENTS:
            m = moments[f"{k}/{n}"]
            if hp:
                safe_set_full_optimizer_state(p, m.to(p.device), k)
            elif where is not None:
                base.state[where[0]][k].view(-1)[where[1]] = m.view(-1).to(where[0].device)
            else:
                _plain_state(engine, p)[k] = m.to(p.device, p.dtype)
    for st in base.state.values():
        if "step" in st:
            st["step"] = type(st["step"])(step) if not torch.is_tensor(st["step"]) else torch.tensor(float(step))
    scaler = _loss_scaler(engine)
    for f, v in trainer.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, f):
            setattr(scaler, f, v)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.set_rng_state(rng.get(f"cpu.{rank}", rng.get("cpu")))
    cuda = rng.get(f"cuda.{rank}", rng.get("cuda"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
