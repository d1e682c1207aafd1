"""Where a training step's time goes: torch.profiler over a few steps of the real trainer, in one process.

    python bench/profile_train.py                       # bf16, P=16, batch 8, max_seq_len 96, embedded SmolLM2
    python bench/profile_train.py --steps 5 --rows 30 -- --gradient_checkpointing   # more trainer flags after --

It builds the run exactly as `python -m train` does (train/loop.py setup), warms up for two steps, then profiles
--steps optimizer steps and prints the ops by their own CPU time. Nothing is saved but the run's scratch folder,
which is a temporary one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="profiled optimizer steps (after 2 warm-up steps)")
    p.add_argument("--rows", type=int, default=25, help="ops shown")
    p.add_argument("trainer_flags", nargs="*", help="flags for the trainer (after --); default: the bench settings")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from torch.profiler import ProfilerActivity, profile

    from prefixtune.train import loop
    from prefixtune.train.args import parse_args
    from prefixtune.train.ds_config import build_ds_config
    from prefixtune.train.outputs import Outputs

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--bf16", "--prefix_seq_len", "16", "--batch_size", "8", "--max_seq_len", "96",
                 "--max_steps", str(a.steps + 2), "--save_dir", tmp, "--save_name", "profile", *a.trainer_flags]
        args = parse_args(flags)
        loop.pin_malloc_thresholds(low_memory=args.gradient_checkpointing)
        run = loop.setup(args, build_ds_config(args, 1), Outputs(Path(tmp), "profile"))
        run.engine.train()
        for step in range(2):
            loop.train_step(run, step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            tokens = sum(int(loop.train_step(run, step)[1]) for step in range(2, 2 + a.steps))
            wall = time.perf_counter() - t0
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=45))
        print(f"{a.steps} steps, {tokens} tokens in {wall:.2f} s under the profiler ({tokens / wall:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
