"""--estimate: the memory plan counts what the trainer builds, prints from a config alone, and names a fix."""
from __future__ import annotations

import pytest
from conftest import tiny_config, tiny_model
from helpers import train

from prefixtune.prefix import PrefixEncoder, prefix_shape
from prefixtune.train.args import TrainArgs, validate_args
from prefixtune.train.estimate import base_param_count, encoder_param_count, parse_size


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_base_count_matches_a_built_model(arch):
    real = sum(p.numel() for p in tiny_model(arch).parameters())
    assert base_param_count(tiny_config(arch)) == real


@pytest.mark.parametrize("arch,p,in_dim,hid", [("llama", 4, 16, 24), ("gpt_neox", 16, 512, 512), ("gpt2", 3, 8, 5)])
def test_encoder_count_matches_prefix_encoder(arch, p, in_dim, hid):
    shape = prefix_shape(tiny_config(arch), p)
    real = sum(t.numel() for t in PrefixEncoder(shape, in_dim, hid).parameters())
    assert encoder_param_count(shape, in_dim, hid) == real


def _config_only(tmp_path):
    folder = tmp_path / "cfg"
    tiny_config("gpt_neox").save_pretrained(folder)
    assert sorted(f.name for f in folder.iterdir()) == ["config.json"]  # no weights, no tokenizer
    return folder


def test_cli_prints_the_plan_from_a_config_alone(tmp_path):
    folder = _config_only(tmp_path)
    for model in (folder, folder / "config.json"):
        proc = train("--estimate", "--model", model, "--bf16", "--batch_size", 2, "--max_seq_len", 32,
                     "--save_dir", tmp_path / "out")
        assert "memory plan:" in proc.stdout and "frozen base weights" in proc.stdout
        assert "Adam moments" in proc.stdout and "activations" in proc.stdout
        assert proc.stdout.rstrip().splitlines()[-1].strip() == "fits"
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_cli_names_a_fix_when_it_does_not_fit(tmp_path):
    proc = train("--estimate", "--model", _config_only(tmp_path), "--bf16", "--device_memory", "1MiB",
                 "--save_dir", tmp_path / "out")
    assert "does NOT fit" in proc.stdout
    fix = [line for line in proc.stdout.splitlines() if "to fit:" in line]
    assert fix and ("--gradient_checkpointing" in fix[0] or "more memory" in fix[0]), proc.stdout


def test_estimate_flags_are_checked():
    assert parse_size("16GiB") == ("gpu", 16 * 2**30) and parse_size("cpu:500MB") == ("cpu", 500 * 10**6)
    problems = validate_args(TrainArgs(device_memory="16GiB"))
    assert problems == ["--device_memory only applies to --estimate"]
    assert any("--device_memory" in p for p in validate_args(TrainArgs(estimate=True, device_memory="lots")))
    assert any("config.json" in p for p in validate_args(TrainArgs(pretrained_model_dir="x/config.json")))


def test_training_refuses_an_offloaded_base():
    from prefixtune.train.args import TrainArgs, validate_args

    (problem,) = validate_args(TrainArgs(device_map="auto"))
    assert problem.startswith("--device_map auto: expected none in training") and "--quantize" in problem
    assert validate_args(TrainArgs(device_map="none")) == []
