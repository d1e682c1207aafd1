"""The seed article's command line, as written, and the one task-name rule at the start of a run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import train

from conftest import CORPUS
from prefixtune.prefix.io import load_prefix
from prefixtune.prefix.tasks import rename_task, task_name_problem

TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--batch_size", 2, "--dev_data_size", 4]


def test_the_articles_command_line_runs_from_an_empty_folder(tiny_neox_dir, tmp_path):
    """rinna's README command line, flag for flag, with `--offload` added: `--deepspeed_config ./ds_config.json`
    names where the built configuration is written (the seed reference's convention); the folder holds nothing but
    the data file. Launcher, two ranks, ZeRO-2 + CPU offload."""
    work = tmp_path / "work"
    work.mkdir()
    records = ["\n".join(CORPUS[(i + j) % 5] for j in range(2)) for i in range(90)]
    (work / "sample_data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records), "utf-8")
    cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", "29617", "--module", "train",
           "--model_type", "gpt-neox", "--pretrained_model_dir", str(tiny_neox_dir),
           "--data_filepath", "./sample_data.jsonl", "--train_data_size", "1000", "--dev_data_size", "10",
           "--batch_size", "4", "--max_lr", "0.0001", "--deepspeed", "--deepspeed_config", "./ds_config.json",
           "--save_name", "smileface", "--save_model", "--offload"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK")}
    proc = subprocess.run(cmd, cwd=work, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("--deepspeed_config ./ds_config.json: no such file, so the configuration built from "
                             "the flags was written there") == 1  # one line, from rank 0
    cfg = json.loads((work / "ds_config.json").read_text("utf-8"))
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["train_batch_size"] == 4 * 2 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert "2 process(es)" in proc.stdout and "ZeRO-2 + CPU offload" in proc.stdout
    table, shape, meta = load_prefix(work / "runs" / "smileface.safetensors")
    assert meta["task"] == "smileface" and table.isfinite().all()
    # The file now exists: DeepSpeed's convention, it is read (a flag still wins over it) and left as it was.
    before = (work / "ds_config.json").read_bytes()
    cfg["train_micro_batch_size_per_gpu"] = 2
    (work / "ds_config.json").write_text(json.dumps(cfg), "utf-8")
    proc = subprocess.run([sys.executable, "-m", "train", "--model_type", "gpt-neox", "--pretrained_model_dir",
                           str(tiny_neox_dir), "--data_filepath", "./sample_data.jsonl", "--deepspeed",
                           "--deepspeed_config", "./ds_config.json", "--save_name", "again", "--max_steps", "1",
                           "--estimate"], cwd=work, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no such file" not in proc.stdout and "batch 2 x seq" in proc.stdout, proc.stdout
    assert json.loads((work / "ds_config.json").read_text("utf-8"))["train_micro_batch_size_per_gpu"] == 2
    assert before != (work / "ds_config.json").read_bytes()


def test_a_missing_config_in_a_missing_folder_is_one_line(tiny_llama_dir, text_jsonl, tmp_path):
    where = tmp_path / "no" / "such" / "ds.json"
    proc = train("--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 1, "--save_dir",
                 tmp_path / "out", "--deepspeed_config", where, check=False)
    assert proc.returncode != 0
    assert f"--deepspeed_config {where}: no such file, and its folder does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--task", "../../etc/x"], "--task: task name '../../etc/x': expected 1-64 letters"),
    (["--task", "a\nb"], "--task: task name 'a\\nb': expected 1-64 letters"),
    (["--task", "x" * 65], f"--task: task name '{'x' * 65}': expected 1-64 letters"),
    (["--save_name", "base"], "--save_name (the task name when --task is not given): task name 'base' is reserved"),
    (["--task", "Base"], "--task: task name 'Base' is reserved"),
])
def test_a_bad_task_name_stops_the_run_before_any_work(flags, needle, tiny_llama_dir, text_jsonl, tmp_path):
    proc = train("--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 1, "--save_dir",
                 tmp_path / "out", *flags, check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr  # argparse's usage error: nothing loaded
    assert not (tmp_path / "out").exists()


def test_one_rule_for_every_name():
    """The rule as the docs state it, checked name by name (not through the function that implements it)."""
    good = ["smileface", "my.task", "a-b_c", "_x", "9", "x" * 64, "base2", "bases"]
    bad = ["", "base", "BASE", ".hidden", "-x", "a/b", "../x", "a b", "a\nb", "é", "x" * 65, " x", None, 3]
    assert [n for n in good if task_name_problem(n)] == []
    assert [n for n in bad if not task_name_problem(n)] == []


def test_the_two_rename_commands_agree(tiny_llama_dir, tmp_path):
    """`prefix.io rename` and `convert retask` accept and refuse the same names (prefix.io used to take '../x')."""
    import torch

    from prefixtune.convert.ft_layout import task_name_problem as export_problem
    from prefixtune.prefix.io import save_prefix
    from prefixtune.prefix.shapes import PrefixShape

    shape = PrefixShape(prefix_len=2, num_layers=1, num_kv_heads=1, head_dim=2)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.zeros(2, shape.width), shape, task="t", base_model="m", architecture="llama")
    for name in ["../x", "a b", "base", "x" * 65]:
        with pytest.raises(ValueError, match="task name"):
            rename_task(path, name)
        assert export_problem(name)
    rename_task(path, "my.task")
    assert load_prefix(path)[2]["task"] == "my.task" and export_problem("my.task") is None
