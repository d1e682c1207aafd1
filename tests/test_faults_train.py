"""The trainer under faults and hostile input: kill -9 during training and during every save, a full disk, two
runs on one --save_name, resuming another run's state, and inputs that must give a one-line error.

Each case: a clear one-line error naming the input and the fix (or an exact resume), a non-zero exit where it
failed, and no existing output changed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from helpers import curve, run, train, train_with_fault

from prefixtune.prefix.io import load_prefix
from prefixtune.train.state import find_state, read_state

TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--dev_data_size", 6, "--batch_size", 2, "--log_every", 1, "--max_lr", 1e-2, "--n_warmup_steps", 2,
        "--precision", "fp32", "--zero_stage", 2]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, text_jsonl, tmp_path_factory):
    """The uninterrupted reference run: 7 steps, evaluation (and a save) every 2."""
    out = tmp_path_factory.mktemp("full")
    common = ["--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 7, "--eval_every", 2]
    train(*common, "--save_dir", out, "--save_name", "p")
    return common, out


def check_resumes_exactly(common, full_out: Path, out: Path) -> subprocess.CompletedProcess:
    again = train_with_fault(*common, "--save_dir", out, "--save_name", "p", "--resume")
    for ra, rb in zip(curve(full_out / "p.metrics.jsonl"), curve(out / "p.metrics.jsonl"), strict=True):
        assert [x is None for x in ra] == [x is None for x in rb]
        assert [x for x in ra if x is not None] == pytest.approx([x for x in rb if x is not None], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(load_prefix(out / "p.safetensors")[0], load_prefix(full_out / "p.safetensors")[0],
                               rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["p.metrics.jsonl", "p.safetensors", "p.state"]
    return again


def test_kill_9_during_training_then_resume_gives_the_same_curve(full_run, tmp_path):
    common, full_out = full_run
    killed = train_with_fault(*common, "--save_dir", tmp_path, "--save_name", "p", fault={"kill_after_step": 5},
                              check=False)
    assert killed.returncode == -9
    assert max(r[0] for r in curve(tmp_path / "p.metrics.jsonl")) == 5
    assert read_state(find_state(tmp_path / "p.state"))[3]["step"] == 4
    again = check_resumes_exactly(common, full_out, tmp_path)
    assert "resumed at step 4" in again.stdout


# The writes of a save, counted from step 1: round at step 2 = prefix (if improved), encoder, optimizer, rng,
# rename into place; round at step 4 adds the rename of the old state aside. Killing at each one of them:
@pytest.mark.parametrize("write", range(1, 12))
def test_kill_9_during_a_save_keeps_the_previous_outputs_and_resumes(write, full_run, tmp_path):
    common, full_out = full_run
    killed = train_with_fault(*common, "--save_dir", tmp_path, "--save_name", "p", fault={"kill_at_write": write},
                              check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    load_prefix(tmp_path / "p.safetensors")  # the prefix file is always whole: old or new, never half
    state = find_state(tmp_path / "p.state")
    if state is None:  # killed before the first state existed: a fresh start is the way on, and says so
        proc = train(*common, "--save_dir", tmp_path, "--save_name", "p", "--resume", check=False)
        assert "no training state" in one_line_error(proc)
        return
    read_state(state)  # complete, whichever of old and new it is
    check_resumes_exactly(common, full_out, tmp_path)


def test_kill_9_during_a_save_of_a_resumed_run(full_run, tmp_path):
    """Killed after step 5, resumed from step 4, killed again at the rename of the old state aside (write 4 of
    the resumed run: prefix?, 3 state files, renames), resumed again: still the same curve."""
    common, full_out = full_run
    train_with_fault(*common, "--save_dir", tmp_path, "--save_name", "p", fault={"kill_after_step": 5}, check=False)
    for write in (4, 5):
        killed = train_with_fault(*common, "--save_dir", tmp_path, "--save_name", "p", "--resume",
                                  fault={"kill_at_write": write}, check=False)
        assert killed.returncode == -9
        read_state(find_state(tmp_path / "p.state"))
    check_resumes_exactly(common, full_out, tmp_path)


def test_overwrite_forgets_the_previous_state(full_run, tmp_path):
    """--overwrite starts afresh: killed before its first evaluation, it leaves no state of the earlier run for a
    --resume to pick up (which would mix that run's best loss with this run's prefix)."""
    common, full_out = full_run
    shutil.copytree(full_out, tmp_path, dirs_exist_ok=True)
    killed = train_with_fault(*common, "--save_dir", tmp_path, "--save_name", "p", "--overwrite",
                              fault={"kill_after_step": 1}, check=False)
    assert killed.returncode == -9
    proc = train(*common, "--save_dir", tmp_path, "--save_name", "p", "--resume", check=False)
    assert "no training state" in one_line_error(proc)


def test_disk_full_during_a_save_is_one_line_and_leaves_the_previous_state(full_run, tmp_path):
    common, _ = full_run
    before = tmp_path / "before"
    proc = train_with_fault(*common, "--save_dir", tmp_path / "run", "--save_name", "p", check=False,
                            fault={"enospc_at_write": 8, "snapshot_after_step": 2, "to": str(before)})
    err = one_line_error(proc)
    assert err.startswith(f"error: no space left in {tmp_path / 'run'} to save the") and "--resume" in err
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["p.metrics.jsonl", "p.safetensors", "p.state"]  # no temporaries, no lock
    assert snapshot(tmp_path / "run" / "p.state") == snapshot(before / "p.state")


def test_a_really_full_disk(full_run, tmp_path):
    """The same on a real 32 KiB tmpfs: the step-0 prefix fits, the first training state does not."""
    common, _ = full_run
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected ENOSPC test "
                    "covers the same path")
    try:
        proc = train(*common, "--save_dir", mnt, "--save_name", "p", check=False)
        err = one_line_error(proc)
        assert err.startswith(f"error: no space left in {mnt} to save the"), err
        assert not [p for p in mnt.iterdir() if "tmp" in p.name]
        load_prefix(mnt / "p.safetensors")
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_second_run_on_the_same_save_name_is_refused(full_run, tmp_path):
    common, _ = full_run
    (tmp_path / "p.lock").write_text("12345")
    with open(tmp_path / "p.lock", "r+") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = train(*common, "--save_dir", tmp_path, "--save_name", "p", check=False)
    err = one_line_error(proc)
    assert "another run (pid 12345) is writing" in err and "--save_name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.lock"]
    train(*common, "--save_dir", tmp_path, "--save_name", "p", "--max_steps", 1)  # once it is gone, runs are fine


def test_resume_refuses_another_runs_state(full_run, tiny_llama_dir, sp_tokenizer_dir, tmp_path):
    common, full_out = full_run
    before = snapshot(full_out)
    proc = train(*common, "--save_dir", full_out, "--save_name", "p", "--resume", "--max_lr", 0.02, check=False)
    assert "--max_lr: the state has 0.01, this run 0.02" in one_line_error(proc)
    proc = train(*common, "--save_dir", full_out, "--save_name", "p", "--resume", "--precision", "bf16", check=False)
    assert "precision: the state has 'fp32', this run 'bf16'" in one_line_error(proc)
    same_shape = save_tiny("llama", sp_tokenizer_dir, tmp_path / "other_llama", seed=3)
    args = [a if a != tiny_llama_dir else same_shape for a in common]
    proc = train(*args, "--save_dir", full_out, "--save_name", "p", "--resume", check=False)
    assert proc.returncode != 0 and "--pretrained_model_dir: the state has" in proc.stderr
    proc = train(*common, "--save_dir", full_out, "--save_name", "p", "--resume", "--prefix_hidden_dim", 8,
                 check=False)
    err = one_line_error(proc)
    assert "--prefix_hidden_dim: the state has 16, this run 8" in err
    assert "encoder.mlp.0.weight: the state has shape (16, 16), this model and prefix need (8, 16)" in err
    assert snapshot(full_out) == before


@pytest.mark.parametrize("case", ["utf16", "empty_gguf", "junk_gguf", "missing_model", "bert", "no_ds_config"])
def test_hostile_inputs_give_one_line(case, tiny_llama_dir, sp_tokenizer_dir, text_jsonl, tmp_path):
    model, data, extra = str(tiny_llama_dir), str(text_jsonl), []
    if case == "utf16":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "hello"}\n', encoding="utf-16")
        expect = f"{data}: the file is UTF-16 text"
    elif case in ("empty_gguf", "junk_gguf"):
        model = tmp_path / "m.gguf"
        model.write_bytes(b"" if case == "empty_gguf" else os.urandom(4096))
        expect = f"--model {model}"
    elif case == "missing_model":
        model = tmp_path / "no" / "such" / "model"
        expect = f"--model {model}"
    elif case == "bert":
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        model = tmp_path / "bert"
        BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                   intermediate_size=16, vocab_size=100)).save_pretrained(model)
        AutoTokenizer.from_pretrained(sp_tokenizer_dir).save_pretrained(model)
        expect = "not a causal language model"
    else:
        extra = ["--deepspeed_config", tmp_path]  # a folder: neither a file to read nor a place to write one
        expect = f"--deepspeed_config {tmp_path}: expected a JSON file, got a directory"
    proc = train("--model", model, "--data", data, *TINY, "--max_steps", 1, "--save_dir", tmp_path / "out",
                 *extra, check=False)
    err = one_line_error(proc)
    assert expect in err, err
    assert not (tmp_path / "out").exists()


def test_compatibility_flags_say_they_change_nothing(tiny_llama_dir, text_jsonl, tmp_path):
    proc = train("--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 1, "--save_dir", tmp_path,
                 "--deepspeed", "--save_model")
    assert "--deepspeed and --save_model are accepted for the seed's command line and change nothing" in proc.stdout
    assert "data: " in proc.stdout and "transform none" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "prefix.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]


def test_runs_from_a_folder_with_a_data_subfolder(tiny_llama_dir, text_jsonl, tmp_path):
    """Most ML working folders have a data/ (and often prefix/ or convert/) folder: none may shadow the package."""
    for name in ("data", "prefix", "convert", "prefixtune"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise ImportError('the user data folder was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "train", "--model", str(tiny_llama_dir), "--data", str(text_jsonl),
                           *map(str, TINY), "--max_steps", "1", "--save_dir", str(tmp_path / "out")],
                          cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "prefix.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong_shape"])
def test_demo_on_a_bad_prefix_is_one_line(case, full_run, tiny_neox_dir, tmp_path):
    _, full_out = full_run
    path = tmp_path / "p.safetensors"
    args = []
    if case == "truncated":
        data = (full_out / "p.safetensors").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case == "wrong_shape":  # a llama prefix on a GPT-NeoX base of another shape
        path.write_bytes((full_out / "p.safetensors").read_bytes())
        args = ["--model", tiny_neox_dir, "--allow_other_base"]
    proc = run([sys.executable, "-m", "train.demo", "--prefix", str(path), *map(str, args)], check=False)
    err = one_line_error(proc)
    assert str(path) in err, err
