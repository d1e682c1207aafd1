"""The REPL through stdin and batch generation, against greedy decoding computed independently."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import run
from test_equivalence import reference_logits

from prefixtune.prefix import prefix_shape
from prefixtune.prefix.io import save_prefix

P = 5


def greedy_reference(model_dir, table, prompt: str, n: int) -> str:
    """Greedy decoding by full recomputation through HF eager attention over a hand-built prefix cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    eager = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones_like(ids)
            if table is None:
                logits = eager(input_ids=ids, attention_mask=mask).logits
            else:
                logits = reference_logits(eager, table, ids, mask)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def prefixes(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoConfig

    shape = prefix_shape(AutoConfig.from_pretrained(tiny_llama_dir), P)
    d = tmp_path_factory.mktemp("prefixes")
    tables = {}
    for i, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(10 + i)
        tables[name] = torch.randn(P, shape.width) * 2
        save_prefix(d / f"{name}.safetensors", tables[name], shape, task=name, base_model=str(tiny_llama_dir),
                    architecture="llama")
    return d, tables


def cli(*args, **kw):
    return run([sys.executable, "-m", "prefixtune.inference", *map(str, args)], **kw)


def test_repl_through_stdin_switches_tasks(tiny_llama_dir, prefixes):
    d, tables = prefixes
    prompt = "The quick brown fox"
    script = "\n".join([prompt, ":tasks", ":task beta", prompt, ":base", prompt, ":task nope", ":quit", "ignored"])
    proc = cli("--model", tiny_llama_dir, "--prefix", d / "alpha.safetensors", d / "beta.safetensors",
               "--greedy", "--max_new_tokens", 6, input=script + "\n")
    lines = proc.stdout.split("\n")
    assert lines[0] == greedy_reference(tiny_llama_dir, tables["alpha"], prompt, 6)
    assert lines[1:4] == ["  base", "* alpha", "  beta"]
    assert lines[4] == greedy_reference(tiny_llama_dir, tables["beta"], prompt, 6)
    assert lines[5] == greedy_reference(tiny_llama_dir, None, prompt, 6)
    assert len({lines[0], lines[4], lines[5]}) == 3  # the prefixes change the output
    assert "unknown task 'nope'" in proc.stderr
    assert "ignored" not in proc.stdout


def test_batch_generation_matches_one_by_one(tiny_llama_dir, prefixes, tmp_path):
    d, tables = prefixes
    prompts = ["The quick brown fox", "Lists", "A prefix is a short sequence of learned", "Python"]
    rows = [{"prompt": p, "task": t} for p in prompts for t in ("alpha", "beta", "base")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cli("--model", tiny_llama_dir, "--prefix", d / "alpha.safetensors", d / "beta.safetensors", "--greedy",
        "--max_new_tokens", 4, "--input", src, "--output", tmp_path / "out.jsonl", "--batch_size", 3)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["task"]) for r in out] == [(r["prompt"], r["task"]) for r in rows]
    for r in out:  # left-padded batches give what each prompt gives alone
        table = None if r["task"] == "base" else tables[r["task"]]
        assert r["completion"] == greedy_reference(tiny_llama_dir, table, r["prompt"], 4), r


def test_mismatched_prefix_is_refused(tiny_neox_dir, prefixes):
    d, _ = prefixes
    proc = cli("--model", tiny_neox_dir, "--prefix", d / "alpha.safetensors", input="", check=False)
    assert proc.returncode != 0
    assert "does not fit this base model" in proc.stderr and "num_kv_heads: prefix has 2, base model has 4" in proc.stderr


def test_seed_flags(tiny_llama_dir, prefixes):
    d, tables = prefixes
    proc = cli("--pretrained_model_dir", tiny_llama_dir, "--prefix_checkpoint_path", d / "alpha.safetensors",
               "--decode_method", "greedy", "--max_output_len", 5, input="Lists\n")
    assert proc.stdout.split("\n")[0] == greedy_reference(tiny_llama_dir, tables["alpha"], "Lists", 5)
