"""prefix_inference and Generator on faulty input: clashing task names, a prefix on another base model, prompts past
the position table, files that are not models, non-causal and sliding-window models, bad stdin. Every refusal is one
line naming what is wrong and the fix; what still runs is compared with greedy decoding computed independently."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_config
from helpers import ROOT
from test_inference import greedy_reference

from prefixtune.prefix import prefix_shape
from prefixtune.prefix.base import load_config
from prefixtune.prefix.generate import Generator, Sampling
from prefixtune.inference.cli import main
from prefixtune.prefix.io import check_base_model, load_prefix, same_base_model, save_prefix
from prefixtune.prefix.support import check_base_supported

P = 5


# ---------------------------------------------------------------- helpers

def make_prefix(path: Path, model_dir, task: str, seed: int, base_model=None) -> torch.Tensor:
    from transformers import AutoConfig

    shape = prefix_shape(AutoConfig.from_pretrained(model_dir), P)
    torch.manual_seed(seed)
    table = torch.randn(P, shape.width) * 2
    save_prefix(path, table, shape, task=task, base_model=str(model_dir if base_model is None else base_model),
                architecture="llama")
    return table


def run_main(argv, monkeypatch, capsys, stdin: bytes = b""):
    """main() in this process with `stdin` as standard input: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)  # what the interpreter prints for SystemExit("...")
            code = 1
        else:
            code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv, monkeypatch, capsys, stdin: bytes = b"") -> str:
    """main() must exit non-zero with exactly one line `error: ...` on stderr; returns that line."""
    capsys.readouterr()  # drop what the fixtures printed
    code, out, err = run_main(argv, monkeypatch, capsys, stdin)
    assert code != 0, (out, err)
    return last_line_is_the_error(err)


def last_line_is_the_error(err: str) -> str:
    """Progress bars may come first; then exactly one line `error: ...`, the last one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum("error:" in line for line in lines) == 1, err
    return lines[-1]


def cli_bytes(*args, stdin: bytes = b"", timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with raw bytes on stdin (helpers.run only sends text)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "prefixtune.inference", *map(str, args)], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    return last_line_is_the_error(err)


@pytest.fixture(scope="module")
def other_llama_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    """Same shape as tiny_llama_dir, other weights: a prefix trained on one runs silently on the other."""
    return save_tiny("llama", sp_tokenizer_dir, tmp_path_factory.mktemp("llama_b") / "model", seed=1)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny("gpt2", sp_tokenizer_dir, tmp_path_factory.mktemp("gpt2") / "model")


def save_from_config(config, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = AutoModel.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# ---------------------------------------------------------------- 1 and 7: task names

def test_two_files_with_the_same_task_are_refused(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_prefix(a, tiny_llama_dir, "x", 1)
    make_prefix(b, tiny_llama_dir, "x", 2)
    msg = refused(["--model", tiny_llama_dir, "--prefix", a, b], monkeypatch, capsys)
    assert f"--prefix {a} and {b} both carry task 'x'" in msg and "rename one with" in msg


def test_generator_refuses_a_duplicate_task_unless_replace(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_prefix(a, tiny_llama_dir, "x", 1)
    tb = make_prefix(b, tiny_llama_dir, "x", 2)
    gen = Generator(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
                    AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert gen.add_prefix(a) == "x"
    with pytest.raises(ValueError, match="both carry task 'x'") as e:
        gen.add_prefix(b)
    assert str(a) in str(e.value) and str(b) in str(e.value)
    assert gen.add_prefix(b, replace=True) == "x"  # deliberate replacement (a server reloading a task)
    assert torch.equal(gen.tasks["x"][0], tb)


def test_task_named_base_is_refused(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "b.safetensors"
    make_prefix(path, tiny_llama_dir, "base", 1)
    msg = refused(["--model", tiny_llama_dir, "--prefix", path], monkeypatch, capsys)
    assert str(path) in msg and "'base' is reserved" in msg and "rename" in msg
    gen = Generator(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
                    AutoTokenizer.from_pretrained(tiny_llama_dir))
    with pytest.raises(ValueError, match="'base' is reserved"):
        gen.add_prefix(path)
    assert gen.tasks == {}


# ---------------------------------------------------------------- 2: the base model a prefix was trained on

def test_prefix_on_another_base_of_the_same_shape(tiny_llama_dir, other_llama_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.safetensors"
    table = make_prefix(path, tiny_llama_dir, "alpha", 3)
    msg = refused(["--model", other_llama_dir, "--prefix", path], monkeypatch, capsys, stdin=b"Lists\n")
    assert str(tiny_llama_dir) in msg and str(other_llama_dir) in msg and "--allow_other_base" in msg
    # deliberately: runs on the other model
    code, out, _ = run_main(["--model", other_llama_dir, "--prefix", path, "--allow_other_base", "--greedy",
                             "--max_new_tokens", 5], monkeypatch, capsys, stdin=b"Lists\n")
    assert code == 0
    assert out.split("\n")[0] == greedy_reference(other_llama_dir, table, "Lists", 5)


def test_without_model_the_prefix_brings_its_own_base(other_llama_dir, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.safetensors"
    table = make_prefix(path, other_llama_dir, "alpha", 4)
    code, out, err = run_main(["--prefix", path, "--greedy", "--max_new_tokens", 6], monkeypatch, capsys,
                              stdin=b"The quick brown fox\n")
    assert code == 0, err
    expected = greedy_reference(other_llama_dir, table, "The quick brown fox", 6)
    assert out.split("\n")[0] == expected
    assert expected != greedy_reference(tiny_llama_dir, table, "The quick brown fox", 6)  # the base matters


def test_without_model_prefixes_must_agree_on_their_base(tiny_llama_dir, other_llama_dir, tmp_path, monkeypatch,
                                                         capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_prefix(a, tiny_llama_dir, "a", 1)
    make_prefix(b, other_llama_dir, "b", 2)
    msg = refused(["--prefix", a, b], monkeypatch, capsys)
    assert str(a) in msg and str(b) in msg and str(tiny_llama_dir) in msg and str(other_llama_dir) in msg
    assert "--model" in msg


def test_without_model_a_missing_saved_base_is_named(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.safetensors"
    make_prefix(path, tiny_llama_dir, "a", 1, base_model="/gone/away/model")
    msg = refused(["--prefix", path], monkeypatch, capsys)
    assert "/gone/away/model" in msg and str(path) in msg and "pass --model" in msg


def test_check_base_model_compares_paths_and_names(tiny_llama_dir, tmp_path, monkeypatch):
    rel = os.path.relpath(tiny_llama_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    meta = {"base_model": str(tiny_llama_dir)}
    assert check_base_model("p", meta, rel) is True  # a relative path to the same folder
    assert check_base_model("p", meta, str(tiny_llama_dir) + "/") is True
    for default in (None, "", "smollm2"):
        assert check_base_model("p", {"base_model": "smollm2"}, default) is True
        assert check_base_model("p", {"base_model": default}, "smollm2") is True
    assert same_base_model("rinna/japanese-gpt-neox-3.6b", "rinna/japanese-gpt-neox-3.6b")
    assert not same_base_model("rinna/japanese-gpt-neox-3.6b", "rinna/other")
    with pytest.raises(ValueError) as e:
        check_base_model("p.safetensors", meta, "rinna/other")
    assert str(tiny_llama_dir) in str(e.value) and "--model rinna/other" in str(e.value)
    assert "--allow_other_base" in str(e.value) and "\n" not in str(e.value)
    assert check_base_model("p", meta, "rinna/other", allow_other=True) is False
    with pytest.raises(ValueError, match="--resume_on_other_base"):
        check_base_model("p", meta, None, flag="--resume_on_other_base")


# ---------------------------------------------------------------- 3: absolute positions (GPT-2)

def prompt_of(tok, n: int) -> str:
    text = " ".join(["a"] * n)  # one token per word with the test tokenizer
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == n
    return text


def test_gpt2_prompt_past_n_positions_is_refused(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefixtune.prefix.base import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tok = load_tokenizer(str(tiny_gpt2_dir))
    limit = model.config.n_positions  # 256
    path = tmp_path / "g.safetensors"
    make_prefix(path, tiny_gpt2_dir, "g", 1)
    gen = Generator(model, tok)
    gen.add_prefix(path)
    sampling = Sampling(max_new_tokens=4, greedy=True)
    fits = limit - P - 4 + 1  # positions 0..P+T+N-2: the last new token is never fed back
    gen.generate([prompt_of(tok, fits)], "g", sampling)  # exactly at the limit: runs
    with pytest.raises(ValueError) as e:  # one more token: past GPT-2's position table (an IndexError before)
        gen.generate([prompt_of(tok, fits + 1)], "g", sampling)
    msg = str(e.value)
    assert f"expected at most {limit} positions (gpt2's n_positions), got {limit + 1}" in msg
    assert f"prefix {P} + prompt {fits + 1} + max_new_tokens 4" in msg
    assert f"at most {fits} tokens" in msg and "ask for at most 3 new tokens" in msg
    # the bare model (no prefix) has P more positions for the prompt
    gen.generate([prompt_of(tok, fits + P)], None, sampling)
    with pytest.raises(ValueError, match=f"prefix 0 \\+ prompt {fits + P + 1} \\+"):
        gen.generate([prompt_of(tok, fits + P + 1)], None, sampling)
    with pytest.raises(ValueError, match="ask for at most 1 new token$"):  # a long answer to a short prompt
        gen.generate([prompt_of(tok, fits + 3)], "g", sampling)


def test_gpt2_batch_past_n_positions_is_refused_before_generating(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    from prefixtune.prefix.base import load_tokenizer

    tok = load_tokenizer(str(tiny_gpt2_dir))
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n\n{"prompt": "%s"}\n' % prompt_of(tok, 300), encoding="utf-8")
    msg = refused(["--model", tiny_gpt2_dir, "--input", src, "--output", tmp_path / "out.jsonl",
                   "--max_new_tokens", 4], monkeypatch, capsys)
    assert f"{src}:3:" in msg and "got 303: prefix 0 + prompt 300 + max_new_tokens 4" in msg
    assert "at most 256 positions" in msg
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- 4 and 5: what is not a usable model

def test_files_that_are_not_models(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(os.urandom(4096))
    (tmp_path / "empty.gguf").write_bytes(b"")
    msg = refused(["--model", junk], monkeypatch, capsys)
    assert str(junk) in msg and "expected a GGUF model file" in msg
    msg = refused(["--model", tmp_path / "empty.gguf"], monkeypatch, capsys)
    assert "empty.gguf" in msg and "empty" in msg.split("empty.gguf", 1)[1]
    msg = refused(["--model", "/no/such/dir"], monkeypatch, capsys)
    assert "--model /no/such/dir: no such folder" in msg
    msg = refused(["--model", tmp_path], monkeypatch, capsys)  # a folder without config.json
    assert "no config.json" in msg


def test_random_gguf_is_one_line_in_a_subprocess(tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(os.urandom(4096))
    msg = assert_one_line_error(cli_bytes("--model", junk))
    assert str(junk) in msg


def test_bert_is_not_a_causal_lm(sp_tokenizer_dir, tmp_path, monkeypatch, capsys):
    from transformers import BertConfig

    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64)
    bert = save_from_config(cfg, sp_tokenizer_dir, tmp_path / "bert")
    msg = refused(["--model", bert], monkeypatch, capsys, stdin=b"Lists\n")
    assert "bert" in msg and "not a causal language model" in msg


def test_check_base_supported_configs(tiny_gpt2_dir):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    for arch in ("gpt2", "gpt_neox", "llama"):
        check_base_supported(tiny_config(arch))
    check_base_supported(load_config(None))  # the embedded SmolLM2 (Llama, no sliding window)
    small = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                 intermediate_size=64, vocab_size=128)
    check_base_supported(MistralConfig(**small, sliding_window=None))  # Mistral v0.2+: no window
    check_base_supported(Qwen2Config(**small, sliding_window=4, use_sliding_window=False))  # set but unused
    with pytest.raises(ValueError) as e:
        check_base_supported(MistralConfig(**small, sliding_window=4))
    assert "mistral" in str(e.value) and "sliding_window=4" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_base_supported(Qwen2Config(**small, sliding_window=4, use_sliding_window=True, max_window_layers=0))
    assert "qwen2" in str(e.value) and "sliding_attention" in str(e.value) and "layer_types" in str(e.value)
    for cls, name in ((Gemma2Config, "gemma2"), (Gemma3TextConfig, "gemma3")):
        with pytest.raises(ValueError) as e:
            check_base_supported(cls(**small, head_dim=8, sliding_window=4))
        assert name in str(e.value) and "layer_types" in str(e.value) and "sliding_attention" in str(e.value)


def test_sliding_window_model_is_refused_by_the_cli(sp_tokenizer_dir, tmp_path):
    from transformers import MistralConfig

    cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                        intermediate_size=64, vocab_size=128, sliding_window=4, max_position_embeddings=256)
    mistral = save_from_config(cfg, sp_tokenizer_dir, tmp_path / "mistral")
    msg = assert_one_line_error(cli_bytes("--model", mistral, stdin=b"Lists\n"))
    assert "mistral" in msg and "sliding_window=4" in msg


# ---------------------------------------------------------------- 6: the REPL on bad stdin

def test_repl_skips_too_long_and_undecodable_lines(tiny_llama_dir, tmp_path):
    path = tmp_path / "p.safetensors"
    table = make_prefix(path, tiny_llama_dir, "alpha", 5)
    stdin = b"dog " * 25000 + b"\n" + b"caf\xe9 \xff\xfe\n" + b"Lists\n"  # 100k characters, Latin-1, then a prompt
    proc = cli_bytes("--model", tiny_llama_dir, "--prefix", path, "--greedy", "--max_new_tokens", 5, stdin=stdin,
                     timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "line 1 skipped: expected at most 256 positions (llama's max_position_embeddings)" in err
    assert "prefix 5 + prompt 50000 + max_new_tokens 5" in err and "at most 247 tokens" in err
    assert "line 2 is not valid UTF-8, skipped" in err
    assert proc.stdout.decode().split("\n")[0] == greedy_reference(tiny_llama_dir, table, "Lists", 5)


# ---------------------------------------------------------------- 8: what train.demo loads

def test_demo_loading_errors_are_one_line(tiny_llama_dir, tiny_neox_dir, tmp_path):
    from transformers import AutoConfig

    from prefixtune.prefix.io import check_compatible

    with pytest.raises(FileNotFoundError) as e:
        load_prefix(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value) and "\n" not in str(e.value)
    good = tmp_path / "good.safetensors"
    make_prefix(good, tiny_llama_dir, "a", 1)
    cut = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        load_prefix(cut)
    assert str(cut) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)
    _, shape, meta = load_prefix(good)
    with pytest.raises(ValueError) as e:
        check_compatible(good, shape, meta, AutoConfig.from_pretrained(tiny_neox_dir))
    assert str(good) in str(e.value) and "num_kv_heads" in str(e.value) and "\n" not in str(e.value)
