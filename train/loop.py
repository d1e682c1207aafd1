"""Train a prefix for a frozen causal LM under DeepSpeed: setup, fit, evaluate, save.

    # the README demo: embedded SmolLM2-135M, built-in data, smileface, 2 CPU processes
    deepspeed --num_gpus 2 --module train --save_name smileface --save_dir runs
    # one process, no launcher (python -m prefixtune.train is the same program)
    python -m train --save_name smileface --save_dir runs
    # rinna's GPT-NeoX 3.6B on two 16 GB T4s
    deepspeed --num_gpus 2 --module train --model rinna/japanese-gpt-neox-3.6b --data_filepath data.jsonl --fp16 \
        --deepspeed_config ds_configs/zero2_offload_fp16.json --gradient_checkpointing --save_name task

DeepSpeed's launcher spells "run a module" `--module`; it has no `-m`. What the run writes is in outputs.py.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..data import DataError, SplitReport, build_split, builtin_records, collate, epoch_order, read_jsonl
from ..prefix import PrefixEncoder, PrefixLM, PrefixShape, is_trainable, prefix_shape, text_key_values
from ..prefix.base import load_base
from ..prefix.errors import UserError, exits_on_error, one_line
from ..prefix.io import save_prefix
from ..prefix.positions import absolute_position_limit, positions_needed
from ..prefix.quantize import hidden_from_deepspeed
from .args import TrainArgs, parse_args, resume_mismatches
from .ds_config import build_ds_config, offloads, precision, to_be_written, unsupported_precision, write_built_config
from .outputs import Log, Outputs, RunLock, no_space_message
from .ports import free_port
from .state import find_state, gather_params, gather_state, optimizer_step_count, read_state, restore_state, write_state

SEED_MODEL_TYPES = {"gpt-neox": "gpt_neox", "gpt": "gpt2"}


@dataclass
class Run:
    """Everything `setup` builds once; fit, evaluate and the saves take it explicitly."""

    args: TrainArgs
    rank: int
    world: int
    device: torch.device
    ds_cfg: dict
    engine: object  # deepspeed.DeepSpeedEngine wrapping PrefixLM
    named: list  # [(name, parameter)] of the trainable parameters, in optimizer order
    tok: object
    model_name: str
    model_type: str
    shape: PrefixShape
    anchor_fp32: torch.Tensor  # DeepSpeed casts buffers to fp16/bf16; the saved table uses this one
    train_ex: list
    dev_ex: list
    total: int  # optimizer steps of the whole run
    out: Outputs
    log: Log

    def epoch_order(self, epoch: int) -> list[int]:
        """Example indices of `epoch` in training order (data.epoch_order), computed once per epoch."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != epoch:
            lengths = [len(e["input_ids"]) for e in self.train_ex]
            cached = self._order = (epoch, epoch_order(lengths, self.global_batch, self.args.seed, epoch,
                                                       self.args.batching == "buckets"))
        return cached[1]

    @property
    def micro(self) -> int:
        return self.ds_cfg["train_micro_batch_size_per_gpu"]

    @property
    def accum(self) -> int:
        return self.ds_cfg["gradient_accumulation_steps"]

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_ex) // self.global_batch


# ---------------------------------------------------------------------------------------------------- setup

def pin_malloc_thresholds(low_memory: bool = False) -> None:
    """Pin glibc's malloc thresholds (Linux/glibc only; elsewhere nothing happens).

    Left to itself, glibc raises its mmap threshold (up to 32 MiB) whenever a large block is freed, and freed blocks
    under it stay in heaps it rarely gives back: after a few steps ~470 MiB of freed activation memory stayed in the
    process (SmolLM2-135M, batch 8, bf16). Fixed thresholds stop that drift. Blocks above the mmap threshold are
    fresh mappings whose pages fault in again at every allocation: the loss buffers and DeepSpeed's flat copies of
    the encoder's gradients (20-30 MiB each) cost ~32,000 page faults and ~55 ms of kernel time a step at a 4 MiB
    threshold, ~6,000 and ~14 ms at 64 MiB, for 3-5 % more tokens/s; the peak RSS moves more from run to run
    (1376-1481 MiB in four bench runs against 1401-1408 at 4 MiB). With `low_memory` (gradient checkpointing, the
    memory lever) the threshold stays at 4 MiB: there the heap's fragments would raise the peak by ~6 % (1160 ->
    1227 MiB over 20 steps on those settings). Otherwise the heap also keeps up to 256 MiB free at its top for the
    next step instead of returning it and faulting it in again."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # some glibc versions refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB) and return 0: then take 32 MiB
    for mib in (4,) if low_memory else (64, 32):
        if mallopt(M_MMAP_THRESHOLD, mib << 20):
            if not low_memory:
                mallopt(M_TRIM_THRESHOLD, 256 << 20)
            return


def init_distributed():
    """Join the launcher's process group, or make a one-process group when run without the launcher."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # Processes share the cores: one thread pool per core, not per process, avoids oversubscription.
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        return rank, world, torch.device("cpu")
    acc.set_device(local_rank)
    return rank, world, torch.device(acc.device_name(local_rank))


def check_outputs(a: TrainArgs, out: Outputs) -> None:
    if out.prefix.exists() and not (a.resume or a.overwrite):
        raise UserError(f"{out.prefix} exists: pass --resume to continue that run, --overwrite to start "
                        "afresh, or choose another --save_name")
    if a.resume and find_state(out.state) is None:
        raise UserError(f"--resume: no training state at {out.state}; start without --resume")


def load_model(a: TrainArgs, dtype: str, device):
    """(frozen base, tokenizer, name, model_type), with one-line errors for what cannot be trained."""
    try:
        base, tok, name = load_base(a.model, dtype, device, quantize=a.quantize)  # refuses what it cannot serve, first
    except (OSError, ValueError) as e:
        msg = one_line(e)
        msg = msg if msg.startswith(("--model", "--quantize")) else f"--model {a.model}: {msg}"
        raise UserError(msg) from None
    model_type = base.config.model_type
    if a.model_type and SEED_MODEL_TYPES[a.model_type] != model_type:
        raise UserError(f"--model_type {a.model_type} expects a {SEED_MODEL_TYPES[a.model_type]} model, "
                        f"but {name} is {model_type}: fix or drop --model_type")
    max_pos = absolute_position_limit(base)  # a learned position table (GPT-2) ends; rotary positions do not
    if positions_needed(a.prefix_seq_len, a.max_seq_len) > (max_pos or math.inf):
        raise UserError(f"--prefix_seq_len + --max_seq_len = "
                        f"{positions_needed(a.prefix_seq_len, a.max_seq_len)} exceeds the model's {max_pos} positions: "
                        "shorten one of them")
    return base, tok, name, model_type


def load_examples(a: TrainArgs, tok, log: Log) -> tuple[list, list]:
    report = SplitReport()
    try:
        records = read_jsonl(a.data_path) if a.data_path else builtin_records()
        train_ex, dev_ex, _ = build_split(
            records, tok, max_len=a.max_seq_len, transform=a.data_transform, seed=a.seed,
            train_size=a.train_data_size, dev_size=a.dev_data_size, eos_id=tok.eos_token_id, report=report)
    except DataError as e:
        raise UserError(f"bad training data: {e}") from None
    source = a.data_path or "built-in paragraphs"
    log(f"data: {source}, transform {a.data_transform}"
        + (" (appends ' 😃' to every line; --transform none trains the text as is)"
           if a.data_transform == "smileface" else ""))
    for line in report.lines():
        log(line)
    if not dev_ex:
        raise UserError(f"{source}: no record gives a dev example; add data or raise --max_seq_len")
    return train_ex, dev_ex


def make_optimizer(params, a: TrainArgs, offload: bool, device):
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=a.max_lr, weight_decay=a.weight_decay, adamw_mode=True)
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=a.max_lr, weight_decay=a.weight_decay, adam_w_mode=True)
    # fused: one pass over the flat fp32 partition instead of one per Adam op (2 vs 20 ms for 6.2M values on a
    # 2-core CPU)
    fused = True if device.type == "cpu" else None  # None: torch's own default (foreach) elsewhere
    return torch.optim.AdamW(params, lr=a.max_lr, weight_decay=a.weight_decay, fused=fused)


def leave_process_group() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits. Left to the exit-time
    destructors, a rank of a finished 2-process CPU run occasionally died with "terminate called without an active
    exception" after its last save, and the launcher reported the whole run as failed."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def setup(a: TrainArgs, ds_cfg: dict, out: Outputs) -> Run:
    rank, world, device = init_distributed()
    import deepspeed

    log = Log(rank, out.metrics)
    torch.manual_seed(a.seed)
    # Load in the training precision: a 3.6B model in fp32 (14 GB) would not fit a 16 GB T4 before DeepSpeed casts it.
    base, tok, model_name, model_type = load_model(a, precision(ds_cfg), device)
    shape = prefix_shape(base.config, a.prefix_seq_len)
    train_ex, dev_ex = load_examples(a, tok, log)
    global_batch = ds_cfg["train_micro_batch_size_per_gpu"] * ds_cfg["gradient_accumulation_steps"] * world
    if len(train_ex) < global_batch:
        raise UserError(f"{len(train_ex)} training examples do not fill one optimizer step of {global_batch} "
                        f"(--batch_size {ds_cfg['train_micro_batch_size_per_gpu']} x --n_accum_steps "
                        f"{ds_cfg['gradient_accumulation_steps']} x {world} processes): add data or shrink these")

    # Seeded again here: the encoder's initial weights depend on --seed alone, not on how many random numbers loading
    # the base drew (a GGUF converted on first use, and a cached folder read later, draw differently).
    torch.manual_seed(a.seed)
    encoder = PrefixEncoder(shape, a.prefix_input_dim, a.prefix_hidden_dim, a.prefix_dropout)
    anchor = text_key_values(base, tok, a.prefix_init_text, shape) if a.prefix_init == "text" else None
    encoder.reset(a.prefix_init, anchor)
    anchor_fp32 = encoder.anchor.detach().clone().cpu()
    model = PrefixLM(base, encoder).to(device)
    if a.gradient_checkpointing:
        model.gradient_checkpointing(True)
    named = [(n, p) for n, p in model.named_parameters() if is_trainable(n)]
    optimizer = make_optimizer([p for _, p in named], a, offloads(ds_cfg), device)
    with hidden_from_deepspeed(model):  # quantized frozen weights: DeepSpeed must not move them (prefix/quantize.py)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                          model_parameters=[p for _, p in named])
    steps_per_epoch = len(train_ex) // global_batch
    run = Run(a, rank, world, device, ds_cfg, engine, named, tok, model_name, model_type, shape, anchor_fp32,
              train_ex, dev_ex, a.max_steps or steps_per_epoch * a.n_epochs, out, log)
    describe(run, base)
    return run


def describe(run: Run, base) -> None:
    def numel(p):  # ZeRO-3 partitions parameters: their local numel() is 0
        return getattr(p, "ds_numel", p.numel())

    a, shape, cfg = run.args, run.shape, run.ds_cfg
    n_trainable = sum(numel(p) for _, p in run.named)
    n_base = sum(numel(p) for p in base.parameters())
    run.log(f"base {run.model_name} ({run.model_type}, {n_base / 1e6:.1f}M params) | prefix P={shape.prefix_len} "
            f"L={shape.num_layers} H_kv={shape.num_kv_heads} D={shape.head_dim}: table "
            f"{shape.prefix_len * shape.width:,} values, encoder {n_trainable:,} trainable params | "
            f"{len(run.train_ex)} train / {len(run.dev_ex)} dev examples | {run.world} process(es), {precision(cfg)}, "
            f"ZeRO-{cfg['zero_optimization']['stage']}{' + CPU offload' if offloads(cfg) else ''} | {run.total} "
            f"steps of {run.global_batch} examples")
    if a.deepspeed or a.save_model:
        run.log("note: --deepspeed and --save_model are accepted for the seed's command line and change nothing: "
                "training always runs under DeepSpeed, and the best prefix is always saved")


# ---------------------------------------------------------------------------------------------------- evaluate

def evaluate(run: Run) -> float:
    """Token-weighted dev loss over the whole dev set, sharded across processes.

    Every rank runs the same number of forward passes -- under ZeRO-3 each one is a collective, and a rank with
    fewer dev examples would leave the others waiting forever -- padding its shard with zero-weight batches.
    """
    engine, micro = run.engine, run.micro
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # (loss * tokens, tokens)
    mine = run.dev_ex[run.rank::run.world]
    n_batches = math.ceil(math.ceil(len(run.dev_ex) / run.world) / micro)
    with torch.no_grad():
        for i in range(n_batches):
            chunk = mine[i * micro:(i + 1) * micro]
            batch = collate(chunk or run.dev_ex[:1], run.tok.pad_token_id)
            loss, n = engine(**{k: v.to(run.device) for k, v in batch.items()})
            if chunk:
                sums += torch.stack([loss.double() * n, n.double()])
    torch.distributed.all_reduce(sums)
    engine.train()
    return (sums[0] / sums[1]).item()


# ---------------------------------------------------------------------------------------------------- save

def fp32_table(run: Run, params: dict) -> torch.Tensor:
    """The prefix table from the fp32 master weights (not the fp16/bf16 working copy)."""
    a = run.args
    with torch.random.fork_rng(devices=[]):  # building the module draws random weights: keep the run's stream
        enc = PrefixEncoder(run.shape, a.prefix_input_dim, a.prefix_hidden_dim, 0.0)
    enc.load_state_dict({n.removeprefix("encoder."): v for n, v in params.items()} | {"anchor": run.anchor_fp32})
    with torch.no_grad():
        return enc.eval()()  # (P, L*2*H_kv*D)


def _on_disk_full(e: Exception, what: str, run: Run, need: int):
    msg = no_space_message(e, what, run.out.folder, need)
    if msg is None:
        raise e
    raise UserError(msg) from None


def save_best(run: Run, params: dict) -> None:
    if run.rank != 0:
        return
    table = fp32_table(run, params)
    try:
        save_prefix(run.out.prefix, table, run.shape, task=run.args.task or run.args.save_name,
                    base_model=run.model_name, architecture=run.model_type, train_args=vars(run.args))
    except (OSError, SafetensorError) as e:
        _on_disk_full(e, "prefix", run, table.numel() * 4)


def run_settings(run: Run) -> dict:
    """What DeepSpeed resolved from flags and config file that moves the loss curve: a resume must keep it."""
    cfg = run.ds_cfg
    return {"precision": precision(cfg), "zero_stage": cfg["zero_optimization"]["stage"], "offload": offloads(cfg),
            "gradient_clipping": cfg["gradient_clipping"]}


def save_state(run: Run, step: int, best: float, params: dict, moments: dict, scaler: dict, rng: dict) -> None:
    if run.rank == 0:
        trainer = {"step": step, "optimizer_steps": optimizer_step_count(run.engine), "best_dev_loss": best,
                   "loss_scaler": scaler, "global_batch": run.global_batch, "n_train": len(run.train_ex),
                   "world_size": run.world, **run_settings(run), "args": vars(run.args)}
        try:
            write_state(run.out.state, params, run.anchor_fp32, moments, rng, trainer)
        except (OSError, SafetensorError) as e:
            need = sum(t.numel() * 4 for t in (*params.values(), *moments.values()))
            _on_disk_full(e, "training state", run, need)
    torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------- resume

def resume(run: Run) -> tuple[int, float]:
    """Restore the saved state after checking that it belongs to this run; (step, best dev loss)."""
    folder = find_state(run.out.state)
    try:
        params, moments, rng, trainer = read_state(folder)
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"--resume: {folder} is damaged ({one_line(e)}); start afresh with --overwrite") from None
    problems = resume_mismatches(trainer.get("args", {}), run.args, trainer.get("world_size", run.world), run.world)
    for key, now in run_settings(run).items():
        if key in trainer and trainer[key] != now:
            problems.append(f"{key}: the state has {trainer[key]!r}, this run {now!r}")
    have = dict(run.named)
    for n, t in params.items():
        if n in have and tuple(t.shape) != tuple(getattr(have[n], "ds_shape", have[n].shape)):
            problems.append(f"{n}: the state has shape {tuple(t.shape)}, this model and prefix need "
                            f"{tuple(getattr(have[n], 'ds_shape', have[n].shape))}")
    missing = sorted(set(have) - set(params))
    if missing:
        problems.append(f"the state lacks {', '.join(missing)}")
    if not problems and (trainer["global_batch"] != run.global_batch or trainer["n_train"] != len(run.train_ex)):
        problems.append(f"the saved run used {trainer['n_train']} examples in steps of {trainer['global_batch']}, "
                        f"this one {len(run.train_ex)} in steps of {run.global_batch}")
    if problems:
        raise UserError(f"--resume: {folder} is the state of another run ({'; '.join(problems)}): resume "
                        "with the same arguments, or start afresh with --overwrite")
    # the anchor as the run began: recomputing it under another precision or library version would move it
    run.anchor_fp32 = params.pop("anchor")
    with torch.no_grad():
        run.engine.module.encoder.anchor.copy_(run.anchor_fp32)
    restore_state(run.engine, run.named, params, moments, trainer, rng)
    step, best = trainer["step"], trainer["best_dev_loss"]
    run.log.truncate_metrics(step)
    run.log(f"resumed at step {step} (best dev loss {best:.4f})")
    return step, best


def start(run: Run) -> tuple[int, float]:
    """Fresh run: the starting prefix is the one to beat, and is kept if nothing beats it."""
    if run.rank == 0:  # under the lock: nothing of an earlier run (--overwrite) may be resumed into this one
        run.log.metrics_path.unlink(missing_ok=True)
        for old in (run.out.state, run.out.state.with_name(run.out.state.name + ".old")):
            shutil.rmtree(old, ignore_errors=True)
    best = evaluate(run)
    save_best(run, gather_params(run.engine, run.named))  # collective under ZeRO
    run.log(f"step 0: dev loss {best:.4f} ppl {math.exp(min(best, 50)):.2f}")
    run.log.metrics({"step": 0, "dev_loss": best, "dev_ppl": math.exp(min(best, 50))})
    return 0, best


# ---------------------------------------------------------------------------------------------------- fit

def lr_at(step: int, total: int, a: TrainArgs) -> float:
    """Linear warmup to --max_lr, then cosine decay to --min_lr; `step` counts optimizer steps from 0."""
    if step < a.n_warmup_steps:
        return a.max_lr * (step + 1) / a.n_warmup_steps
    frac = (step - a.n_warmup_steps) / max(1, total - a.n_warmup_steps)
    return a.min_lr + 0.5 * (a.max_lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimizer step (accumulating micro-batches); returns (loss * tokens, tokens) summed over all ranks."""
    engine, micro, a = run.engine, run.micro, run.args
    epoch, pos = divmod(step, run.steps_per_epoch)
    order = run.epoch_order(epoch)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(step, run.total, a)
    stats = torch.zeros(2, dtype=torch.float64, device=run.device)
    for k in range(run.accum):
        first = pos * run.global_batch + (k * run.world + run.rank) * micro
        batch = collate([run.train_ex[i] for i in order[first:first + micro]], run.tok.pad_token_id)
        loss, n = engine(**{key: v.to(run.device) for key, v in batch.items()})
        engine.backward(loss)
        engine.step()
        stats += torch.stack([loss.detach().double() * n, n.double()])
    torch.distributed.all_reduce(stats)
    return stats


def fit(run: Run, step: int, best: float) -> float:
    from tqdm import tqdm

    a, log = run.args, run.log
    log.bar = tqdm(total=run.total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=run.rank != 0 or not sys.stderr.isatty())  # logs get the per-step lines instead
    run.engine.train()
    t_start, tokens_seen, step_time = time.time(), 0, 0.0
    while step < run.total:
        t0 = time.perf_counter()
        lr = lr_at(step, run.total, a)
        stats = train_step(run, step)
        step += 1
        train_loss, n_tokens = (stats[0] / stats[1]).item(), int(stats[1].item())
        step_s = time.perf_counter() - t0
        tokens_seen, step_time = tokens_seen + n_tokens, step_time + step_s
        # tokens = labelled target tokens of the step over all ranks; step_s excludes evaluation and saving
        row = {"step": step, "epoch": (step - 1) // run.steps_per_epoch, "loss": train_loss, "lr": lr,
               "tokens": n_tokens, "step_s": step_s, "tokens_per_s": n_tokens / step_s}
        log.bar.update(1)
        log.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
        if step % a.log_every == 0:
            log(f"step {step}/{run.total} | loss {train_loss:.4f} | lr {lr:.2e} | {row['tokens_per_s']:.0f} tok/s")
        if step == run.total or (a.eval_every and step % a.eval_every == 0) or \
                (not a.eval_every and step % run.steps_per_epoch == 0):
            dev = evaluate(run)
            row |= {"dev_loss": dev, "dev_ppl": math.exp(min(dev, 50))}
            params, moments, scaler, rng = gather_state(run.engine, run.named)  # collective: once per evaluation
            improved = dev < best
            if improved:
                best = dev
                save_best(run, params)
            log(f"step {step}: dev loss {dev:.4f} ppl {row['dev_ppl']:.2f}"
                + (f" -> saved {run.out.prefix}" if improved else f" (best {best:.4f})"))
            log.metrics(row)
            save_state(run, step, best, params, moments, scaler, rng)
        else:
            log.metrics(row)
    log.bar.close()
    log.bar = None
    elapsed = time.time() - t_start
    log(f"done: {step} steps in {elapsed:.0f}s ({tokens_seen / max(step_time, 1e-9):.0f} tok/s in training steps, "
        f"{elapsed - step_time:.0f}s in evaluations and saves), "
        f"best dev loss {best:.4f}; prefix: {run.out.prefix}")
    return best


# ---------------------------------------------------------------------------------------------------- main

@exits_on_error()
def main(argv=None) -> int:
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    write_config_to = a.deepspeed_config if to_be_written(a.deepspeed_config) else None  # before rank 0 writes it
    try:
        ds_cfg = build_ds_config(a, world)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.quantize != "none" and ds_cfg["zero_optimization"]["stage"] == 3:
        raise UserError(f"--quantize {a.quantize}: expected --zero_stage 0, 1 or 2, got 3 (ZeRO-3 expects "
                        "every parameter of the model partitioned, and quantized weights cannot be); use --zero_stage "
                        "2: the quantized frozen base is not partitioned by any stage")
    if offloads(ds_cfg) and ds_cfg["zero_optimization"]["stage"] == 0:
        raise UserError("--offload needs ZeRO stage 1, 2 or 3: set --zero_stage 2")
    if a.estimate:  # the memory plan, for this machine or another: before the precision check and any loading
        from .estimate import print_plan

        return print_plan(a, build_ds_config(a, a.processes) if a.processes else ds_cfg, a.processes or world)
    problem = unsupported_precision(precision(ds_cfg))
    if problem:
        raise UserError(problem)
    out = Outputs(Path(a.save_dir), a.save_name)
    check_outputs(a, out)
    lock = RunLock(out)
    if int(os.environ.get("RANK", 0)) == 0:
        lock.acquire()  # before anything is written; other ranks never write
        out.remove_leftovers()
        if write_config_to:
            try:
                write_built_config(write_config_to, ds_cfg)
            except (OSError, ValueError) as e:
                lock.release()
                raise UserError(f"--deepspeed_config {write_config_to}: cannot write the built configuration "
                                f"there ({one_line(e)})") from None
            print(f"--deepspeed_config {write_config_to}: no such file, so the configuration built from the flags was "
                  "written there (an existing file is read instead)", flush=True)
    pin_malloc_thresholds(low_memory=a.gradient_checkpointing)
    try:
        run = setup(a, ds_cfg, out)
        step, best = resume(run) if a.resume else start(run)
        fit(run, step, best)
        leave_process_group()
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
