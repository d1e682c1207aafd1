"""Training end to end in subprocesses: outputs, the seed's command line, kill-and-resume, configs, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, metrics, train

from prefixtune.prefix.io import load_prefix

TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--dev_data_size", 6, "--batch_size", 2, "--log_every", 1, "--max_lr", 1e-2, "--n_warmup_steps", 2]


def test_seed_command_line_runs(tiny_neox_dir, text_jsonl, tmp_path):
    """rinna's own flags, as in its README (with --module train), on its {"text"} JSONL format."""
    out = tmp_path / "out"
    # rinna's trainer hands DeepSpeed a JSON file of its own; stage 0 as there, the precision left to the machine
    (tmp_path / "ds_config.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                                                         "zero_optimization": {"stage": 0}}))
    proc = train("--model_type", "gpt-neox", "--pretrained_model_dir", tiny_neox_dir, "--data_filepath", text_jsonl,
                 "--train_data_size", 40, "--dev_data_size", 6, "--batch_size", 4, "--n_epochs", 2,
                 "--n_accum_steps", 2, "--n_warmup_steps", 1, "--prefix_seq_len", 4, "--prefix_input_dim", 8,
                 "--prefix_hidden_dim", 8, "--max_lr", 1e-3, "--save_name", "seed", "--save_model", "--deepspeed",
                 "--deepspeed_config", tmp_path / "ds_config.json", "--save_dir", out)
    assert sorted(p.name for p in out.iterdir()) == ["seed.metrics.jsonl", "seed.safetensors", "seed.state"]
    table, shape, meta = load_prefix(out / "seed.safetensors")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.prefix_len) == (2, 4, 8, 4)
    assert meta["architecture"] == "gpt_neox" and meta["task"] == "seed"
    rows = metrics(out / "seed.metrics.jsonl")
    assert rows[0]["step"] == 0 and "dev_loss" in rows[0]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all({"loss", "lr", "tokens_per_s", "epoch"} <= r.keys() for r in steps)
    assert "step 0: dev loss" in proc.stdout and "ZeRO-0" in proc.stdout


def test_resume_needs_resume_and_existing_prefix_is_kept(tiny_llama_dir, text_jsonl, tmp_path):
    common = ["--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 1, "--save_dir", tmp_path]
    train(*common)
    before = (tmp_path / "prefix.safetensors").read_bytes()
    proc = train(*common, check=False)
    assert proc.returncode != 0 and "exists: pass --resume" in proc.stderr
    assert (tmp_path / "prefix.safetensors").read_bytes() == before


def test_bad_data_line_is_named_and_nothing_written(tiny_llama_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "one"}\n{"prompt": 1, "completion": "x"}\n', encoding="utf-8")
    proc = train("--model", tiny_llama_dir, "--data", data, *TINY, "--save_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert f"{data}:2: field 'prompt' must be a string, got int" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag():
    from prefixtune.train.args import TrainArgs, build_parser

    text = build_parser().format_help()
    for name in TrainArgs.__dataclass_fields__:
        if name != "local_rank":
            assert f"--{name}" in text
    assert "--model" in text and "--data " in text


def test_validate_args_lists_every_problem(capsys):
    from prefixtune.train.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--batch_size", "0", "--fp16", "--bf16", "--max_lr", "-1", "--save_name", "a/b"])
    err = capsys.readouterr().err
    for msg in ("--batch_size must be at least 1, got 0", "--fp16, --bf16 and --precision disagree (bf16, fp16)",
                "--max_lr must be positive", "--save_name must be a plain file name"):
        assert msg in err


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_loads(path):
    from prefixtune.train.args import parse_args
    from prefixtune.train.ds_config import auto_precision, build_ds_config, offloads, precision

    raw = json.loads(path.read_text())
    cfg = build_ds_config(parse_args(["--deepspeed_config", str(path)]), world_size=2)
    assert cfg["zero_optimization"]["stage"] == raw["zero_optimization"]["stage"]
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2
    assert offloads(cfg) == ("offload_optimizer" in raw["zero_optimization"])
    assert precision(cfg) == ("fp16" if raw.get("fp16", {}).get("enabled") else auto_precision())
    fp32 = build_ds_config(parse_args(["--deepspeed_config", str(path), "--precision", "fp32"]), world_size=1)
    assert precision(fp32) == "fp32"
    flags = build_ds_config(parse_args(["--deepspeed_config", str(path), "--zero_stage", "1", "--bf16",
                                        "--batch_size", "3"]), world_size=1)
    assert flags["zero_optimization"]["stage"] == 1 and precision(flags) == "bf16"
    assert flags["train_micro_batch_size_per_gpu"] == 3


def test_text_init_keeps_the_base_model_loss():
    """On the embedded SmolLM2: step-0 dev loss with the default text-initialised prefix is within 10 % of the
    bare model's; a random prefix is far worse."""
    from prefixtune.data import build_split, builtin_records, collate
    from prefixtune.prefix import PrefixEncoder, PrefixLM, prefix_shape, text_key_values
    from prefixtune.prefix.base import load_base
    from prefixtune.train.args import TrainArgs

    base, tok, _ = load_base(None)
    _, dev, _ = build_split(builtin_records(), tok, max_len=96, transform="smileface", seed=42, train_size=None,
                            dev_size=24, eos_id=None)
    batch = collate(dev, tok.pad_token_id)

    def loss_of(init):
        enc = PrefixEncoder(prefix_shape(base.config, 16))
        torch.manual_seed(0)
        anchor = text_key_values(base, tok, TrainArgs.prefix_init_text, enc.shape) if init == "text" else None
        enc.reset(init, anchor)
        with torch.no_grad():
            return PrefixLM(base, enc)(**batch)[0].item()

    with torch.no_grad():
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        bare = torch.nn.functional.cross_entropy(out[labels != -100], labels[labels != -100]).item()
    assert loss_of("text") < 1.10 * bare
    assert loss_of("random") > 1.10 * bare


def test_demo_prompts_are_never_trained_on(sp_tokenizer_dir, tmp_path):
    """Records of very different lengths, so smileface changes how many examples each gives (and so the split)."""
    from transformers import AutoTokenizer

    from prefixtune.data import build_split, read_jsonl
    from prefixtune.train.demo import held_out_prompts, line_end_share

    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    words = ["quick brown fox", "lazy dog", "prefix", "key and value", "tuples and lists", "python"]
    lines = [json.dumps({"text": f"the {words[i % 6]} number {'a' * (i + 1)}\nthe lazy dog jumps"}) for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = {"data_filepath": str(path), "max_seq_len": 40, "seed": 5, "dev_data_size": 8}
    prompts = held_out_prompts(args, tok, 100)
    split = {t: build_split(read_jsonl(path), tok, max_len=40, transform=t, seed=5, train_size=None, dev_size=8,
                            eos_id=tok.eos_token_id) for t in ("smileface", "none")}
    assert len(split["smileface"][2]) != len(split["none"][2])  # the transform moves records between the halves
    trained = " ".join(tok.decode(e["input_ids"]) for e in split["smileface"][0]).replace(" ", "")
    assert "numbera😃" in trained  # the check below can find a trained first line
    assert prompts and not [p for p in prompts if "number" + p.split(" number ")[1] + "😃" in trained]
    assert line_end_share(["a 😃\nb\n\nc 😃\nunfinished 😃", "no line end"]) == (2, 3)


def test_state_survives_a_crash_between_renames(tmp_path):
    from prefixtune.train.state import find_state, read_state, write_state

    folder = tmp_path / "p.state"
    assert find_state(folder) is None
    write_state(folder, {"encoder.w": torch.ones(2)}, torch.zeros(1), {"exp_avg/encoder.w": torch.ones(2)},
                {"cpu.0": torch.get_rng_state()}, {"step": 4})
    assert find_state(folder) == folder
    folder.rename(tmp_path / "p.state.old")  # the moment after the old state moved aside, before the new arrived
    found = find_state(folder)
    assert found == tmp_path / "p.state.old" and read_state(found)[3] == {"step": 4}


def test_a_state_left_only_in_old_survives_the_next_save(tmp_path, monkeypatch):
    """After a kill between the two renames only p.state.old is left; the next save must keep it until the new
    state is in place: here that save dies at its last rename, and a whole state must still be found."""
    import pathlib

    from prefixtune.train.state import find_state, read_state, write_state

    folder = tmp_path / "p.state"
    rng = {"cpu.0": torch.get_rng_state()}
    write_state(folder, {"encoder.w": torch.ones(2)}, torch.zeros(1), {}, rng, {"step": 4})
    folder.rename(tmp_path / "p.state.old")
    rename = pathlib.Path.rename

    def dies_at_the_last_rename(self, target):
        if ".tmp" in self.name:
            raise KeyboardInterrupt  # stands for the kill
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", dies_at_the_last_rename)
    with pytest.raises(KeyboardInterrupt):
        write_state(folder, {"encoder.w": torch.full((2,), 2.0)}, torch.zeros(1), {}, rng, {"step": 6})
    monkeypatch.undo()
    assert read_state(find_state(folder))[3] == {"step": 4}
