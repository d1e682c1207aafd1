"""Batch generation with an offloaded base: tokens/s of the embedded SmolLM2-135M in memory vs with part of its layers
on disk (accelerate's device map, `load_base(device_map=..., max_memory=..., offload_dir=...)`), at batch 1 and 16.

    python bench/offload.py                              # 8 new tokens per request, half of the layers on disk
    python bench/offload.py --max_new_tokens 16 --disk_share 0.75 --batch_sizes 1 4 16

Each scenario runs prompts with one task prefix (text-initialised, P=16) through the serving engine, as
`prefix_inference --input` does: B requests at once, each generating exactly --max_new_tokens tokens (no stop token),
greedy, after one warm-up request. tokens/s = B x max_new_tokens / wall time. An offloaded layer is copied in for
every forward pass, whatever the batch, so a bigger batch shares that cost over more tokens (FlexGen's lesson); the
in-memory model gains from batching too, and the ratio between the two shows how much of the offloading cost a
batch hides. Disk reads come from the OS page cache once warm (this bench cannot drop it): on a machine where the
offloaded weights do not fit in RAM, the disk's read speed sets the pace. Both scenarios must produce the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The for statement is used to", "A list comprehension consists of", "The with statement wraps",
           "Exceptions are raised when", "A function definition defines", "The import statement finds",
           "Dictionaries map keys to", "A class definition creates", "Generators are functions that",
           "A module is a file containing", "The while loop repeats", "Strings in Python are",
           "A decorator takes a function and", "The global statement declares", "Tuples are immutable",
           "The return statement leaves"]
PREFIX_TEXT = "The following text is taken from the documentation of the Python programming language."


def prepare(model: str | None, work: Path) -> tuple[Path, Path]:
    """A plain Hugging Face folder (safetensors) of the model, and one text-initialised prefix file."""
    import torch

    from prefixtune.prefix import PrefixEncoder, prefix_shape, text_key_values
    from prefixtune.prefix.base import load_base
    from prefixtune.prefix.io import save_prefix
    from prefixtune.prefix.weights import save_plain_model

    base, tok, _ = load_base(model, "fp32")
    model_dir = work / "model"
    save_plain_model(base, tok, model_dir)  # disk offload needs a plain folder (not GGUF)
    shape = prefix_shape(base.config, 16)
    enc = PrefixEncoder(shape)
    enc.reset("text", text_key_values(base, tok, PREFIX_TEXT, shape))
    with torch.no_grad():
        table = enc()
    path = work / "task.safetensors"
    save_prefix(path, table, shape, task="task", base_model=str(model_dir), architecture=base.config.model_type)
    return model_dir, path


def disk_budget(model_dir: Path, share: float) -> tuple[int, dict]:
    """A cpu budget whose "auto" map puts about `share` of the decoder layers on disk (bisection over the budget, in
    0.5 % steps of the checkpoint's size), and that map."""
    import re

    from transformers import AutoConfig

    from prefixtune.prefix.offload import plan_device_map

    config = AutoConfig.from_pretrained(model_dir)
    n = config.num_hidden_layers
    total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))

    def disk_share(step: int) -> tuple[float, int, dict]:
        budget = total * step // 200
        plan, _ = plan_device_map(config, "fp32", "auto", {"cpu": budget})
        if any(d == "disk" and re.search(r"layers$", name) for name, d in plan.items()):
            return 1.0, budget, plan
        return sum(d == "disk" and bool(re.search(r"layers\.\d+$", name)) for name, d in plan.items()) / n, budget, plan

    lo, hi = 1, 200  # the disk share falls as the budget grows: find the first step at or below `share`
    while lo < hi:
        mid = (lo + hi) // 2
        if disk_share(mid)[0] <= share:
            hi = mid
        else:
            lo = mid + 1
    candidates = [disk_share(step) for step in {max(1, lo - 1), lo}]
    _, budget, plan = min(candidates, key=lambda c: abs(c[0] - share))
    return budget, plan


def weights_in_ram(model) -> int:
    """Bytes of parameters held in memory (offloaded ones are placeholders on the meta device)."""
    seen = {id(p): p for p in model.parameters() if p.device.type != "meta"}
    return sum(p.numel() * p.element_size() for p in seen.values())


def run_batches(model, tok, prefix: Path, batch_sizes: list[int], max_new_tokens: int) -> dict:
    from prefixtune.prefix.io import load_prefix
    from prefixtune.serve.engine import Engine, GenRequest

    table, shape, _ = load_prefix(prefix)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out = {}
    for b in batch_sizes:
        engine = Engine(model, tok, max_batch_size=b, max_queue=max(b, 1))
        engine.add_task("task", table, shape)
        try:
            engine.generate_many([GenRequest(prompts[0], task="task", max_new_tokens=2)])  # warm-up
            reqs = [GenRequest(prompts[i % len(prompts)], task="task", max_new_tokens=max_new_tokens)
                    for i in range(b)]
            t0 = time.perf_counter()
            ids = engine.generate_many(reqs)
            wall = time.perf_counter() - t0
        finally:
            engine.shutdown()
        tokens = sum(len(x) for x in ids)
        out[b] = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "route": engine.route, "ids": ids}
        print(f"  batch {b:>2}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s ({engine.route} route)",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--max_new_tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--disk_share", type=float, default=0.5, help="share of the decoder layers to put on disk")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "offload.json"), help="where the results go")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers.utils import logging as hf_logging

    from prefixtune.prefix.base import load_base
    from prefixtune.prefix.offload import describe_device_map

    hf_logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    results: dict = {"config": {**vars(a), "torch_threads": torch.get_num_threads()}, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, prefix = prepare(a.model, work)
        budget, plan = disk_budget(model_dir, a.disk_share)
        scenarios = {
            "in memory": {},
            "part on disk": {"device_map": "auto", "max_memory": {"cpu": budget}, "offload_dir": str(work / "off")},
        }
        for name, kwargs in scenarios.items():
            model, tok, _ = load_base(str(model_dir), "fp32", "cpu", **kwargs)
            placed = describe_device_map(getattr(model, "hf_device_map", {"": "cpu"}))
            ram = weights_in_ram(model)
            print(f"{name}: {placed}; weights in RAM {ram / 2**20:.0f} MiB", flush=True)
            runs = run_batches(model, tok, prefix, a.batch_sizes, a.max_new_tokens)
            results["scenarios"][name] = {"device_map": placed, "max_memory": kwargs.get("max_memory"),
                                          "weights_in_ram_mib": ram / 2**20, "batches": runs}
            del model
    mem, off = results["scenarios"]["in memory"], results["scenarios"]["part on disk"]
    same = all(mem["batches"][b]["ids"] == off["batches"][b]["ids"] for b in a.batch_sizes)
    results["same_tokens"] = same
    for s in results["scenarios"].values():
        for run in s["batches"].values():
            run.pop("ids")
    print("\n| scenario | weights in RAM | " + " | ".join(f"batch {b} tok/s" for b in a.batch_sizes) + " |")
    print("|---|---:|" + "---:|" * len(a.batch_sizes))
    for name, s in results["scenarios"].items():
        print(f"| {name} | {s['weights_in_ram_mib']:.0f} MiB | "
              + " | ".join(f"{s['batches'][b]['tok_s']:.1f}" for b in a.batch_sizes) + " |")
    print("| part on disk / in memory | | "
          + " | ".join(f"{off['batches'][b]['tok_s'] / mem['batches'][b]['tok_s']:.2f}x" for b in a.batch_sizes)
          + " |")
    print(f"\npart on disk: {off['device_map']}\nsame tokens in both scenarios: {'yes' if same else 'NO'}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {a.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
