"""Training throughput and peak memory of the real trainer (`python -m train`) against PEFT prefix tuning.

    python bench/train.py --steps 8                      # bf16, P=16, batch 8, max_seq_len 96, built-in data
    python bench/train.py --dtype fp32 --steps 8
    python bench/train.py --launcher deepspeed --num_procs 2 --steps 8   # the README's 2-rank CPU launch
    python bench/train.py --scaling --scaling_steps 2    # + tables over max_seq_len and prefix length (slow)
    python bench/train.py --steps 8 --json bench/results/train.json      # (the default --json)

What is measured, and how:

* Ours is the trainer a user runs, as a subprocess with the user's flags: `python -m train --bf16 (or --precision
  fp32) --prefix_seq_len P --batch_size B --max_seq_len S --max_steps W+K ...` (or `deepspeed --num_gpus N --module
  train ...` with `--launcher deepspeed`; each rank then gets --batch_size B/N, so a step still trains the same B
  examples). Its outputs go to a temporary folder; nothing in the repository is written but the --json file.
  Tokens/s come from the trainer's own metrics JSONL (`<save_name>.metrics.jsonl`, one row per optimizer step with
  `tokens_per_s`): the first W rows (--warmup) are dropped, and the K timed rows are combined as
  sum(tokens) / sum(step time), where step time = tokens / tokens_per_s of the row and each step's tokens are
  recounted from the very batches the trainer draws (same split, same seeded order). The trainer times a step from
  drawing its batch to the all-reduced loss; its dev evaluations (one before step 1, one after the last step:
  --eval_every is set past the run) and its saves happen outside that window, so they are not in tokens/s; they
  are in the process's wall time, printed as "overhead" (= wall - timed steps - warm-up steps).
* PEFT is `peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=<our --prefix_hidden_dim>)` on the
  same model loaded the same way, in a plain PyTorch loop the way a PEFT user writes it: `get_peft_model`,
  `torch.optim.AdamW` over the trainable parameters, `model(input_ids, attention_mask, labels).loss.backward()`,
  `clip_grad_norm_(1.0)` (the trainer's default clipping), `step()`, `zero_grad()`. It gets the same batches as
  the trainer, step by step (prefixtune's own `build_split` / `collate`, the trainer's seeded order), in its own
  subprocess, with as many threads as the trainer uses.
* A third row runs our trainer again with --gradient_checkpointing (skip it with --no_checkpointing_row): the memory
  lever. PEFT has no such row: Hugging Face hands a checkpointed decoder layer past_key_values=None, so PEFT's
  prefix (a cache) would silently drop out of training.
* Tokens are counted the way the trainer counts them (train/loop.py, PrefixLM.forward): labelled next-token
  targets, i.e. the real (unpadded) tokens of each example minus its first one, which nothing predicts. Padding
  never counts.
* Peak memory on CPU is the process's peak RSS (`os.wait4` rusage of that child: the kernel's high-water mark,
  model loading included), and, sampled every 0.1 s from /proc, the peak RSS of the whole process tree while it
  trains ("train MiB": after the trainer's step-0 metrics row, or after PEFT's model is built). With the deepspeed
  launcher the peak is the sampled sum over the launcher and its ranks (shared library pages count once per
  process). On CUDA it is torch.cuda.max_memory_allocated (per GPU, the largest over ranks), read from the trainer
  through a sitecustomize hook put on its PYTHONPATH that writes it at exit.
* Roofline: the machine's matmul peak for the dtype (torch.matmul of 2048x2048 matrices, best of 5, with the
  trainer's thread count; measured before and after the runs, the higher kept), and 4*N*tokens/s as a share of
  it, where N is the base model's parameter count (tied embeddings once): a frozen base costs a forward (2N per
  token) and an activation gradient (2N), no weight gradient. Attention's T^2 term, the prefix encoder and the
  padding a batch computes are left out: the share counts useful work only.
* --scaling adds our trainer alone as max_seq_len grows (--scaling_seq_lens at the fixed --prefix_len) and as P
  grows (--scaling_prefix_lens at --scaling_seq_len). The built-in paragraphs are short (median 52 tokens, 90 %
  under 120, the longest 392), so "max_seq_len 1024" on them would train ~64-token examples. These tables train on
  "long" data instead: the built-in paragraphs concatenated 50 to a record (written to the temporary folder and
  passed as --data_filepath), which the smileface packing cuts into examples that fill max_seq_len; the tables
  print the real tokens per example.

The machine may be shared: each run's "others" column is the CPU (in cores) that processes outside the run used
meanwhile (/proc/stat minus the run's own rusage); above 0.25 the bench warns that the numbers are unreliable. On
a 2-core machine another busy process can slow a run down many times over; --rounds N interleaves N runs of each
side and keeps the median.

Goals (issue 8): our tokens/s >= 3x PEFT's; >= 50 % of the bf16 matmul roofline; our peak memory <= 0.6x PEFT's.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from prefixtune.train.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"tokens_per_s_vs_peft": 3.0, "roofline_bf16": 0.5, "peak_vs_peft": 0.6}
LONG_RECORD_PARAGRAPHS = 50
MATMUL_N = 2048

# This process stays free of torch: a child's peak RSS (rusage) starts from its parent's RSS at the fork/vfork, so
# anything big here would show up in every measurement. Everything heavy runs in a child (--_child).


# ------------------------------------------------------------------------------------------------ children

def _child_env_threads() -> int:
    return max(1, os.cpu_count() or 1)  # what train/loop.py init_distributed gives one process


def trainer_batches(tok, data: str, max_len: int, batch: int, n_steps: int, seed: int, dev_size: int,
                    batching: str = "buckets") -> list[list]:
    """The examples of each of the trainer's first `n_steps` optimizer steps, as train/loop.py draws them: the same
    split (load_examples) and the same seeded order (train_step); a step's examples are the union of the ranks'
    micro-batches, so this holds for any number of processes with the same global batch and one accumulation step."""
    import torch

    from prefixtune.data import build_split, builtin_records, epoch_order, read_jsonl

    records = builtin_records() if data == "builtin" else read_jsonl(data)
    train, _, _ = build_split(records, tok, max_len=max_len, transform="smileface", seed=seed, train_size=None,
                              dev_size=dev_size, eos_id=tok.eos_token_id)
    per_epoch = len(train) // batch
    if per_epoch < 1:
        raise SystemExit(f"error: {len(train)} training examples do not fill a batch of {batch}")
    steps, orders = [], {}
    lengths = [len(e["input_ids"]) for e in train]
    for step in range(n_steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(lengths, batch, seed, epoch, batching == "buckets")
        steps.append([train[i] for i in orders[epoch][pos * batch:(pos + 1) * batch]])
    return steps


def counted_tokens(examples) -> int:
    """Tokens as the trainer counts them (PrefixLM.forward): labelled targets after the shift, no padding."""
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


def matmul_peak_gflops(dtype: str, device: str, n: int = MATMUL_N, reps: int = 5) -> float:
    import torch

    from prefixtune.prefix.weights import DTYPES

    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    best = float("inf")
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4 if device == "cuda" else 1):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / (4 if device == "cuda" else 1)
        if i:  # the first call warms up
            best = min(best, dt)
    return 2 * n**3 / best / 1e9


def child_probe(spec: dict) -> dict:
    """Machine, model size, matmul peaks and the token counts of every configuration's steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefixtune.prefix.base import load_config, load_tokenizer

    torch.set_num_threads(_child_env_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
    config = load_config(spec["model"])
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    out["n_params"] = sum(p.numel() for p in meta.parameters())  # parameters() yields a tied weight once
    if spec.get("long_path"):
        from prefixtune.data import builtin_records

        paras = [r["text"] for r in builtin_records()]
        k = LONG_RECORD_PARAGRAPHS
        with open(spec["long_path"], "w", encoding="utf-8") as f:
            for i in range(0, len(paras), k):
                f.write(json.dumps({"text": "\n".join(paras[i:i + k])}) + "\n")
    tok = load_tokenizer(spec["model"])
    out["configs"] = {}
    for key, c in spec["configs"].items():
        steps = trainer_batches(tok, c["data"], c["max_seq_len"], c["batch_size"], c["n_steps"], c["seed"],
                                c["dev_size"], c["batching"])
        real = [len(e["input_ids"]) for s in steps for e in s]
        out["configs"][key] = {
            "step_tokens": [counted_tokens(s) for s in steps],
            "mean_example_tokens": statistics.mean(real), "max_example_tokens": max(real),
            "padding_share": 1 - sum(real) / sum(len(s) * max(len(e["input_ids"]) for e in s) for s in steps)}
    out["matmul_gflops"] = {dt: matmul_peak_gflops(dt, device) for dt in spec["dtypes"]}
    return out


def child_peak(spec: dict) -> dict:
    import torch

    torch.set_num_threads(_child_env_threads())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {dt: matmul_peak_gflops(dt, device) for dt in spec["dtypes"]}


def child_peft(spec: dict) -> dict:
    """PEFT prefix tuning in the loop a PEFT user writes, fed the trainer's batches."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from prefixtune.data import collate
    from prefixtune.prefix.base import load_base

    torch.set_num_threads(_child_env_threads())
    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok, _ = load_base(spec["model"], spec["dtype"], device)  # AutoModelForCausalLM.from_pretrained(dtype=...)
    n_params = sum(p.numel() for p in base.parameters())
    steps = trainer_batches(tok, spec["data"], spec["max_seq_len"], spec["batch_size"], spec["n_steps"], spec["seed"],
                            spec["dev_size"], spec["batching"])
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec["prefix_len"], prefix_projection=True,
                             encoder_hidden_size=spec["hidden_dim"])
    model = get_peft_model(base, cfg)  # the prefix encoder stays fp32 (autocast_adapter_dtype), like our master copy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    Path(spec["marker"]).touch()  # the parent's memory sampler: training starts now
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for i, examples in enumerate(steps):
        t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in collate(examples, tok.pad_token_id).items()}
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step, as the trainer's .item() does
        n = counted_tokens(examples)
        rows.append({"step": i + 1, "loss": value, "tokens": n, "tokens_per_s": n / (time.perf_counter() - t0)})
    out = {"rows": rows, "n_params": n_params, "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------------------------------------ process watching

SITECUSTOMIZE = '''\
import atexit, json, os, sys

def _prefixtune_bench_cuda_peak():
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    except Exception:
        return
    with open(os.path.join(os.environ["PREFIXTUNE_BENCH_CUDA_PEAK"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"max_allocated": peak}, f)

if os.environ.get("PREFIXTUNE_BENCH_CUDA_PEAK"):
    atexit.register(_prefixtune_bench_cuda_peak)

# run the sitecustomize this one shadows, if any
import importlib.machinery, importlib.util
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    if os.path.abspath(_p or ".") == _here:
        continue
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [_p])
    if _spec is not None:
        _m = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_m)
        break
'''


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    return " ".join(Path(args[0]).name if i == 0 else x for i, x in enumerate(args[:4]))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class Sampler(threading.Thread):
    """Sums the RSS of a process tree every `every` seconds; keeps the peak, and the peak once `training()` holds."""

    def __init__(self, pid: int, training, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.training, self.every = pid, training, every
        self.peak = self.train_peak = 0
        self.at_peak: dict[int, int] = {}  # pid -> RSS at the sampled peak
        self.names: dict[int, str] = {}
        self.done = threading.Event()

    def run(self):
        in_training = False
        while not self.done.is_set():
            sizes = {p: _rss(p) for p in _process_tree(self.pid)}
            for p in sizes.keys() - self.names.keys():
                self.names[p] = _cmdline(p)
            total = sum(sizes.values())
            if total > self.peak:
                self.peak = total
                self.at_peak = sizes
            in_training = in_training or self.training()
            if in_training:
                self.train_peak = max(self.train_peak, total)
            self.done.wait(self.every)


def run_watched(cmd: list[str], env: dict, log: Path, training, timeout: float, cwd: Path) -> dict:
    """Run `cmd` with stdout/stderr in `log`; wall time, exit code, rusage peak RSS and sampled tree peaks."""
    busy0 = _busy_cpu_s()
    with open(log, "w", encoding="utf-8") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        sampler = Sampler(proc.pid, training)
        sampler.start()
        timer = threading.Timer(timeout, lambda: _kill(proc.pid))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            names = sampler.names
        except BaseException:
            _kill(proc.pid)
            raise
        finally:
            timer.cancel()
            sampler.done.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    ours = usage.ru_utime + usage.ru_stime  # the child and every descendant it waited for
    return {"rc": proc.returncode, "wall_s": wall, "maxrss_mib": usage.ru_maxrss / 1024,
            "cpu_s": ours, "other_cpu_cores": max(0.0, (_busy_cpu_s() - busy0 - ours) / wall),
            "tree_peak_mib": sampler.peak / 2**20, "train_peak_mib": sampler.train_peak / 2**20,
            "tree_at_peak": [{"pid": pid, "cmd": names.get(pid, "?"), "rss_mib": rss / 2**20}
                             for pid, rss in sampler.at_peak.items()]}


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, 9)  # the child leads its own session: this reaches the launcher's ranks too
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ the parent

class Bench:
    def __init__(self, a, tmp: Path):
        self.a, self.tmp = a, tmp
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)
        self.long_path = tmp / "long.jsonl"
        self.n_run = 0
        self.probe = None

    def data_arg(self, data: str) -> str:
        return str(self.long_path) if data == "long" else data if data == "builtin" else str(Path(data).resolve())

    def child(self, kind: str, spec: dict, training=lambda: False) -> tuple[dict, dict]:
        self.n_run += 1
        spec_path, out_path = self.tmp / f"spec{self.n_run}.json", self.tmp / f"out{self.n_run}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        log = self.tmp / f"{kind}{self.n_run}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, str(spec_path), str(out_path)]
        res = run_watched(cmd, self.env, log, training, self.a.timeout, self.tmp)
        if res["rc"] != 0 or not out_path.exists():
            raise RuntimeError(f"{kind} child failed ({res['rc']}), log {log}:\n{_tail(log)}")
        return json.loads(out_path.read_text(encoding="utf-8")), res

    def run_probe(self, configs: dict, dtypes: list[str]) -> dict:
        spec = {"model": self.a.model, "dtypes": dtypes, "configs": configs,
                "long_path": str(self.long_path) if any(c["data"] == str(self.long_path) for c in configs.values())
                else None}
        self.probe, _ = self.child("probe", spec)
        return self.probe

    def config(self, data: str, max_seq_len: int, batch: int, n_steps: int) -> dict:
        return {"data": self.data_arg(data), "max_seq_len": max_seq_len, "batch_size": batch, "n_steps": n_steps,
                "seed": self.a.seed, "dev_size": self.a.dev_data_size, "batching": self.a.batching}

    def ours(self, key: str, dtype: str, prefix_len: int, c: dict, warmup: int, launcher: str,
             extra: tuple = ()) -> dict:
        a = self.a
        self.n_run += 1
        save_dir, name = self.tmp / f"run{self.n_run}", "bench"
        procs = a.num_procs if launcher == "deepspeed" else 1
        flags = (["--model", a.model] if a.model else []) + \
            (["--data_filepath", c["data"]] if c["data"] != "builtin" else []) + \
            (["--bf16"] if dtype == "bf16" else ["--precision", dtype]) + \
            ["--prefix_seq_len", str(prefix_len), "--prefix_hidden_dim", str(a.prefix_hidden_dim),
             "--batch_size", str(c["batch_size"] // procs), "--max_seq_len", str(c["max_seq_len"]),
             "--max_steps", str(c["n_steps"]), "--eval_every", str(10**9), "--dev_data_size", str(a.dev_data_size),
             "--seed", str(a.seed), "--batching", a.batching, "--save_dir", str(save_dir), "--save_name", name] + \
            shlex.split(a.trainer_args) + list(extra)
        if launcher == "deepspeed":
            ds = shutil.which("deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                  os.environ.get("PATH", "")]))
            if not ds:
                raise RuntimeError("the deepspeed launcher is not on PATH")
            cmd = [ds, "--num_gpus", str(procs), "--master_port", str(free_port()), "--module", "train", *flags]
        else:
            cmd = [sys.executable, "-m", "train", *flags]
        env = dict(self.env)
        cuda_dir = self.tmp / f"cuda{self.n_run}"
        if self.probe["device"] == "cuda":
            hook = self.tmp / "hook"
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
            cuda_dir.mkdir()
            env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
            env["PREFIXTUNE_BENCH_CUDA_PEAK"] = str(cuda_dir)
        metrics = save_dir / f"{name}.metrics.jsonl"  # train/outputs.py Outputs.metrics
        log = self.tmp / f"train{self.n_run}.log"
        res = run_watched(cmd, env, log, lambda: metrics.exists() and metrics.stat().st_size > 0, a.timeout, self.tmp)
        row = {"impl": "prefixtune", "launcher": launcher, "procs": procs, "dtype": dtype, "prefix_len": prefix_len,
               "max_seq_len": c["max_seq_len"], "batch_size": c["batch_size"], "checkpointing": bool(extra),
               "command": shlex.join(cmd), **res}
        if res["rc"] != 0:
            row["error"] = _tail(log, 3).strip().splitlines()[-1] if _tail(log, 3).strip() else f"exit {res['rc']}"
            print(f"trainer failed ({res['rc']}), log {log}:\n{_tail(log)}", file=sys.stderr)
            return row
        rows = sorted((json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()),
                      key=lambda r: r["step"])
        steps = [r for r in rows if "tokens_per_s" in r]
        counts = self.probe["configs"][key]["step_tokens"]
        if len(steps) != c["n_steps"]:
            row["error"] = f"{len(steps)} metrics rows for {c['n_steps']} steps"
            return row
        times = [counts[r["step"] - 1] / r["tokens_per_s"] for r in steps]
        row |= summarise([r["tokens_per_s"] for r in steps], counts, times, warmup)
        row["losses"] = [r["loss"] for r in steps]
        row["overhead_s"] = res["wall_s"] - sum(times)
        if self.probe["device"] == "cuda":
            peaks = [json.loads(p.read_text())["max_allocated"] for p in cuda_dir.glob("*.json")]
            row["cuda_max_allocated_mib"] = max(peaks) / 2**20 if peaks else None
        row["peak_mib"] = memory_peak(row, self.probe["device"], launcher == "deepspeed")
        return row

    def peft(self, key: str, dtype: str, prefix_len: int, c: dict, warmup: int) -> dict:
        marker = self.tmp / f"peft{self.n_run + 1}.training"
        spec = {"model": self.a.model, "dtype": dtype, "prefix_len": prefix_len, "hidden_dim": self.a.prefix_hidden_dim,
                "marker": str(marker), **c}
        row = {"impl": "peft", "launcher": "python", "procs": 1, "dtype": dtype, "prefix_len": prefix_len,
               "max_seq_len": c["max_seq_len"], "batch_size": c["batch_size"]}
        try:
            out, res = self.child("peft", spec, training=marker.exists)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return row | {"error": str(e).splitlines()[-1]}
        counts = [r["tokens"] for r in out["rows"]]
        if counts != self.probe["configs"][key]["step_tokens"]:
            row["warning"] = "PEFT's batches count other tokens than the probe's"
        times = [r["tokens"] / r["tokens_per_s"] for r in out["rows"]]
        row |= res | summarise([r["tokens_per_s"] for r in out["rows"]], counts, times, warmup)
        row["losses"] = [r["loss"] for r in out["rows"]]
        row["trainable_params"] = out["trainable_params"]
        row["overhead_s"] = res["wall_s"] - sum(times)
        row["cuda_max_allocated_mib"] = out.get("cuda_max_allocated_mib")
        row["peak_mib"] = memory_peak(row, self.probe["device"], False)
        return row


def summarise(rates: list[float], counts: list[int], times: list[float], warmup: int) -> dict:
    timed = slice(warmup, None)
    t, n = sum(times[timed]), sum(counts[timed])
    return {"tokens_per_s": n / t, "mean_step_tokens_per_s": statistics.mean(rates[timed]),
            "s_per_step": t / len(times[timed]), "timed_steps": len(times[timed]), "timed_tokens": n,
            "warmup_s": sum(times[:warmup]), "step_tokens_per_s": rates}


def memory_peak(row: dict, device: str, tree: bool) -> float:
    if device == "cuda":
        return row.get("cuda_max_allocated_mib") or float("nan")
    return row["tree_peak_mib"] if tree else row["maxrss_mib"]


def add_roofline(row: dict, probe: dict, procs_gpus: int = 1) -> None:
    if "tokens_per_s" not in row:
        return
    peak = probe["matmul_gflops"][row["dtype"]] * procs_gpus
    row["model_gflops"] = 4 * probe["n_params"] * row["tokens_per_s"] / 1e9
    row["roofline_share"] = row["model_gflops"] / peak


def fmt(v, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, (int, float)) and v == v else f"{'-':>{width}}"


def check(ratio, goal: float, at_least: bool) -> str:
    if ratio is None:
        return "n/a"
    ok = ratio >= goal if at_least else ratio <= goal
    return f"{ratio:.2f}x (goal {'>=' if at_least else '<='} {goal:g}x: {'met' if ok else 'MISSED'})"


def main_table(rows: list[dict], probe: dict, a) -> dict:
    c = probe["configs"]["main"]
    where = (f"{probe['device']}" + (f" ({probe.get('gpu')})" if probe["device"] == "cuda" else
                                      f", {probe['threads']} threads of {probe['cpu_count']} CPUs"))
    print(f"\nprefix training on {where}: {a.model or 'smollm2 (embedded SmolLM2-135M)'}, "
          f"{probe['n_params'] / 1e6:.1f}M params, P={a.prefix_len}, batch {a.batch_size}, max_seq_len "
          f"{a.max_seq_len}, data {a.data}: {c['mean_example_tokens']:.0f} tokens/example on average (max "
          f"{c['max_example_tokens']}), {100 * c['padding_share']:.0f} % padding; {a.steps} timed steps after "
          f"{a.warmup} warm-up")
    print("matmul peak " + ", ".join(
        f"{dt} {g:.0f} GFLOPS (measured {' and '.join(f'{x:.0f}' for x in probe['matmul_gflops_runs'][dt])})"
        for dt, g in probe["matmul_gflops"].items())
        + f" ({MATMUL_N}x{MATMUL_N}, best of 5, before and after the runs); roofline = 4 * N * tokens/s over it")
    mem = "peak MiB" if probe["device"] == "cpu" else "max alloc"
    print(f"\n{'config':<38}{'tokens/s':>10}{'s/step':>8}{mem:>10}{'train MiB':>10}{'roofline':>9}{'wall s':>8}"
          f"{'overhead':>9}{'others':>7}")
    for r in rows:
        how = "python -m train" if r["launcher"] == "python" else f"deepspeed x{r['procs']}"
        name = (f"prefixtune {how}" if r["impl"] == "prefixtune" else "PEFT prefix tuning, AdamW loop") \
            + f" {r['dtype']}" + (" + ckpt" if r.get("checkpointing") else "")
        if "tokens_per_s" not in r:
            print(f"{name:<38}  failed: {r.get('error')}")
            continue
        print(f"{name:<38}{fmt(r['tokens_per_s'], '.1f', 10)}{fmt(r['s_per_step'], '.2f', 8)}"
              f"{fmt(r['peak_mib'], '.0f', 10)}{fmt(r.get('train_peak_mib'), '.0f', 10)}"
              f"{fmt(100 * r['roofline_share'], '.1f', 8)}%{fmt(r['wall_s'], '.0f', 8)}{fmt(r['overhead_s'], '.0f', 9)}"
              f"{fmt(r['other_cpu_cores'], '.1f', 7)}")
    ratios = {}
    for dt in a.dtypes:
        for launcher in {r["launcher"] for r in rows if r["impl"] == "prefixtune"}:
            ours = next((r for r in rows if r["impl"] == "prefixtune" and r["dtype"] == dt and not r.get("checkpointing")
                         and r["launcher"] == launcher and "tokens_per_s" in r), None)
            peft = next((r for r in rows if r["impl"] == "peft" and r["dtype"] == dt and "tokens_per_s" in r), None)
            if not ours:
                continue
            q = {"tokens_per_s_vs_peft": ours["tokens_per_s"] / peft["tokens_per_s"] if peft else None,
                 "peak_vs_peft": ours["peak_mib"] / peft["peak_mib"] if peft else None,
                 "train_peak_vs_peft": (ours["train_peak_mib"] / peft["train_peak_mib"]
                                        if peft and probe["device"] == "cpu" and peft["train_peak_mib"] else None),
                 "roofline_share": ours["roofline_share"]}
            ratios[f"{launcher}:{dt}"] = q
            vs = (f"/ PEFT: tokens/s {check(q['tokens_per_s_vs_peft'], GOALS['tokens_per_s_vs_peft'], True)}; "
                  f"peak memory {check(q['peak_vs_peft'], GOALS['peak_vs_peft'], False)}"
                  + (f" (while training {q['train_peak_vs_peft']:.2f}x)" if q["train_peak_vs_peft"] else "")
                  + "; ") if peft else ": "
            print(f"\nours ({launcher}, {dt}) {vs}roofline {100 * q['roofline_share']:.1f} %"
                  + (f" (goal >= 50 % in bf16: {'met' if q['roofline_share'] >= GOALS['roofline_bf16'] else 'MISSED'})"
                     if dt == "bf16" else " (the 50 % goal is for bf16)"))
            ckpt = next((r for r in rows if r.get("checkpointing") and r["dtype"] == dt and r["launcher"] == launcher
                         and "tokens_per_s" in r), None)
            if ckpt and peft:
                q["checkpointing"] = {"tokens_per_s_vs_peft": ckpt["tokens_per_s"] / peft["tokens_per_s"],
                                      "peak_vs_peft": ckpt["peak_mib"] / peft["peak_mib"],
                                      "train_peak_vs_peft": (ckpt["train_peak_mib"] / peft["train_peak_mib"]
                                                             if probe["device"] == "cpu" and peft["train_peak_mib"]
                                                             else None)}
                k = q["checkpointing"]
                print(f"ours + --gradient_checkpointing ({launcher}, {dt}) / PEFT (which cannot checkpoint a prefix: "
                      f"HF drops past_key_values in checkpointed layers): tokens/s {k['tokens_per_s_vs_peft']:.2f}x; "
                      f"peak memory {check(k['peak_vs_peft'], GOALS['peak_vs_peft'], False)}"
                      + (f" (while training {k['train_peak_vs_peft']:.2f}x)" if k["train_peak_vs_peft"] else ""))
    print("\ntokens/s = sum of the timed steps' labelled tokens / sum of their step times (warm-up steps dropped); "
          "overhead = wall time outside the timed and warm-up steps (imports, model load, dev evaluations, saves); "
          "others = CPUs kept busy by processes outside the run, on average over it. "
          + ("peak MiB = the process's peak RSS (whole run, loading included); train MiB = peak RSS of the process "
             "tree sampled while it trains" + ("; deepspeed rows: summed over the launcher and its ranks"
                                                if a.launcher == "deepspeed" else "")
             if probe["device"] == "cpu" else "max alloc = torch.cuda.max_memory_allocated (largest over ranks)"))
    return ratios


def scaling_table(title: str, key: str, rows: list[dict], probe: dict) -> None:
    print(f"\n{title}")
    print(f"{key:>14}{'tokens/example':>16}{'tokens/s':>10}{'s/step':>8}{'peak MiB':>10}{'train MiB':>10}"
          f"{'roofline':>9}{'others':>7}")
    for r in rows:
        c = probe["configs"][r["key"]]
        if "tokens_per_s" not in r:
            print(f"{r[key]:>14}  failed: {r.get('error')}")
            continue
        print(f"{r[key]:>14}{c['mean_example_tokens']:>16.0f}{r['tokens_per_s']:>10.1f}{r['s_per_step']:>8.2f}"
              f"{fmt(r['peak_mib'], '.0f', 10)}{fmt(r.get('train_peak_mib'), '.0f', 10)}"
              f"{100 * r['roofline_share']:>8.1f}%{fmt(r['other_cpu_cores'], '.1f', 7)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokens/s, peak memory and share of the matmul roofline of the real trainer (python -m train, "
                    "or the deepspeed launcher) against PEFT prefix tuning in a plain AdamW loop, on the same model, "
                    "data, prefix length, batch, sequence length and precision. See the module docstring for how "
                    "each number is measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model for both sides, as the trainer's --model takes it; "
                                                 "None = the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="bf16", help="precision(s), comma-separated: bf16 and/or fp32; the trainer "
                                                   "gets --bf16 or --precision fp32, PEFT loads the base in it")
    p.add_argument("--prefix_len", type=int, default=16, help="prefix length P (the trainer's --prefix_seq_len)")
    p.add_argument("--prefix_hidden_dim", type=int, default=512,
                   help="prefix MLP hidden size: the trainer's --prefix_hidden_dim and PEFT's encoder_hidden_size")
    p.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step (with --launcher "
                                                             "deepspeed, split evenly over the ranks)")
    p.add_argument("--max_seq_len", type=int, default=96, help="the trainer's --max_seq_len")
    p.add_argument("--data", default="builtin", help="'builtin' (the trainer's default data: short CPython doc "
                                                     "paragraphs), 'long' (those paragraphs concatenated, so examples "
                                                     "fill max_seq_len), or a JSONL path (passed as --data_filepath)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="first steps (metrics rows) dropped as warm-up")
    p.add_argument("--launcher", choices=["python", "deepspeed"], default="python",
                   help="how our trainer runs: 'python' = python -m train (one process), 'deepspeed' = deepspeed "
                        "--num_gpus N --module train (N = --num_procs; on a CPU machine N processes, as in README)")
    p.add_argument("--num_procs", type=int, default=2, help="processes (or GPUs) for --launcher deepspeed")
    p.add_argument("--dev_data_size", type=int, default=8,
                   help="the trainer's --dev_data_size (small: its dev evaluations are not timed, but cost wall time)")
    p.add_argument("--seed", type=int, default=42, help="the trainer's --seed (it decides the split and batch order)")
    p.add_argument("--batching", choices=["buckets", "shuffle"], default="buckets",
                   help="the trainer's --batching (PEFT gets the very same batches)")
    p.add_argument("--trainer_args", default="", help="more flags for our trainer, e.g. --trainer_args='--zero_stage "
                                                       "0 --gradient_checkpointing' (PEFT does not get them); not the "
                                                       "data, batch, length, precision or output flags the bench sets")
    p.add_argument("--no_peft", action="store_true", help="skip the PEFT side (no ratios)")
    p.add_argument("--no_checkpointing_row", action="store_true",
                   help="skip the extra run of our trainer with --gradient_checkpointing (the memory lever)")
    p.add_argument("--rounds", type=int, default=1, help="run ours and PEFT this many times, interleaved, and keep "
                                                         "each one's median by tokens/s (a shared machine drifts)")
    p.add_argument("--scaling", action="store_true", help="also run the scaling tables (our trainer only; slow)")
    p.add_argument("--scaling_seq_lens", default="64,128,256,512,1024", help="max_seq_len sweep, at --prefix_len")
    p.add_argument("--scaling_prefix_lens", default="8,32,128,256", help="P sweep, at --scaling_seq_len")
    p.add_argument("--scaling_seq_len", type=int, default=256, help="max_seq_len of the P sweep")
    p.add_argument("--scaling_steps", type=int, default=2, help="timed steps per scaling point (after 1 warm-up)")
    p.add_argument("--scaling_data", default="long", help="data of the scaling tables, as --data")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, metrics) and print it")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "train.json"),
                   help="where the results go as JSON ('' = nowhere)")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    return p


def main() -> int:
    a = build_parser().parse_args()
    if a._child:
        kind, spec_path, out_path = a._child
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        result = {"probe": child_probe, "peft": child_peft, "peak": child_peak}[kind](spec)
        Path(out_path).write_text(json.dumps(result), encoding="utf-8")
        return 0
    a.dtypes = [d.strip() for d in a.dtype.split(",") if d.strip()]
    if any(d not in ("bf16", "fp32") for d in a.dtypes):
        raise SystemExit("error: --dtype takes bf16 and/or fp32")
    if a.launcher == "deepspeed" and a.batch_size % a.num_procs:
        raise SystemExit(f"error: --batch_size {a.batch_size} does not split over --num_procs {a.num_procs}")
    owned = {"--model", "--pretrained_model_dir", "--data", "--data_filepath", "--transform", "--max_seq_len",
             "--train_data_size", "--dev_data_size", "--prefix_seq_len", "--prefix_hidden_dim", "--seed",
             "--batching", "--batch_size", "--n_accum_steps", "--max_steps", "--n_training_steps", "--n_epochs", "--eval_every",
             "--precision", "--bf16", "--fp16", "--save_dir", "--save_name", "--resume", "--overwrite"}
    clash = sorted({f.split("=")[0] for f in shlex.split(a.trainer_args)} & owned)
    if clash:
        raise SystemExit(f"error: --trainer_args {' '.join(clash)}: the bench sets these itself (they decide the "
                         "batches it recounts and hands to PEFT); use the bench's own flags")
    if a.warmup < 0 or a.steps < 1:
        raise SystemExit("error: --steps must be at least 1 and --warmup not negative")
    tmp = Path(tempfile.mkdtemp(prefix="prefixtune-bench-"))
    try:
        return run(a, tmp)
    finally:
        if a.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(a, tmp: Path) -> int:
    b = Bench(a, tmp)
    configs = {"main": b.config(a.data, a.max_seq_len, a.batch_size, a.warmup + a.steps)}
    seq_lens = [int(x) for x in a.scaling_seq_lens.split(",")] if a.scaling else []
    prefix_lens = [int(x) for x in a.scaling_prefix_lens.split(",")] if a.scaling else []
    for s in seq_lens:
        configs[f"seq{s}"] = b.config(a.scaling_data, s, a.batch_size, 1 + a.scaling_steps)
    if prefix_lens:
        configs["pfx"] = b.config(a.scaling_data, a.scaling_seq_len, a.batch_size, 1 + a.scaling_steps)
    print("probing the machine and the data ...", file=sys.stderr)
    probe = b.run_probe(configs, a.dtypes)
    rows = []
    for dt in a.dtypes:
        runs = {"ours": [], "ckpt": [], "peft": []}
        for i in range(a.rounds):
            print(f"[{dt} round {i + 1}/{a.rounds}] prefixtune ({a.launcher}) ...", file=sys.stderr)
            runs["ours"].append(b.ours("main", dt, a.prefix_len, configs["main"], a.warmup, a.launcher))
            if not a.no_checkpointing_row:
                print(f"[{dt} round {i + 1}/{a.rounds}] prefixtune + --gradient_checkpointing ...", file=sys.stderr)
                runs["ckpt"].append(b.ours("main", dt, a.prefix_len, configs["main"], a.warmup, a.launcher,
                                           ("--gradient_checkpointing",)))
            if not a.no_peft:
                print(f"[{dt} round {i + 1}/{a.rounds}] PEFT ...", file=sys.stderr)
                runs["peft"].append(b.peft("main", dt, a.prefix_len, configs["main"], a.warmup))
        for rs in runs.values():
            if not rs:
                continue
            ok = sorted((r for r in rs if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
            row = ok[len(ok) // 2] if ok else rs[0]
            row["rounds_tokens_per_s"] = [r.get("tokens_per_s") for r in rs]
            rows.append(row)
    srows, prows = [], []
    dt = a.dtypes[0]
    for s in seq_lens:
        print(f"[scaling] max_seq_len {s} ...", file=sys.stderr)
        srows.append(b.ours(f"seq{s}", dt, a.prefix_len, configs[f"seq{s}"], 1, a.launcher) | {"key": f"seq{s}"})
    for pl in prefix_lens:
        print(f"[scaling] P {pl} ...", file=sys.stderr)
        prows.append(b.ours("pfx", dt, pl, configs["pfx"], 1, a.launcher) | {"key": "pfx"})
    # The matmul peak again at the end: another process's load during the probe would understate it.
    print("measuring the matmul peak again ...", file=sys.stderr)
    again, _ = b.child("peak", {"dtypes": a.dtypes})
    probe["matmul_gflops_runs"] = {d: [probe["matmul_gflops"][d], again[d]] for d in a.dtypes}
    probe["matmul_gflops"] = {d: max(v) for d, v in probe["matmul_gflops_runs"].items()}
    gpus = probe.get("gpus", 1) if probe["device"] == "cuda" and a.launcher == "deepspeed" else 1
    for r in rows + srows + prows:
        add_roofline(r, probe, gpus if r["impl"] == "prefixtune" else 1)
    ratios = main_table(rows, probe, a)
    head = f"our trainer ({a.launcher}, {dt}, batch {a.batch_size}, data {a.scaling_data}, 1 warm-up + " \
           f"{a.scaling_steps} timed steps)"
    if srows:
        scaling_table(f"{head}, P={a.prefix_len}, as max_seq_len grows", "max_seq_len", srows, probe)
    if prows:
        scaling_table(f"{head}, max_seq_len {a.scaling_seq_len}, as P grows", "prefix_len", prows, probe)
    if a.scaling and a.scaling_data == "long":
        print(f"(data 'long': the built-in paragraphs concatenated {LONG_RECORD_PARAGRAPHS} to a record, so "
              "examples fill max_seq_len; tokens/example is the real mean of the timed batches)")
    busy = [r for r in rows + srows + prows if r.get("other_cpu_cores", 0) > 0.25]
    if busy:
        print(f"\nWARNING: other processes kept {max(r['other_cpu_cores'] for r in busy):.1f} of "
              f"{probe['cpu_count']} CPUs busy during {len(busy)} run(s) (column 'others'): those numbers are "
              "unreliable; rerun when the machine is idle, or with --rounds 3")
    result = {"settings": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "machine": {
        k: v for k, v in probe.items() if k != "configs"}, "data": probe["configs"], "goals": GOALS, "rows": rows,
        "ratios": ratios, "scaling": {"seq_len": srows, "prefix_len": prows} if a.scaling else {}}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"\nwrote {a.json}")
    return 0 if all("tokens_per_s" in r for r in rows + srows + prows) else 1


if __name__ == "__main__":
    sys.exit(main())
