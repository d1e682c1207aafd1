"""Training arguments: one dataclass, a docstring (help) per field, and one `validate_args` naming every bad flag.

The seed reference's flags (rinna prefix-tuning-gpt) are the primary names, so its command lines run unchanged;
`--model` and `--data` are short aliases of `--pretrained_model_dir` and `--data_filepath`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from ..prefix.flags import QUANTIZE_CHOICES, DefaultsOnceFormatter  # no torch: --help answers at once
from ..prefix.tasks import task_name_problem


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    pretrained_model_dir: str | None = _f(None, "base model: Hugging Face folder or name, a .gguf file, or 'smollm2' "
                                                "(default: the embedded SmolLM2-135M-Instruct); with --estimate also "
                                                "a config.json file or a folder holding only config.json",
                                          aliases=["--model"])
    model_type: str | None = _f(None, "seed compatibility: 'gpt-neox' or 'gpt'; checked against the model's config",
                                choices=["gpt-neox", "gpt"])
    data_filepath: str | None = _f(None, "JSONL with {\"text\"} or {\"prompt\",\"completion\"} per line "
                                         "(default: built-in paragraphs from CPython's documentation)")
    data: str | None = _f(None, "like --data_filepath, but {\"text\"} records train as they are (--transform none); "
                                "the log names the transform in use")
    transform: str | None = _f(None, "'smileface' appends ' 😃' to every line of {\"text\"} records; 'none' trains on "
                                     "text as is (default: smileface for the built-in data and for --data_filepath, "
                                     "as the seed did; none for --data)", choices=["smileface", "none"])
    max_seq_len: int = _f(96, "longest training example in tokens; smileface packs whole lines up to it")
    train_data_size: int | None = _f(None, "use at most this many training examples (default: all)")
    dev_data_size: int = _f(64, "held-out examples for the dev loss, taken from whole records")
    task: str | None = _f(None, "task name stored in the prefix file (default: --save_name)")
    # prefix
    prefix_seq_len: int = _f(16, "prefix length P (virtual tokens per layer)")
    prefix_input_dim: int = _f(512, "prefix encoder: embedding size")
    prefix_hidden_dim: int = _f(512, "prefix encoder: hidden size of the MLP")
    prefix_dropout: float = _f(0.0, "prefix encoder: dropout inside the MLP")
    prefix_init: str = _f("text", "step-0 prefix: 'text' = the base model's own keys/values for --prefix_init_text "
                                  "(barely changes the base model), 'zero', or 'random'",
                          choices=["text", "zero", "random"])
    prefix_init_text: str = _f("The following text is taken from the documentation of the Python programming "
                               "language.", "text whose keys/values start the prefix when --prefix_init text")
    # optimisation
    seed: int = _f(42, "seed for data order, initialisation and dropout")
    batch_size: int | None = _f(None, "micro-batch size per process (default 8, or the DeepSpeed config's)")
    n_accum_steps: int | None = _f(None, "micro-batches per optimizer step (default 1, or the DeepSpeed config's)")
    n_epochs: int = _f(1, "passes over the training data")
    batching: str = _f("buckets", "how examples form batches: 'buckets' = a seeded shuffle in which every 32 batches' "
                                  "worth is sorted by length before it is cut into batches (little padding: faster), "
                                  "'shuffle' = the seeded shuffle alone (the seed's order)",
                       choices=["buckets", "shuffle"])
    max_steps: int | None = _f(None, "stop after this many optimizer steps (default: n_epochs worth)",
                               aliases=["--n_training_steps"])
    n_warmup_steps: int = _f(10, "optimizer steps of linear warmup before cosine decay to --min_lr")
    max_lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-5, "learning rate at the end of the decay")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float | None = _f(None, "clip the gradient norm to this, 0 = off (default: the DeepSpeed config's "
                                       "gradient_clipping, else 1.0)")
    device_map: str | None = _f(None, "not for training: inference and serving take --device_map to offload the base; "
                                      "a training run keeps the whole base on its device (use --quantize, "
                                      "--gradient_checkpointing or --offload to save memory)")
    quantize: str = _f("none", "quantize the frozen base's Linear weights: int8 or int4 (torchao weight-only, CPU and "
                               "GPU), bnb-8bit, bnb-4bit or gptq (CUDA only); the prefix trains in full precision",
                       choices=list(QUANTIZE_CHOICES))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory; the prefix stays applied")
    # precision and DeepSpeed
    precision: str = _f("auto", "'auto' = bf16 on GPUs and CPUs with fast bf16, fp16 on older GPUs, else fp32 "
                                "(unless the DeepSpeed config enables fp16/bf16)",
                        choices=["auto", "fp32", "fp16", "bf16"])
    fp16: bool = _f(False, "same as --precision fp16: dynamic loss scaling (GPUs without bf16, e.g. T4)")
    bf16: bool = _f(False, "same as --precision bf16 (Ampere+ GPUs; ~4x faster than fp32 on CPUs with AMX/AVX512-BF16)")
    zero_stage: int | None = _f(None, "ZeRO stage 0, 1, 2 or 3 (default 2, or the DeepSpeed config's)",
                                choices=[0, 1, 2, 3])
    offload: bool = _f(False, "keep optimizer states on the CPU and step with DeepSpeedCPUAdam")
    deepspeed_config: str | None = _f(None, "DeepSpeed JSON: an existing file is read (e.g. "
                                            "ds_configs/zero2_offload.json) and flags given on the command line "
                                            "override its values; a missing file is written with the configuration "
                                            "built from the flags, as the seed reference does")
    deepspeed: bool = _f(False, "accepted for the seed's command line; training always runs under DeepSpeed")
    # output
    save_name: str = _f("prefix", "prefix file name: <save_dir>/<save_name>.safetensors")
    save_dir: str = _f("runs", "where the prefix, its training state and metrics go")
    save_model: bool = _f(False, "accepted for the seed's command line; the best prefix is always saved")
    resume: bool = _f(False, "continue from <save_dir>/<save_name>.state (same arguments, same loss curve)")
    overwrite: bool = _f(False, "start afresh even if <save_dir>/<save_name>.safetensors exists")
    eval_every: int = _f(50, "optimizer steps between dev evaluations (and training-state saves); 0 = per epoch")
    log_every: int = _f(10, "optimizer steps between log lines")
    # memory plan
    estimate: bool = _f(False, "print the memory plan of this run per process (base weights, prefix encoder, optimizer "
                               "state, DeepSpeed buffers, activations) and whether it fits, then exit; reads the "
                               "model's config only, no weights (under the deepspeed launcher rank 0 prints)")
    device_memory: str | None = _f(None, "with --estimate: plan for a GPU of this size per process instead of the one "
                                         "here, e.g. 16GiB, 500MB; cpu:64GiB plans a CPU run with that much RAM per "
                                         "process (default: this machine's GPU, else available RAM / processes)")
    processes: int | None = _f(None, "with --estimate: plan for this many processes (default: the launcher's "
                                     "WORLD_SIZE, else 1)")
    local_rank: int = _f(-1, "set by the deepspeed launcher", hidden=True)

    @property
    def model(self) -> str | None:
        return self.pretrained_model_dir

    @property
    def data_path(self) -> str | None:
        return self.data or self.data_filepath

    @property
    def data_transform(self) -> str:
        if self.transform:
            return self.transform
        return "none" if self.data else "smileface"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a prefix (prefix tuning, Li & Liang 2021) for a frozen causal LM under DeepSpeed. "
                    "Run as `deepspeed --module train ...` (any number of processes) or `python -m train ...` (one).",
        formatter_class=DefaultsOnceFormatter,
    )
    for f in dataclasses.fields(TrainArgs):
        meta = dict(f.metadata)
        names = [f"--{f.name}", *meta.pop("aliases", [])]
        kw = {"dest": f.name, "default": f.default,
              "help": argparse.SUPPRESS if meta.pop("hidden", False) else meta.pop("help")}
        meta.pop("help", None)
        if f.type == "bool":
            parser.add_argument(*names, action="store_true", **kw)
        else:
            conv = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(*names, type=conv, **kw, **meta)
        if f.name == "local_rank":
            parser.add_argument("--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def validate_args(a: TrainArgs) -> list[str]:
    """Every problem with the arguments, each naming its flag; empty when all is well."""
    problems = []
    positive = ["max_seq_len", "prefix_seq_len", "prefix_input_dim", "prefix_hidden_dim", "n_epochs", "log_every"]
    for name in positive + ["batch_size", "n_accum_steps", "max_steps", "train_data_size", "processes"]:
        v = getattr(a, name)
        if v is not None and v < 1:
            problems.append(f"--{name} must be at least 1, got {v}")
    for name in ("n_warmup_steps", "dev_data_size", "eval_every", "weight_decay", "grad_clip", "min_lr"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            problems.append(f"--{name} must not be negative, got {getattr(a, name)}")
    if not 0 <= a.prefix_dropout < 1:
        problems.append(f"--prefix_dropout must be in [0, 1), got {a.prefix_dropout}")
    if a.device_map not in (None, "none"):
        problems.append(f"--device_map {a.device_map}: expected none in training, got an offloaded base (the "
                        "DeepSpeed engine needs every layer on its device); save memory with --quantize int8|int4, "
                        "--gradient_checkpointing or --offload, and use --device_map with prefix_inference / "
                        "prefix_serve")
    if a.max_lr <= 0:
        problems.append(f"--max_lr must be positive, got {a.max_lr}")
    elif a.min_lr > a.max_lr:
        problems.append(f"--min_lr ({a.min_lr}) must not exceed --max_lr ({a.max_lr})")
    chosen = {p for p, on in (("fp16", a.fp16), ("bf16", a.bf16), (a.precision, a.precision != "auto")) if on}
    if len(chosen) > 1:
        problems.append(f"--fp16, --bf16 and --precision disagree ({', '.join(sorted(chosen))}): pick one")
    if a.dev_data_size < 1:
        problems.append("--dev_data_size must be at least 1: the best prefix is chosen on the dev loss")
    if a.prefix_init == "text" and not a.prefix_init_text.strip():
        problems.append("--prefix_init_text is empty: give a text or use --prefix_init zero")
    if not a.save_name or "/" in a.save_name or a.save_name.startswith("."):
        problems.append(f"--save_name must be a plain file name (no '/', not hidden), got {a.save_name!r}")
    else:  # the task name is fixed before any work: a run must not train to the end and save what nothing can serve
        problem = task_name_problem(a.task if a.task is not None else a.save_name)
        if problem:
            flag = "--task" if a.task is not None else "--save_name (the task name when --task is not given)"
            problems.append(f"{flag}: {problem}" + ("" if a.task is not None else "; give --task NAME"))
    if a.deepspeed_config and not os.path.lexists(a.deepspeed_config) \
            and not os.path.isdir(os.path.dirname(os.path.expanduser(a.deepspeed_config)) or "."):
        problems.append(f"--deepspeed_config {a.deepspeed_config}: no such file, and its folder does not exist to "
                        "write the built configuration into; create the folder or name an existing DeepSpeed JSON")
    if a.data and a.data_filepath:
        problems.append("--data and --data_filepath both name a data file: give one")
    if a.resume and a.overwrite:
        problems.append("--resume and --overwrite exclude each other")
    if not a.estimate:
        for name in ("device_memory", "processes"):
            if getattr(a, name) is not None:
                problems.append(f"--{name} only applies to --estimate")
        if a.model and str(a.model).endswith(".json"):
            problems.append(f"--model {a.model}: a config.json alone has no weights to train; it works with --estimate")
    elif a.device_memory is not None:
        from .estimate import parse_size

        try:
            parse_size(a.device_memory)
        except ValueError as e:
            problems.append(str(e))
    return problems


# What decides the numbers of a run: a state resumes only into a run where all of these are the same.
# (--max_steps / --n_epochs may grow, --eval_every / --log_every and the output flags may change.)
RESUME_MUST_MATCH = (
    "pretrained_model_dir", "data_filepath", "data", "transform", "max_seq_len", "train_data_size", "dev_data_size",
    "prefix_seq_len", "prefix_input_dim", "prefix_hidden_dim", "prefix_dropout", "prefix_init", "prefix_init_text",
    "seed", "n_warmup_steps", "max_lr", "min_lr", "weight_decay", "grad_clip", "quantize", "batching",
)
# What a state saved before a flag existed implies for it.
_BEFORE_FLAG = {"quantize": "none", "batching": "shuffle"}


def resume_mismatches(saved: dict, now: TrainArgs, saved_world: int, world: int) -> list[str]:
    """Each argument where the saved run and this one differ, as '--flag: the state has X, this run Y'."""
    from ..prefix.io import same_base_model  # paths compare resolved, so a moved working folder is fine

    problems = []
    for name in RESUME_MUST_MATCH:
        old, new = saved.get(name, _BEFORE_FLAG.get(name)), getattr(now, name)
        same = same_base_model(old, new) if name in ("pretrained_model_dir", "data_filepath", "data") else old == new
        if not same:
            problems.append(f"--{name}: the state has {old!r}, this run {new!r}")
    if saved_world != world:
        problems.append(f"processes: the state comes from {saved_world}, this run has {world}")
    return problems


def parse_args(argv=None) -> TrainArgs:
    ns = build_parser().parse_args(argv)
    args = TrainArgs(**vars(ns))
    problems = validate_args(args)
    if problems:
        build_parser().error("\n  " + "\n  ".join(problems))
    return args
