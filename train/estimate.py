"""Memory plan of a training run: `python -m train --estimate ...` (the flags of the real run) prints what each
process will hold and whether it fits, reading the model's config only (no weights).

Parts, per process (N = prefix encoder parameters, W = processes, s = bytes per value of the run's precision):

- frozen base weights: parameters counted on a model built on the meta device (every architecture, tied
  embeddings counted once) x s, on the device;
- prefix encoder: `Embedding(P, in) -> Linear(in, hid) -> Tanh -> Linear(hid, L*2*Hkv*D)` as prefix/encoder.py
  builds it; its working copy N*s and the anchor table P*width (on the device, plus an fp32 copy in RAM);
- optimizer: fp32 master weights 4N and Adam moments 8N, divided by W from ZeRO-1 on; fp32 gradients 4N, divided
  by W from ZeRO-2 on (ZeRO-1 also keeps full 16-bit gradients); on the CPU with --offload;
- DeepSpeed buffers: the reduce bucket (`reduce_bucket_size` values x s, two with `overlap_comm`; on a CPU only the
  part gradients touch, min(bucket, N), is resident) and, with several processes, one all-gather chunk
  min(`allgather_bucket_size`, N) x s;
- activations (see `activation_bytes`);
- runtime: RUNTIME_RSS (measured: RSS of a training process on a tiny model, which is mostly the imports of torch,
  transformers and deepspeed) in RAM; on a GPU also CUDA_CONTEXT on the device.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

MiB, GiB = 2**20, 2**30
# Peak RSS of `python -m train` on the 2-layer test model (tests/conftest.py tiny llama, P=4, batch 2, seq 32),
# measured with getrusage(RUSAGE_CHILDREN) on CPU with torch 2.13, transformers 5.23, deepspeed 0.19.8. Importing
# torch + transformers + deepspeed alone is 364 MiB; tokenizer, process group, DeepSpeed engine and thread pools add
# the rest (with and without checkpointing: 475.7 MiB).
RUNTIME_RSS = 475 * MiB
# CUDA context, cuBLAS workspace and kernels on each GPU: not measured here (no GPU); a typical torch 2.x figure.
CUDA_CONTEXT = 600 * MiB
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's defaults (values, not bytes)
DS_ALLGATHER_BUCKET = 500_000_000
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> tuple[str, int]:
    """'16GiB' -> ('gpu', bytes); 'cpu:8GiB' -> ('cpu', bytes). Raises ValueError naming the expected form."""
    kind, _, size = text.strip().rpartition(":")
    kind = (kind or "gpu").lower()
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if kind not in ("gpu", "cuda", "cpu") or not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--device_memory: expected a size such as 16GiB, 500MB or cpu:64GiB, got {text!r}")
    return ("cpu" if kind == "cpu" else "gpu"), int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt(n: float) -> str:
    """A size in the unit that shows it: GiB, MiB, KiB, or bytes (a small part is never "0.0 MiB")."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} bytes"


@dataclass
class Part:
    name: str
    bytes: int
    where: str  # "device" or "host"


@dataclass
class MemoryPlan:
    model: str
    model_type: str
    precision: str
    processes: int
    zero_stage: int
    offload: bool
    checkpointing: bool
    batch: int
    seq_len: int
    prefix_len: int
    base_params: int
    encoder_params: int
    device_kind: str  # "gpu" or "cpu"
    capacity: int | None  # bytes per process on the device (RAM per process on a CPU)
    capacity_source: str
    host_capacity: int | None = None  # RAM per process on a GPU run
    parts: list[Part] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def total(self, where: str | None = None) -> int:
        on_cpu = self.device_kind == "cpu"
        return sum(p.bytes for p in self.parts if where is None or on_cpu or p.where == where)

    @property
    def fits(self) -> bool:
        device_ok = self.capacity is None or self.total("device") <= self.capacity
        host_ok = self.device_kind == "cpu" or self.host_capacity is None or self.total("host") <= self.host_capacity
        return device_ok and host_ok

    def text(self) -> str:
        zero = f"ZeRO-{self.zero_stage}" + (" + CPU offload" if self.offload else "")
        lines = [f"memory plan: {self.model} ({self.model_type}, {self.base_params / 1e6:.1f}M params), "
                 f"{self.precision}, {self.processes} process(es), {zero}, batch {self.batch} x seq {self.seq_len} "
                 f"+ prefix {self.prefix_len}, {'with' if self.checkpointing else 'without'} gradient checkpointing",
                 f"  {'part (per process)':<62} {'where':<7} {'bytes':>11}"]
        for p in self.parts:
            where = "RAM" if p.where == "host" or self.device_kind == "cpu" else "GPU"
            lines.append(f"  {p.name:<62} {where:<7} {fmt(p.bytes):>11}")
        if self.device_kind == "cpu":
            lines.append(f"  total per process: {fmt(self.total())} of {fmt(self.capacity) if self.capacity else '?'} "
                         f"({self.capacity_source})")
        else:
            lines.append(f"  total per process on the GPU: {fmt(self.total('device'))} of "
                         f"{fmt(self.capacity) if self.capacity else '?'} ({self.capacity_source}); in RAM: "
                         f"{fmt(self.total('host'))}"
                         + (f" of {fmt(self.host_capacity)} available per process" if self.host_capacity else ""))
        lines.append("  fits" if self.fits else "  does NOT fit")
        lines += [f"  to fit: {f}" for f in self.fixes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- counts

def base_param_count(config) -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config leaves a GGUF config's tied embeddings untied on the meta device
    return sum(p.numel() for p in model.parameters())  # tied weights appear once


def encoder_param_count(shape, input_dim: int, hidden_dim: int) -> int:
    """PrefixEncoder's trainable parameters: embedding, Linear(in, hid) with bias, Linear(hid, width) with bias."""
    return shape.prefix_len * input_dim + (input_dim + 1) * hidden_dim + (hidden_dim + 1) * shape.width


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def activation_bytes(config, batch: int, seq: int, prefix: int, s: int, checkpointing: bool) -> dict[str, int]:
    """Bytes of activations kept for backward, per process, by part.

    The base is frozen, so autograd keeps no Linear inputs (their weight gradients are never needed); what it keeps
    was measured per layer with saved_tensors_hooks on GPT-NeoX, GPT-2 and Llama (SDPA, bf16 and fp32), per token:

        layer = T*(cE*E + cI*I + 4*Hq) + (T+P)*2*Hq*D*s + 2*T*(T+P)      per sequence, per layer

    cE*E: query, attention output and the norms' inputs -- Llama-family 4s (prefix/lean.py: each RMSNorm keeps its
    16-bit input and a scale per row), GPT-NeoX 4s (3s with parallel residual), GPT-2 6s; cI*I: the MLP -- Llama 2s
    (the gate and up projections; silu is recomputed), GPT-NeoX 1s (GELU input), GPT-2 4s; 4*Hq: SDPA's fp32
    log-sum-exp; keys and values with the prefix in front, repeated to the query heads; the boolean masks with the
    prefix columns. (On the CPU the explicit attention core keeps its probabilities instead of the log-sum-exp and
    unrepeated keys and values: for rows of ~100 tokens the two come out about the same, but near its 400-token limit
    the probabilities are ~3x this term, and the plan runs low there.)

    Without checkpointing: L * B * layer. With checkpointing: the layer inputs L*B*T*E*s plus one layer recomputed
    in backward (B * layer). Both add a backward working set of one layer (B * layer) and the LM head: the loss runs
    it over labelled tokens only, N <= B*(T-1), a chunk of rows at a time (prefix/loss.py): one chunk's logits in
    the model's dtype and their fp32 log-probabilities (prefix/loss.py chunk_rows), and the (N, E) gradient it keeps for
    backward.
    """
    c = _text(config)
    from ..prefix.shapes import base_dims

    L, _, D = base_dims(c)
    E, Hq, V = c.hidden_size, c.num_attention_heads, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * E
    mt = getattr(c, "model_type", "")
    if mt == "gpt2":
        cE, cI, stats = 6 * s, 4 * s, 16
    elif mt == "gpt_neox":
        cE, cI, stats = (3 if getattr(c, "use_parallel_residual", True) else 4) * s, s, 16
    else:  # Llama family (RMSNorm, gated MLP) and the rest
        cE, cI, stats = 4 * s, 2 * s, 8
    T, P, B = seq, prefix, batch
    layer = B * (T * (cE * E + cI * inter + 4 * Hq + stats) + (T + P) * 2 * Hq * D * s + 2 * T * (T + P))
    parts = {}
    if checkpointing:
        parts["activations: layer inputs (checkpointed) + one layer recomputed"] = L * B * T * E * s + layer
    else:
        parts["activations kept for backward, all layers"] = L * layer
    parts["backward working set (one layer's gradients)"] = layer
    from ..prefix.loss import chunk_row_bytes, chunk_rows

    rows = B * (T - 1)
    parts["LM head: one chunk of logits + hidden gradient"] = \
        chunk_row_bytes(V, s) * chunk_rows(rows, V, s) + rows * E * s
    return parts


# ---------------------------------------------------------------------------------------------------- plan

def _device(kind_size: tuple[str, int] | None, local_processes: int, local_rank: int) -> tuple[str, int | None, str]:
    if kind_size:
        return kind_size[0], kind_size[1], "--device_memory"
    import torch

    if torch.cuda.is_available():
        i = max(local_rank, 0) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(i)
        return "gpu", props.total_memory, f"GPU {i}: {props.name}"
    avail = available_ram()
    return "cpu", (avail // local_processes if avail else None), f"available RAM / {local_processes} process(es)"


def available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_plan(a, ds_cfg: dict, config, processes: int, base_params: int | None = None,
               device: tuple[str, int | None, str] | None = None, model_name: str | None = None) -> MemoryPlan:
    """The plan for arguments `a` (TrainArgs) and the resolved DeepSpeed config `ds_cfg`."""
    from ..prefix.shapes import prefix_shape
    from .ds_config import offloads, precision

    prec = precision(ds_cfg)
    s = 4 if prec == "fp32" else 2
    zero = ds_cfg["zero_optimization"]
    stage, offload, W = zero["stage"], offloads(ds_cfg), processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    kind, capacity, source = device or _device(parse_size(a.device_memory) if a.device_memory else None, local,
                                               a.local_rank)
    B, T, P = ds_cfg["train_micro_batch_size_per_gpu"], a.max_seq_len, a.prefix_seq_len
    shape = prefix_shape(config, P)
    n_base = base_params if base_params is not None else base_param_count(config)
    N = encoder_param_count(shape, a.prefix_input_dim, a.prefix_hidden_dim)
    opt = "host" if offload else "device"
    part = W if stage >= 1 else 1
    unquantized = " unquantized: an upper bound" if getattr(a, "quantize", "none") != "none" else ""
    parts = [Part(f"frozen base weights ({n_base / 1e6:.1f}M x {s} B{unquantized})", n_base * s, "device"),
             Part(f"prefix encoder ({N / 1e6:.2f}M x {s} B) + anchor table", N * s + P * shape.width * s, "device")]
    if stage > 0 or prec != "fp32":
        parts.append(Part(f"fp32 master weights{f' (1/{W})' if part > 1 else ''}", 4 * N // part, opt))
    parts.append(Part(f"Adam moments, 2 x fp32{f' (1/{W})' if part > 1 else ''}", 8 * N // part, opt))
    if stage >= 2:
        parts.append(Part(f"fp32 gradients{f' (1/{W})' if W > 1 else ''}", 4 * N // W, opt))
    elif stage == 1:
        parts.append(Part(f"{s * 8}-bit gradients + fp32 gradients (1/{W})", N * s + 4 * N // W, "device"))
    else:
        parts.append(Part("gradients" + (" (16-bit + fp32)" if s == 2 else ""), N * s + (4 * N if s == 2 else 0),
                          "device"))
    if stage >= 1:
        bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))
        n_buf = 2 if zero.get("overlap_comm", stage == 3) else 1
        resident = bucket if kind == "gpu" else min(bucket, N)
        parts.append(Part(f"DeepSpeed reduce bucket ({bucket:,} values x {n_buf})", resident * s * n_buf, "device"))
        if W > 1:
            gather = int(zero.get("allgather_bucket_size", DS_ALLGATHER_BUCKET))
            parts.append(Part("DeepSpeed all-gather chunk", min(gather, N) * s, "device"))
    for name, n in activation_bytes(config, B, T, P, s, a.gradient_checkpointing).items():
        parts.append(Part(name, n, "device"))
    parts.append(Part("runtime: torch + transformers + deepspeed (measured RSS)", RUNTIME_RSS, "host"))
    parts.append(Part("fp32 anchor copy", P * shape.width * 4, "host"))
    if kind == "gpu":
        parts.append(Part("CUDA context and kernels (typical, not measured)", CUDA_CONTEXT, "device"))
    host = available_ram()
    return MemoryPlan(model_name or str(a.model or "smollm2"), getattr(_text(config), "model_type", "?"), prec, W,
                      stage, offload, a.gradient_checkpointing, B, T, P, n_base, N, kind, capacity, source,
                      host // local if host and kind == "gpu" else None, parts)


def suggest_fixes(plan: MemoryPlan, a, ds_cfg: dict, config, processes: int) -> list[str]:
    """The first set of flags that makes the run fit, with the total it gives: each saving alone, then together."""
    import copy

    savings = []  # (flag text, TrainArgs changes, zero_optimization changes, micro-batch)
    if not a.gradient_checkpointing:
        savings.append(("--gradient_checkpointing", {"gradient_checkpointing": True}, {}, None))
    if plan.device_kind == "gpu" and not plan.offload and plan.zero_stage >= 1:
        savings.append(("--offload", {}, {"offload_optimizer": {"device": "cpu", "pin_memory": False}}, None))
    if plan.batch > 1:
        accum = ds_cfg["gradient_accumulation_steps"] * plan.batch
        savings.append((f"--batch_size 1 --n_accum_steps {accum} (same global batch)", {}, {}, 1))
    trials = [[s] for s in savings] + [savings[:k] for k in range(2, len(savings) + 1)]
    device = (plan.device_kind, plan.capacity, plan.capacity_source)
    for trial in trials:
        cfg, changes = copy.deepcopy(ds_cfg), {}
        for _, a_kw, zero_kw, micro in trial:
            changes.update(a_kw)
            cfg["zero_optimization"].update(zero_kw)
            cfg["train_micro_batch_size_per_gpu"] = micro or cfg["train_micro_batch_size_per_gpu"]
        p = build_plan(dataclasses.replace(a, **changes), cfg, config, processes, plan.base_params, device,
                       plan.model)
        if p.fits:
            used = p.total("device") if p.device_kind == "gpu" else p.total()
            return [f"{' + '.join(label for label, *_ in trial)} -> {fmt(used)} per process"]
    base = next(p.bytes for p in plan.parts if p.name.startswith("frozen base"))
    hint = ", or --bf16/--fp16 to halve the base" if plan.precision == "fp32" else ""
    tried = " + ".join(label for label, *_ in savings) or "no saving left to try"
    return [f"not even with {tried}: the frozen base alone needs {fmt(base)}; use a device with more memory "
            f"(a bigger GPU, or more RAM per process){hint}"]


def print_plan(a, ds_cfg: dict, processes: int) -> int:
    """--estimate: print the memory plan (rank 0 only) and return the exit status; reads no weights."""
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    config, name = load_plan_config(a.model)
    plan = build_plan(a, ds_cfg, config, processes, model_name=name)
    if not plan.fits:
        plan.fixes = suggest_fixes(plan, a, ds_cfg, config, processes)
    print(plan.text(), flush=True)
    return 0


def load_plan_config(model: str | None):
    """(config, name) for --model: what load_config reads, or a bare config.json file (no weights, no tokenizer)."""
    from ..prefix.base import load_config
    from ..prefix.errors import UserError, one_line
    from ..prefix.resolve import model_display_name
    from ..prefix.support import check_base_supported

    try:
        if model and str(model).endswith(".json") and os.path.isfile(model):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
            check_base_supported(config)
        else:
            config = load_config(model)
    except (OSError, ValueError) as e:
        msg = one_line(e)
        raise UserError(f"{msg if msg.startswith('--model') else f'--model {model}: {msg}'}") from None
    return config, model_display_name(model)
