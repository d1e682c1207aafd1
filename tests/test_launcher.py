"""The deepspeed launcher: two CPU processes, ZeRO-2 with optimizer offload (DeepSpeedCPUAdam), bf16."""
from __future__ import annotations

import shutil
from pathlib import Path

from helpers import metrics, run

from prefixtune.prefix.io import load_prefix


def test_deepspeed_launcher_zero2_offload_two_processes(tiny_llama_dir, text_jsonl, tmp_path):
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH"
    out = tmp_path / "out"
    proc = run([launcher, "--num_gpus", "2", "--master_port", "29611", "--module", "train",
                "--model", str(tiny_llama_dir), "--data", str(text_jsonl), "--max_seq_len", "32",
                "--prefix_seq_len", "4", "--prefix_input_dim", "16", "--prefix_hidden_dim", "16", "--batch_size", "2",
                "--dev_data_size", "6", "--max_steps", "6", "--eval_every", "3", "--max_lr", "1e-2",
                "--zero_stage", "2", "--offload", "--bf16", "--gradient_checkpointing",
                "--save_name", "ds", "--save_dir", str(out)])
    assert "2 process(es), bf16, ZeRO-2 + CPU offload" in proc.stdout
    # only rank 0 wrote: one of each file, no stray temporaries
    assert sorted(p.name for p in out.iterdir()) == ["ds.metrics.jsonl", "ds.safetensors", "ds.state"]
    rows = metrics(out / "ds.metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(0, 7))  # one line per step, written once
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert min(dev[1:]) < dev[0]  # training helped
    table, shape, _ = load_prefix(out / "ds.safetensors")
    assert table.shape == (4, shape.width) and table.isfinite().all()
