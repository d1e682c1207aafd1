"""Issue 15, section 3 (trainer, files, loading) and issue 18's converted-folder layout: a model without its weights
is refused everywhere, files honour the umask, a full disk at start and kill -9 mid-save leave nothing behind,
--help answers at once with each default once, one GGUF conversion serves every dtype and other loaders, and the
wording of several errors."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run, train
from test_inference_faults import last_line_is_the_error, prompt_of, run_main

from prefixtune.prefix import gguf_cache, prefix_shape
from prefixtune.prefix.base import load_base, load_config, load_tokenizer
from prefixtune.prefix.io import load_prefix, save_prefix
from prefixtune.prefix.resolve import default_model_file, resolve_model

TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--dev_data_size", 6, "--batch_size", 2, "--max_steps", 1, "--precision", "fp32"]


# ------------------------------------------------------------------------------------------------ helpers

def _gguf_kv_end(data: bytes) -> int:
    """Where the metadata of a GGUF (v2/v3) file ends: its header and key/value pairs, before the tensor infos."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types
    at = 24

    def string(at):
        return at + 8 + int.from_bytes(data[at:at + 8], "little")

    def value(kind, at):
        if kind == 8:
            return string(at)
        if kind == 9:
            sub, n = struct.unpack_from("<IQ", data, at)
            at += 12
            if sub in sizes:
                return at + n * sizes[sub]
            for _ in range(n):
                at = value(sub, at)
            return at
        return at + sizes[kind]

    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        at = string(at)
        kind = struct.unpack_from("<I", data, at)[0]
        at = value(kind, at + 4)
    return at


def vocab_only_gguf(path: Path) -> Path:
    """What llama.cpp's vocab-only files are: the embedded SmolLM2's metadata and tokenizer, no tensor."""
    data = default_model_file().read_bytes()
    head = bytearray(data[:_gguf_kv_end(data)])
    head[8:16] = struct.pack("<Q", 0)
    path.write_bytes(bytes(head) + b"\0" * (-len(head) % 32))
    return path


def without_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of a Hugging Face folder whose model.safetensors lacks the tensor `name`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors[name]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def tiny_prefix(path: Path, model_dir: Path, task: str = "t", arch: str = "llama") -> Path:
    from transformers import AutoConfig

    shape = prefix_shape(AutoConfig.from_pretrained(model_dir), 4)
    save_prefix(path, torch.randn(4, shape.width), shape, task=task, base_model=str(model_dir), architecture=arch,
                train_args={"save_name": path.stem})
    return path


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------- 1: a model without its weights

def test_a_vocab_only_gguf_is_refused_in_every_entry_point(tmp_path, monkeypatch, capsys, text_jsonl):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    gguf = vocab_only_gguf(tmp_path / "vocab.gguf")
    for load in (load_config, load_tokenizer, lambda m: load_base(m, "bf16"), lambda m: load_base(m, quantize="int8"),
                 lambda m: load_base(m, device_map="sequential")):
        with pytest.raises(ValueError, match="no tensors") as refused:
            load(str(gguf))
        assert str(gguf) in str(refused.value) and "\n" not in str(refused.value)
    code, _, err = run_main(["--model", gguf], monkeypatch, capsys)  # prefix_inference
    assert code == 1 and "no tensors" in last_line_is_the_error(err)

    from prefixtune.serve.__main__ import build, build_parser

    with pytest.raises(ValueError, match="no tensors"):
        build(build_parser().parse_args(["--model", str(gguf)]))
    proc = train("--model", gguf, "--data", text_jsonl, *TINY, "--save_dir", tmp_path / "out", check=False)
    assert "no tensors" in one_line_error(proc) and str(gguf) in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir()
                                                     and p.name.startswith("vocab")]  # nothing converted


def test_a_folder_missing_a_weight_is_refused_on_every_route(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    broken = without_tensor(tiny_llama_dir, tmp_path / "broken", "model.layers.1.mlp.up_proj.weight")
    for kw in ({}, {"dtype": "bf16"}, {"device_map": "sequential"}, {"quantize": "int8"}):
        with pytest.raises(ValueError, match="lacks 1 of the model's") as refused:
            load_base(str(broken), **kw)
        text = str(refused.value)
        assert str(broken) in text and "model.layers.1.mlp.up_proj.weight" in text and "\n" not in text, kw
    proc = run([sys.executable, "-m", "prefixtune.inference", "--model", str(broken)], check=False, input="")
    err = one_line_error(proc)
    assert "model.layers.1.mlp.up_proj.weight" in err
    assert "LOAD REPORT" not in proc.stderr  # transformers' multi-line table is held back when the model is refused
    load_base(str(tiny_llama_dir))  # a complete folder loads as before


# ------------------------------------------------------------------------------------- 2: the umask

def test_every_file_the_project_writes_honours_the_umask(tiny_neox_dir, tmp_path, umask_022):
    from prefixtune.convert.ft_export import export
    from prefixtune.convert.interchange import to_peft
    from prefixtune.prefix.tasks import rename_task as retask
    from prefixtune.prefix.io import atomic_write_text
    from prefixtune.train.state import write_state

    prefix = tiny_prefix(tmp_path / "p.safetensors", tiny_neox_dir, arch="gpt_neox")
    assert mode(prefix) == 0o644
    atomic_write_text(tmp_path / "x.json", "{}")
    assert mode(tmp_path / "x.json") == 0o644
    retask(prefix, "other", out=tmp_path / "q.safetensors")
    assert mode(tmp_path / "q.safetensors") == 0o644

    state = tmp_path / "p.state"
    write_state(state, {"w": torch.ones(3)}, torch.zeros(2), {"exp_avg/w": torch.ones(3)}, {"cpu.0": torch.ones(2)},
                {"step": 1})
    assert {f.name: mode(f) for f in state.iterdir()} == {
        n: 0o644 for n in ("encoder.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")}

    adapter = to_peft(prefix, tmp_path / "adapter")  # a new folder
    assert mode(adapter) == 0o755 and all(mode(f) == 0o644 for f in adapter.iterdir())
    to_peft(prefix, adapter, overwrite=True)  # files replaced in an existing folder
    assert all(mode(f) == 0o644 for f in adapter.iterdir())

    target = export(tiny_neox_dir, [prefix], tmp_path / "ft", dtype="fp32", progress=False)
    files = [f for f in target.iterdir() if f.is_file()]
    assert {f.name for f in files} >= {"config.ini", "tasks.json"}
    assert {f.name: mode(f) for f in files} == {f.name: 0o644 for f in files}

    os.umask(0o027)  # another umask: another mode
    save_prefix(tmp_path / "r.safetensors", *load_prefix(prefix)[:2], task="r", base_model="m", architecture="x")
    assert mode(tmp_path / "r.safetensors") == 0o640


# ---------------------------------------------------------------------------- 3: a disk full at start

@pytest.mark.parametrize("where", ["lock_write", "mkdir"])
def test_a_disk_full_at_start_is_one_line_and_leaves_nothing(where, tmp_path, monkeypatch):
    from prefixtune.prefix.errors import UserError
    from prefixtune.train import outputs
    from prefixtune.train.outputs import Outputs, RunLock

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "lock_write":
        monkeypatch.setattr(outputs.os, "write", full)
    else:
        monkeypatch.setattr(Path, "mkdir", full)
    run_dir = tmp_path / "runs" / "a"
    with pytest.raises(UserError) as stop:
        RunLock(Outputs(run_dir, "p")).acquire()
    assert str(stop.value).startswith(f"no space left in {run_dir} to start the run")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # no lock file, no folder made for the run


def test_the_trainer_on_a_full_disk_at_start(tiny_llama_dir, text_jsonl, tmp_path):
    """The whole command: os.write fails with ENOSPC (a disk already full): one line, no traceback, nothing left."""
    script = ("import errno, os, sys\n"
              "real = os.write\n"
              "def write(fd, data):\n"
              "    if os.readlink(f'/proc/self/fd/{fd}').endswith('.lock'):\n"
              "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "    return real(fd, data)\n"
              "os.write = write\n"
              "from prefixtune.train.loop import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = run([sys.executable, "-c", script, "--model", str(tiny_llama_dir), "--data", str(text_jsonl),
                *map(str, TINY), "--save_dir", str(tmp_path / "out")], check=False)
    assert one_line_error(proc).startswith(f"error: no space left in {tmp_path / 'out'} to start the run")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ 4: kill -9 while the prefix is written

def test_a_process_killed_while_writing_the_prefix_leaves_only_names_the_cleanup_knows(tmp_path):
    """SIGXFSZ (the file size limit) kills the writer in the middle of the file, as kill -9 would: whatever it
    leaves, remove_leftovers (run by every start, --overwrite included) removes, and the prefix is never half."""
    from prefixtune.train.outputs import Outputs

    script = ("import resource, signal, sys, torch\n"
              "from prefixtune.prefix.io import save_prefix\n"
              "from prefixtune.prefix.shapes import PrefixShape\n"
              "shape = PrefixShape(num_layers=4, num_kv_heads=4, head_dim=64, prefix_len=64)\n"
              "table = torch.randn(64, shape.width)\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: restore the kill\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "save_prefix(sys.argv[1], table, shape, task='p', base_model='m', architecture='llama',\n"
              "            train_args={'save_name': 'p'})\n")
    proc = run([sys.executable, "-c", script, str(tmp_path / "p.safetensors")], check=False,
               env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
    assert os.listdir(tmp_path), "the killed writer left nothing: the test did not kill it mid-write"
    Outputs(tmp_path, "p").remove_leftovers()
    assert os.listdir(tmp_path) == []


def test_cleanup_removes_safetensors_own_temporary_of_this_save_name_only(tmp_path):
    """`.tmpXXXXXX` is where safetensors' save_file wrote before renaming (what older runs killed mid-save left)."""
    from prefixtune.train.outputs import Outputs

    from prefixtune.prefix.shapes import PrefixShape

    shape = PrefixShape(num_layers=2, num_kv_heads=2, head_dim=8, prefix_len=1)
    for name, save_name in ((".tmpAb3dE9", "p"), (".tmpZz1yX2", "other")):
        tiny = tmp_path / "src.safetensors"
        save_prefix(tiny, torch.zeros(1, shape.width), shape, task=save_name, base_model="m", architecture="llama",
                    train_args={"save_name": save_name})
        data = tiny.read_bytes()
        (tmp_path / name).write_bytes(data[:-100])  # cut off in the table, as a kill leaves it
        tiny.unlink()
    (tmp_path / ".tmpNotOur").write_bytes(b"something else")
    Outputs(tmp_path, "p").remove_leftovers()
    assert sorted(os.listdir(tmp_path)) == [".tmpNotOur", ".tmpZz1yX2"]


# ---------------------------------------------------------------------------------------------- 5: --help

HELP_COMMANDS = {
    "train": ["-m", "train"],
    "prefix_inference": ["-m", "prefixtune.inference"],
    "prefix_serve": ["-m", "prefixtune.serve"],
}


@pytest.mark.parametrize("name", sorted(HELP_COMMANDS))
def test_help_answers_at_once_without_torch_and_shows_each_default_once(name):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", *HELP_COMMANDS[name], "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "transformers", "safetensors"))
    assert not heavy, heavy[:10]
    assert "DeepSpeed" not in proc.stderr.replace("import time:", "") and "accelerator" not in proc.stdout
    assert elapsed < 2, f"{name} --help took {elapsed:.1f} s"
    options = re.split(r"\n  (?=-)", proc.stdout.split("options:", 1)[1])
    twice = [o.split()[0] for o in options if o.lower().count("default") > 1]
    assert not twice, twice


def test_console_scripts_answer_help_without_torch():
    bindir = Path(sys.executable).parent
    for script in ("prefix_inference", "prefix_serve"):
        path = bindir / script
        if not path.exists():
            pytest.skip(f"{script} is not installed beside {sys.executable}")
        proc = subprocess.run([sys.executable, "-X", "importtime", str(path), "--help"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout
        assert " torch\n" not in proc.stderr and "| torch" not in proc.stderr


def test_the_device_default_is_resolved_after_parsing():
    from prefixtune.inference.cli import build_parser

    assert build_parser().parse_args([]).device is None  # decided in main(), where torch is loaded


# ------------------------------------------------------------------------- 6: one conversion for every dtype

def test_one_converted_folder_serves_every_dtype_and_other_loaders(tmp_path, monkeypatch, umask_022):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    where, kwargs = resolve_model(None)
    bf16, tok, _ = load_base(None, "bf16")  # converts (training's precision)
    folder = gguf_cache.cached_folder(where, kwargs)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == [folder.name]
    assert mode(folder) == 0o755 and all(mode(f) == 0o644 for f in folder.iterdir())

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_cache, "convert", no_second_conversion)
    fp32, _, _ = load_base(None, "fp32")  # serving's precision: from the same folder
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == [folder.name]

    ref = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()  # the GGUF route
    ids = torch.tensor([tok("The quick brown fox jumps").input_ids])
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(fp32(ids).logits, want)
        for (n, p), (_, q) in zip(bf16.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q.to(torch.bfloat16)), n  # what the GGUF route loads in bf16: its fp32, cast

    # laid out as save_pretrained writes it: the tied weight under the input embeddings' name, no lm_head
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
        assert torch.equal(f.get_tensor("model.embed_tokens.weight").float(), ref.model.embed_tokens.weight)
        stored = {k: f.get_tensor(k) for k in keys}
    # a loader that, as vLLM's, skips lm_head.weight for a tied model and reads every other tensor by name
    config = AutoConfig.from_pretrained(folder)
    assert config.tie_word_embeddings
    other = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    missing, _ = other.load_state_dict({k: v.float() for k, v in stored.items() if k != "lm_head.weight"},
                                       strict=False)
    assert set(missing) <= {"lm_head.weight"}
    other.tie_weights()
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)  # (fp32 above: transformers' from_pretrained of the folder)


# ----------------------------------------------------------------------------------- 7: the openai client

def test_the_readme_serve_examples_client_is_installed_with_the_project():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "openai" in {re.split(r"[<>=\[; ]", d, maxsplit=1)[0].strip() for d in deps}
    assert "from openai import OpenAI" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------------- 8: wording

def test_a_header_field_that_is_not_a_number(tmp_path):
    from safetensors.torch import save_file

    from prefixtune.prefix.shapes import PrefixShape

    shape = PrefixShape(num_layers=2, num_kv_heads=2, head_dim=8, prefix_len=2)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.zeros(2, shape.width), shape, task="t", base_model="m", architecture="llama")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, table = f.metadata(), f.get_tensor("prefix")
    save_file({"prefix": table}, str(path), metadata={**meta, "num_layers": "x"})
    with pytest.raises(ValueError) as refused:
        load_prefix(path)
    assert "header field num_layers is 'x', expected a whole number" in str(refused.value)
    assert "invalid literal" not in str(refused.value)
    del meta["head_dim"]
    save_file({"prefix": table}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="header lacks the field 'head_dim'"):
        load_prefix(path)


def test_add_to_an_export_names_the_fix_once(tiny_neox_dir):
    from prefixtune.convert.export_dir import prefix_problems
    from prefixtune.convert.ft_layout import FTDims
    from prefixtune.prefix.shapes import PrefixShape

    dims = FTDims(layers=2, heads=4, head_dim=8, inter=64, vocab=128, rotary_dim=4, parallel_residual=True)
    for shape, meta in ((PrefixShape(3, 4, 8, 2), {"base_model": "x", "architecture": "gpt_neox"}),
                        (PrefixShape(2, 4, 8, 2), {"base_model": "/elsewhere", "architecture": "gpt_neox"})):
        problems = prefix_problems("p.safetensors", shape, meta, dims, base=str(tiny_neox_dir),
                                   base_label="the export's source model")
        assert problems and not any("the the" in p for p in problems), problems
        assert "export the model it was trained on" in problems[0]


def test_sizes_below_a_mebibyte_are_not_zero_mib(tmp_path):
    from prefixtune.train.estimate import fmt
    from prefixtune.train.outputs import no_space_message

    assert (fmt(120), fmt(5 * 2**10), fmt(3 * 2**20), fmt(2 * 2**30)) == ("120 bytes", "5.0 KiB", "3.0 MiB",
                                                                           "2.00 GiB")
    msg = no_space_message(OSError(errno.ENOSPC, "No space left on device"), "metrics", tmp_path, 120)
    assert "needs about 120 bytes" in msg and "0.0 MiB" not in msg


def test_data_errors_say_what_the_file_is(tmp_path):
    from prefixtune.data import DataError, read_jsonl

    with pytest.raises(DataError, match="is a folder, expected a JSONL data file"):
        read_jsonl(tmp_path)
    for codec, name in (("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE")):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes('{"text": "hello"}\n{"text": "again"}\n'.encode(codec))
        with pytest.raises(DataError, match=f"looks like {name} text without a byte-order mark") as refused:
            read_jsonl(path)
        assert f"iconv -f {name} -t UTF-8" in str(refused.value)
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "héllo 😃"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"text": "héllo 😃"}]


def test_batch_mode_names_the_models_positions(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    tok = load_tokenizer(str(tiny_llama_dir))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": prompt_of(tok, 3000)}) + "\n", encoding="utf-8")
    code, _, err = run_main(["--model", tiny_llama_dir, "--input", src, "--max_new_tokens", 4], monkeypatch, capsys)
    msg = last_line_is_the_error(err)
    assert code == 1 and f"{src}:1:" in msg
    assert "expected at most 256 positions (llama's max_position_embeddings)" in msg and "cache" not in msg


def test_from_rinna_never_advises_unpickling(tmp_path):
    from prefixtune.convert.interchange import from_rinna

    torch.save({"model": Path("an object, not a tensor")}, tmp_path / "obj.checkpoint")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint") as refused:
        from_rinna(tmp_path / "obj.checkpoint", "unused", tmp_path / "o.safetensors", "o")
    assert "weights_only=False" not in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="is a folder, expected rinna's .checkpoint file"):
        from_rinna(tmp_path, "unused", tmp_path / "o.safetensors", "o")
