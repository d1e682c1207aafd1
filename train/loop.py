"""Train a prefix for a frozen causal LM under DeepSpeed -- one flat loop.

    # the README demo: embedded SmolLM2-135M, built-in data, smileface, 2 CPU processes
    deepspeed --num_gpus 2 -m train --bf16 --offload --save_name smileface --save_dir runs
    # one process, no launcher
    python -m train --save_name smileface --save_dir runs
    # rinna's GPT-NeoX 3.6B on two 16 GB T4s
    deepspeed -m train --model rinna/japanese-gpt-neox-3.6b --data_filepath data.jsonl --fp16 \
        --deepspeed_config ds_configs/zero2_offload_fp16.json --gradient_checkpointing --save_name task

Outputs in --save_dir: <save_name>.safetensors (the best prefix, deployable), <save_name>.state/ (for --resume),
<save_name>.metrics.jsonl (one line per optimizer step). Only rank 0 writes; every file is written atomically.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch

from prefixtune.data import DataError, build_split, builtin_records, collate, read_jsonl
from prefixtune.prefix import PrefixEncoder, PrefixLM, is_trainable, prefix_shape, text_key_values
from prefixtune.prefix.base import load_base
from prefixtune.prefix.io import atomic_path, save_prefix

from .args import TrainArgs, parse_args
from .ds_config import build_ds_config, offloads, precision
from .state import (find_state, gather_params, gather_state, optimizer_step_count, read_state, restore_state,
                    write_state)

SEED_MODEL_TYPES = {"gpt-neox": "gpt_neox", "gpt": "gpt2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the launcher's process group, or make a one-process group when run without the launcher."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # Processes share the cores: one thread pool per core, not per process, avoids oversubscription.
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return rank, world, device


def lr_at(step: int, total: int, a: TrainArgs) -> float:
    """Linear warmup to --max_lr, then cosine decay to --min_lr; `step` counts optimizer steps from 0."""
    if step < a.n_warmup_steps:
        return a.max_lr * (step + 1) / a.n_warmup_steps
    frac = (step - a.n_warmup_steps) / max(1, total - a.n_warmup_steps)
    return a.min_lr + 0.5 * (a.max_lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(params, a: TrainArgs, offload: bool, device):
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=a.max_lr, weight_decay=a.weight_decay, adamw_mode=True)
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=a.max_lr, weight_decay=a.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=a.max_lr, weight_decay=a.weight_decay)


def load_records(a: TrainArgs) -> list[dict]:
    return read_jsonl(a.data_path) if a.data_path else builtin_records()


class Log:
    """Rank-0 output: console lines (around the progress bar) and the metrics JSONL."""

    def __init__(self, rank: int, metrics_path: Path):
        self.on = rank == 0
        self.metrics_path = metrics_path
        self.bar = None

    def __call__(self, msg: str) -> None:
        if self.on:
            (self.bar.write if self.bar is not None else print)(msg)

    def metrics(self, row: dict) -> None:
        if self.on:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """On resume: forget the steps after the saved state, which will be run again."""
        if not self.on or not self.metrics_path.exists():
            return
        rows = [r for r in self.metrics_path.read_text(encoding="utf-8").splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r)["step"] <= last_step]
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(r + "\n" for r in keep), encoding="utf-8")


def main(argv=None) -> int:
    a = parse_args(argv)
    rank, world, device = init_distributed()
    import deepspeed
    import torch.distributed as dist

    ds_cfg = build_ds_config(a, world)
    if offloads(ds_cfg) and ds_cfg["zero_optimization"]["stage"] == 0:
        raise SystemExit("--offload needs ZeRO stage 1, 2 or 3: set --zero_stage 2")
    out = Path(a.save_dir)
    prefix_path, state_dir = out / f"{a.save_name}.safetensors", out / f"{a.save_name}.state"
    log = Log(rank, out / f"{a.save_name}.metrics.jsonl")
    if prefix_path.exists() and not (a.resume or a.overwrite):
        raise SystemExit(f"{prefix_path} exists: pass --resume to continue that run, --overwrite to start afresh, "
                         "or choose another --save_name")
    if a.resume and find_state(state_dir) is None:
        raise SystemExit(f"--resume: no training state at {state_dir}; start without --resume")
    torch.manual_seed(a.seed)

    # ---- base model, data, prefix encoder
    # Load in the training precision: a 3.6B model in fp32 (14 GB) would not fit a 16 GB T4 before DeepSpeed casts it.
    base, tok, model_name = load_base(a.model, precision(ds_cfg), device)
    model_type = base.config.model_type
    if a.model_type and SEED_MODEL_TYPES[a.model_type] != model_type:
        raise SystemExit(f"--model_type {a.model_type} expects a {SEED_MODEL_TYPES[a.model_type]} model, "
                         f"but {model_name} is {model_type}: fix or drop --model_type")
    shape = prefix_shape(base.config, a.prefix_seq_len)
    max_pos = getattr(base.config, "n_positions", None)  # absolute position embeddings (GPT-2)
    if max_pos and a.prefix_seq_len + a.max_seq_len > max_pos:
        raise SystemExit(f"--prefix_seq_len + --max_seq_len = {a.prefix_seq_len + a.max_seq_len} exceeds the "
                         f"model's {max_pos} positions: shorten one of them")
    try:
        records = load_records(a)
        train_ex, dev_ex, _ = build_split(
            records, tok, max_len=a.max_seq_len, transform=a.data_transform, seed=a.seed,
            train_size=a.train_data_size, dev_size=a.dev_data_size, eos_id=tok.eos_token_id)
    except DataError as e:
        raise SystemExit(f"bad training data: {e}") from None
    micro, accum = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    global_batch = micro * accum * world
    steps_per_epoch = len(train_ex) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_ex)} training examples do not fill one optimizer step of {global_batch} "
                         f"(batch_size {micro} x n_accum_steps {accum} x {world} processes): add data or shrink these")
    total = a.max_steps or steps_per_epoch * a.n_epochs

    encoder = PrefixEncoder(shape, a.prefix_input_dim, a.prefix_hidden_dim, a.prefix_dropout)
    anchor = text_key_values(base, tok, a.prefix_init_text, shape) if a.prefix_init == "text" else None
    encoder.reset(a.prefix_init, anchor)
    anchor_fp32 = encoder.anchor.detach().clone().cpu()  # DeepSpeed casts buffers to fp16/bf16; keep the truth
    model = PrefixLM(base, encoder).to(device)
    if a.gradient_checkpointing:
        model.gradient_checkpointing(True)
    named = [(n, p) for n, p in model.named_parameters() if is_trainable(n)]
    optimizer = make_optimizer([p for _, p in named], a, offloads(ds_cfg), device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                      model_parameters=[p for _, p in named])
    prec = precision(ds_cfg)
    def numel(p):  # ZeRO-3 partitions parameters: their local numel() is 0
        return getattr(p, "ds_numel", p.numel())

    n_trainable = sum(numel(p) for _, p in named)
    n_base = sum(numel(p) for p in base.parameters())
    log(f"base {model_name} ({model_type}, {n_base / 1e6:.1f}M params) | prefix P={shape.prefix_len} "
        f"L={shape.num_layers} H_kv={shape.num_kv_heads} D={shape.head_dim}: table {shape.prefix_len * shape.width:,} "
        f"values, encoder {n_trainable:,} trainable params | {len(train_ex)} train / {len(dev_ex)} dev examples | "
        f"{world} process(es), {prec}, ZeRO-{ds_cfg['zero_optimization']['stage']}"
        f"{' + CPU offload' if offloads(ds_cfg) else ''} | {total} steps of {global_batch} examples")

    def evaluate() -> float:
        """Token-weighted dev loss over the whole dev set (sharded across processes)."""
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        mine = dev_ex[rank::world]
        with torch.no_grad():
            for i in range(0, len(mine), micro):
                loss, n = engine(**{k: v.to(device) for k, v in collate(mine[i:i + micro], tok.pad_token_id).items()})
                sums += torch.stack([loss.double() * n, n.double()])
        dist.all_reduce(sums)
        engine.train()
        return (sums[0] / sums[1]).item()

    def fp32_table(params: dict) -> torch.Tensor:
        """The prefix table from the fp32 master weights (not the fp16/bf16 working copy)."""
        enc = PrefixEncoder(shape, a.prefix_input_dim, a.prefix_hidden_dim, 0.0)
        enc.load_state_dict({n.removeprefix("encoder."): v for n, v in params.items()} | {"anchor": anchor_fp32})
        with torch.no_grad():
            return enc.eval()()  # (P, L*2*H_kv*D)

    def save_best(params: dict) -> None:
        if rank == 0:
            save_prefix(prefix_path, fp32_table(params), shape, task=a.task or a.save_name, base_model=model_name,
                        architecture=model_type, train_args=vars(a))

    def save_training_state(step: int, best: float, params: dict, moments: dict, scaler: dict) -> None:
        if rank == 0:
            trainer = {"step": step, "optimizer_steps": optimizer_step_count(engine), "best_dev_loss": best,
                       "loss_scaler": scaler, "global_batch": global_batch, "n_train": len(train_ex),
                       "args": vars(a)}
            write_state(state_dir, params, anchor_fp32, moments, trainer)
        dist.barrier()

    # ---- resume or start
    step, best = 0, float("inf")
    if a.resume:
        params, moments, rng, trainer = read_state(find_state(state_dir))
        if trainer["global_batch"] != global_batch or trainer["n_train"] != len(train_ex):
            raise SystemExit(f"--resume: the saved run used {trainer['n_train']} examples in steps of "
                             f"{trainer['global_batch']}, this one {len(train_ex)} in steps of {global_batch}; "
                             "resume with the same data, batch size, accumulation and process count")
        restore_state(engine, named, params, moments, trainer, rng)
        step, best = trainer["step"], trainer["best_dev_loss"]
        log.truncate_metrics(step)
        log(f"resumed at step {step} (best dev loss {best:.4f})")
    else:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            log.metrics_path.unlink(missing_ok=True)
        best = evaluate()  # the starting prefix is the one to beat, and is kept if nothing beats it
        save_best(gather_params(engine, named))  # collective under ZeRO
        log(f"step 0: dev loss {best:.4f} ppl {math.exp(min(best, 50)):.2f}")
        log.metrics({"step": 0, "dev_loss": best, "dev_ppl": math.exp(min(best, 50))})

    # ---- train
    from tqdm import tqdm

    log.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=rank != 0 or not sys.stderr.isatty())  # logs get the per-step lines instead
    stop_after = int(os.environ.get("PREFIXTUNE_CRASH_AFTER_STEP", "0"))  # tests: simulate a kill
    engine.train()
    t_start, tokens_seen = time.time(), 0
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(a.seed * 1000 + epoch))
        lr = lr_at(step, total, a)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens) over the step
        for k in range(accum):
            first = pos * global_batch + (k * world + rank) * micro
            batch = collate([train_ex[i] for i in order[first:first + micro].tolist()], tok.pad_token_id)
            loss, n = engine(**{key: v.to(device) for key, v in batch.items()})
            engine.backward(loss)
            engine.step()
            stats += torch.stack([loss.detach().double() * n, n.double()])
        dist.all_reduce(stats)
        step += 1
        train_loss = (stats[0] / stats[1]).item()
        dt = time.time() - t0
        tokens_seen += int(stats[1].item())
        row = {"step": step, "epoch": epoch, "loss": train_loss, "lr": lr, "tokens_per_s": stats[1].item() / dt}
        log.bar.update(1)
        log.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
        if step % a.log_every == 0:
            log(f"step {step}/{total} | loss {train_loss:.4f} | lr {lr:.2e} | {row['tokens_per_s']:.0f} tok/s")
        if step == total or (a.eval_every and step % a.eval_every == 0) or \
                (not a.eval_every and step % steps_per_epoch == 0):
            dev = evaluate()
            row |= {"dev_loss": dev, "dev_ppl": math.exp(min(dev, 50))}
            improved = dev < best
            params, moments, scaler = gather_state(engine, named)  # collective: gathered once per evaluation
            if improved:
                best = dev
                save_best(params)
            log(f"step {step}: dev loss {dev:.4f} ppl {row['dev_ppl']:.2f}"
                + (f" -> saved {prefix_path}" if improved else f" (best {best:.4f})"))
            log.metrics(row)
            save_training_state(step, best, params, moments, scaler)
        else:
            log.metrics(row)
        if stop_after and step == stop_after:
            os._exit(3)
    log.bar.close()
    log.bar = None
    elapsed = time.time() - t_start
    log(f"done: {step} steps in {elapsed:.0f}s ({tokens_seen / max(elapsed, 1e-9):.0f} tok/s on this run), "
        f"best dev loss {best:.4f}; prefix: {prefix_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
