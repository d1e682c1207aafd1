"""Faults of the converter: stale Triton task ids, '%' in paths, bad --tp, unsafe outputs, prefixes from another
model, reserved or unsafe task names, and export targets that cannot or must not be written.

Every refusal is checked for: a one-line `error: ...` naming the input and the fix, exit code 1, and no output
changed (a sha256 snapshot of the folder before and after)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run
from test_convert import make_neox, make_prefix, snapshot

from prefixtune.convert.export_dir import Export, ExportError, read_export, same_base
from prefixtune.convert.ft_export import add_tasks, export, list_tasks, remove_tasks
from prefixtune.convert.ft_layout import FTDims
from prefixtune.convert.ft_verify import check_files, verify
from prefixtune.prefix import PrefixShape
from prefixtune.prefix.io import load_prefix

PY = [sys.executable, "-m", "prefixtune.convert"]


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`python -m prefixtune.convert ARGS` in this process (the same main(); a subprocess costs seconds of imports);
    an exception escaping main() fails the test, as a traceback would."""
    from prefixtune.convert.__main__ import main

    def call(*args, check: bool = True) -> Result:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        out, err = capsys.readouterr()
        res = Result(rc, out, err)
        if check:
            assert rc == 0, (rc, out, err)
        return res

    return call


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """(model folder, its config, [alpha, beta] prefixes trained on it)."""
    from transformers import AutoConfig

    d = tmp_path_factory.mktemp("faults")
    model = make_neox(d / "model", True, 0.5)
    cfg = AutoConfig.from_pretrained(model)
    return model, cfg, [make_prefix(d / "alpha.safetensors", cfg, 3, "alpha", 1, model),
                        make_prefix(d / "beta.safetensors", cfg, 4, "beta", 2, model)]


def with_task(path: Path, task: str) -> Path:
    """Set a prefix file's header field task directly (save_prefix may itself refuse the names tested here)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "task": task})
    return path


def refused(proc, *needles: str) -> str:
    """A CLI refusal: exit 1, no traceback, one line `error: ...` on stderr containing every needle."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# 1. a removed task is refused by the client side, and `convert triton` brings tasks.json back in step

def test_task_id_refuses_removed_or_moved_tasks(neox, tmp_path, cli):
    from prefixtune.convert.triton import TaskError, task_id, write_repository

    model, cfg, (alpha, beta) = neox
    target = export(model, [alpha, beta], tmp_path / "out", 1, "fp32", progress=False)
    repo = write_repository(target, tmp_path / "repo")
    tasks_json = repo / "tasks.json"
    assert json.loads(tasks_json.read_text()) == {"alpha": 0, "beta": 1}
    assert task_id(tasks_json, "alpha") == 0 and task_id(tasks_json, "beta") == 1

    remove_tasks(target, ["beta"])
    assert json.loads(tasks_json.read_text()) == {"alpha": 0, "beta": 1}  # the repository's copy is stale
    with pytest.raises(TaskError, match="removed") as e:
        task_id(tasks_json, "beta")
    msg = str(e.value)
    assert "python -m prefixtune.convert triton" in msg and str(target) in msg and "base model" in msg
    assert task_id(tasks_json, "alpha") == 0  # the other task still works

    # the client example refuses it too, before it needs tritonclient or a server
    proc = run([sys.executable, str(ROOT / "examples" / "triton_client.py"), "--tasks", str(tasks_json), "--task",
                "beta", "--model_dir", str(model), "--prompt", "x"], check=False)
    refused(proc, "'beta' was removed", "python -m prefixtune.convert triton")

    # re-adding it gives it a new slot (id 2): the copy's id 1 would now pick the empty slot
    add_tasks(target, [beta])
    assert dict((n, i) for i, n, _ in list_tasks(target)) == {"alpha": 0, "beta": 2}
    with pytest.raises(TaskError, match="has id 2 .* says 1"):
        task_id(tasks_json, "beta")

    # re-running `convert triton` keeps tasks.json in step with config.ini
    cli("triton", str(target), "--repo", str(tmp_path / "repo"))
    assert json.loads(tasks_json.read_text()) == {"alpha": 0, "beta": 2}
    assert task_id(tasks_json, "beta") == 2
    remove_tasks(target, ["beta"])
    cli("triton", str(target), "--repo", str(tmp_path / "repo"))
    assert json.loads(tasks_json.read_text()) == {"alpha": 0}
    with pytest.raises(TaskError, match="not served; served tasks: alpha"):
        task_id(tasks_json, "beta")
    # a task added to the export after the repository was written is not silently unknown
    add_tasks(target, [beta])
    with pytest.raises(TaskError, match="repository is out of date"):
        task_id(tasks_json, "beta")
    # an explicit export folder (a client that sees the export elsewhere) is checked the same way
    shutil.copytree(target, tmp_path / "copy")
    with pytest.raises(TaskError, match="repository is out of date"):
        task_id(tasks_json, "beta", export_dir=tmp_path / "copy")


# 2. '%' in a model folder name

def test_percent_in_model_path(neox, tmp_path, cli):
    from prefixtune.convert.triton import task_id, write_repository

    src, cfg, _ = neox
    model = tmp_path / "model%20x%(oops)s"
    shutil.copytree(src, model)
    alpha = make_prefix(tmp_path / "alpha.safetensors", cfg, 3, "alpha", 1, model)
    beta = make_prefix(tmp_path / "beta.safetensors", cfg, 4, "beta", 2, model)
    target = export(model, [alpha], tmp_path / "out%2F", 1, "fp32", progress=False)
    ini = (target / "config.ini").read_text()
    assert "model_name = model%20x%(oops)s\n" in ini and f"source_model = {model.resolve()}\n" in ini
    ex = read_export(target)
    assert ex.model_name == "model%20x%(oops)s" and ex.source_model == str(model.resolve())
    assert add_tasks(target, [beta]) == [(1, "beta")]  # base_model checked against source_model with its '%'
    assert list_tasks(target) == [(0, "alpha", 3), (1, "beta", 4)]
    lines = []
    assert verify(target, model, [alpha, beta], out=lines.append), "\n".join(lines)
    remove_tasks(target, ["alpha"])
    assert list_tasks(target) == [(1, "beta", 4)]
    repo = write_repository(target, tmp_path / "repo%x")
    assert task_id(repo / "tasks.json", "beta") == 1
    assert cli("tasks", str(target)).stdout == "1\tbeta\t4\n"


# 3. --tp below 1: one line, exit 1, no folder

@pytest.mark.parametrize("tp", ["0", "-2"])
def test_cli_refuses_tp_below_one(neox, tmp_path, tp):
    model, _, prefixes = neox
    out = tmp_path / "out"
    proc = run(PY + ["ft", "--model", str(model), "--prefix", *map(str, prefixes), "--out", str(out), "--tp", tp],
               check=False)
    refused(proc, f"--tp {tp}", ">= 1", "pass --tp 1")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# 4. from-rinna: empty tables, and --out needs --overwrite (from-rinna, from-peft, peft)

def test_from_rinna_refuses_empty_table(neox, tmp_path, cli):
    model, cfg, _ = neox
    from prefixtune.prefix import prefix_shape

    width = prefix_shape(cfg, 1).width
    torch.save(torch.zeros(0, width), tmp_path / "empty.weight")
    out = tmp_path / "e.safetensors"
    proc = cli("from-rinna", str(tmp_path / "empty.weight"), "--model", str(model), "--task", "e", "--out",
                     str(out), check=False)
    refused(proc, "empty.weight", "P >= 1", "(0, ")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.weight"]  # no temporary file left either


def test_import_outputs_need_overwrite(neox, tmp_path, cli):
    from prefixtune.convert.interchange import from_peft, to_peft

    model, cfg, (alpha, beta) = neox
    from prefixtune.prefix import prefix_shape

    shape = prefix_shape(cfg, 5)
    table = torch.randn(5, shape.width)
    torch.save(table, tmp_path / "r.weight")
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"precious")
    # from-rinna
    proc = cli("from-rinna", str(tmp_path / "r.weight"), "--model", str(model), "--task", "s", "--out",
                     str(out), check=False)
    refused(proc, f"--out {out} exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    cli("from-rinna", str(tmp_path / "r.weight"), "--model", str(model), "--task", "s", "--out", str(out),
              "--overwrite")
    got, _, meta = load_prefix(out)
    assert torch.equal(got, table) and meta["task"] == "s"
    # peft: a folder that holds an adapter
    adapter = tmp_path / "adapter"
    to_peft(alpha, adapter)
    before = snapshot(adapter)
    proc = cli("peft", "--prefix", str(beta), "--out", str(adapter), check=False)
    refused(proc, f"--out {adapter} exists", "--overwrite")
    assert snapshot(adapter) == before
    to_peft(beta, adapter, overwrite=True)
    assert snapshot(adapter) != before
    assert json.loads((adapter / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    # from-peft
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        from_peft(adapter, str(model), kept, task="b")
    assert kept.read_bytes() == b"keep me"
    from_peft(adapter, str(model), kept, task="b", overwrite=True)
    assert torch.equal(load_prefix(kept)[0], load_prefix(beta)[0])


# 5. a prefix from another architecture or base model

def test_llama_prefix_with_matching_shapes_refused_even_with_force(neox, tmp_path, cli):
    model, cfg, (alpha, _) = neox
    llama = make_prefix(tmp_path / "llama.safetensors", cfg, 3, "llama_task", 0, "meta-llama/Llama-3.2-1B",
                        architecture="llama")
    out = tmp_path / "out"
    target = export(model, [alpha], out, 1, "fp32", progress=False)
    before = snapshot(out)
    proc = cli("ft", "--model", str(model), "--prefix", str(llama), "--out", str(out), "--force",
                     "--allow_other_base", check=False)
    refused(proc, str(llama), "header field architecture is 'llama'", "expected 'gpt_neox'")
    assert snapshot(out) == before
    with pytest.raises(ExportError, match="architecture is 'llama'"):
        add_tasks(target, [llama], allow_other_base=True)
    assert snapshot(out) == before
    lines = []
    assert not verify(target, model, [alpha, llama], out=lines.append)
    assert any(line.startswith("FAIL") and "architecture is 'llama'" in line for line in lines), lines


def test_prefix_of_another_base_model_needs_allow_other_base(neox, tmp_path, cli):
    model, cfg, (alpha, _) = neox
    other = tmp_path / "other" / "model-b"
    shutil.copytree(model, other)  # same shapes, another model as far as the header knows
    stray = make_prefix(tmp_path / "stray.safetensors", cfg, 3, "stray", 0, other)
    out = tmp_path / "out"
    proc = cli("ft", "--model", str(model), "--prefix", str(stray), "--out", str(out), check=False)
    refused(proc, str(stray), "header field base_model", str(other), f"expected --model '{model}'",
            "--allow_other_base")
    assert not out.exists()
    target = export(model, [alpha], out, 1, "fp32", progress=False)
    with pytest.raises(ExportError, match="base_model .* expected the export's source model"):
        add_tasks(target, [stray])
    add_tasks(target, [stray], allow_other_base=True)
    lines = []
    assert not verify(target, model, [alpha, stray], out=lines.append)
    assert any("header field base_model" in line for line in lines), lines
    lines = []
    assert verify(target, model, [alpha, stray], out=lines.append, allow_other_base=True), "\n".join(lines)


def test_same_base_rules(tmp_path):
    a, b = tmp_path / "x" / "gpt-neox-small", tmp_path / "y" / "gpt-neox-small"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert same_base(str(a), str(a / ".." / "gpt-neox-small"))  # resolved paths
    assert not same_base(str(a), str(b))  # two existing folders: the paths decide, not the names
    assert same_base("org/gpt-neox-small", str(a))  # hub id against a folder: the names
    assert same_base("/gone/elsewhere/gpt-neox-small", str(b))  # a path from another machine: the names
    assert same_base("rinna/japanese-gpt-neox-3.6b",
                     "/hf/hub/models--rinna--japanese-gpt-neox-3.6b/snapshots/0123abc")  # cache snapshot
    assert not same_base("meta-llama/Llama-3.2-1B", str(a))


# 6. reserved and unsafe task names; the rename that exists

@pytest.mark.parametrize("task", ["base", "BASE", "../x", "a/b", "", "_removed_1", "has space"])
def test_reserved_and_unsafe_task_names_refused(neox, tmp_path, task):
    model, cfg, (alpha, _) = neox
    bad = with_task(make_prefix(tmp_path / "bad.safetensors", cfg, 3, "ok", 0, model), task)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        export(model, [bad], out, 1, "fp32", progress=False)
    msg = str(e.value)
    assert f"task name {task!r}" in msg and str(bad) in msg
    assert "prefixtune.convert retask" in msg and "convert rename" not in msg
    if task.lower() == "base":
        assert "reserved" in msg and "no prefix" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_retask_renames_the_header_task(neox, tmp_path, cli):
    from safetensors import safe_open

    model, cfg, _ = neox
    bad = with_task(make_prefix(tmp_path / "base.safetensors", cfg, 3, "ok", 0, model), "base")
    with safe_open(str(bad), framework="pt") as f:
        meta_before, t_before = f.metadata(), f.get_tensor("prefix")
    renamed = tmp_path / "smile.safetensors"
    cli("retask", "--prefix", str(bad), "--task", "smile", "--out", str(renamed))
    with safe_open(str(renamed), framework="pt") as f:
        meta_after, t_after = f.metadata(), f.get_tensor("prefix")
    assert meta_after == {**meta_before, "task": "smile"} and torch.equal(t_after, t_before)
    target = export(model, [renamed], tmp_path / "out", 1, "fp32", progress=False)
    assert list_tasks(target) == [(0, "smile", 3)]
    # refusals: a reserved or unsafe name, an existing --out without --overwrite
    before = renamed.read_bytes()
    for task, needle in [("base", "reserved"), ("../x", "expected 1-64 letters")]:
        refused(cli("retask", "--prefix", str(renamed), "--task", task, check=False), needle, "--task")
    refused(cli("retask", "--prefix", str(bad), "--task", "other", "--out", str(renamed), check=False),
            "exists: pass --overwrite")
    assert renamed.read_bytes() == before
    cli("retask", "--prefix", str(renamed), "--task", "smile2")  # in place
    assert load_prefix(renamed)[2]["task"] == "smile2"


# 7. one description of the dimensions, one object for an export, no import circle

def test_ftdims_and_export_object(neox, tmp_path):
    model, cfg, (alpha, beta) = neox
    d = FTDims.from_config(cfg)
    assert d == FTDims(layers=2, heads=4, head_dim=8, inter=64, vocab=cfg.vocab_size, rotary_dim=4,
                       parallel_residual=True)
    assert d.hidden == 32 and d.prefix_mismatches(PrefixShape(2, 4, 8, 7)) == []
    bad = d.prefix_mismatches(PrefixShape(num_layers=3, num_kv_heads=2, head_dim=16, prefix_len=5))
    assert bad == ["num_layers: prefix has 3, model has 2", "num_kv_heads: prefix has 2, model has 4",
                   "head_dim: prefix has 16, model has 8"]
    target = export(model, [alpha, beta], tmp_path / "out", 2, "fp16", progress=False)
    remove_tasks(target, ["alpha"])
    ex = read_export(target)
    assert isinstance(ex, Export) and ex.path == target and ex.dims == d
    assert (ex.tp, ex.dtype, ex.start_id, ex.end_id, ex.model_name) == (2, "fp16", 1, 2, "model")
    assert ex.tasks == (("_removed_0", 0), ("beta", 4)) and ex.live == {"beta": 1}
    assert ex.prompt_lengths == {"beta": 4} and ex.source_model == str(model.resolve())
    assert check_files(ex) == check_files(target) == []


def test_ft_export_and_ft_verify_do_not_import_each_other():
    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, also those inside functions
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
                names.update(f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    conv = ROOT / "convert"
    assert not any("ft_verify" in n for n in imported(conv / "ft_export.py"))
    assert not any("ft_export" in n for n in imported(conv / "ft_verify.py"))
    for mod in ("ft_export.py", "ft_verify.py"):
        assert ".export_dir" in imported(conv / mod)


# 8. export targets that must not or cannot be written

def test_existing_export_without_force_is_kept(neox, tmp_path, cli):
    model, _, prefixes = neox
    out = tmp_path / "out"
    export(model, prefixes, out, 1, "fp32", progress=False)
    before = snapshot(out)
    proc = cli("ft", "--model", str(model), "--prefix", str(prefixes[0]), "--out", str(out), "--dtype",
                     "fp32", check=False)
    refused(proc, f"{out / '1-gpu'} exists", "pass --force")
    assert snapshot(out) == before


def test_parent_of_out_is_a_file(neox, tmp_path, cli):
    model, _, prefixes = neox
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"a file")
    out = blocker / "out"
    proc = cli("ft", "--model", str(model), "--prefix", *map(str, prefixes), "--out", str(out), check=False)
    refused(proc, f"--out {out}", f"{blocker} is a file", "pass an --out")
    assert blocker.read_bytes() == b"a file" and sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_read_only_out(neox, tmp_path, cli):
    """A folder the exporter may not write: chmod 555 for a normal user. Root writes through any mode, so as root
    the same refusal is provoked by a file standing where a folder of --out must be created."""
    model, _, prefixes = neox
    out = tmp_path / "out"
    export(model, prefixes, out, 1, "fp32", progress=False)
    if os.geteuid() == 0:
        blocker = out / "sub"
        blocker.write_bytes(b"in the way")
        dest, needle = blocker / "deeper", f"{blocker} is a file"
    else:
        os.chmod(out, 0o555)
        dest, needle = out, f"{out} is not writable"
    before = snapshot(out)
    try:
        proc = cli("ft", "--model", str(model), "--prefix", *map(str, prefixes), "--out", str(dest), "--tp",
                         "2", "--force", check=False)
        refused(proc, f"--out {dest}", needle)
        assert snapshot(out) == before
    finally:
        os.chmod(out, 0o755)


def test_write_failure_midway_changes_nothing(neox, tmp_path, monkeypatch):
    """An OSError while writing (disk full, permissions) becomes one message; OUT stays as it was and a folder
    made for the export is removed again."""
    from prefixtune.convert import ft_export

    model, _, prefixes = neox
    out = tmp_path / "out"
    export(model, prefixes, out, 1, "fp32", progress=False)
    before = snapshot(out)

    def full(path, t, dtype):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ft_export, "_write", full)
    with pytest.raises(ExportError, match="No space left on device.*nothing was changed"):
        export(model, prefixes, out, 1, "fp32", force=True, progress=False)
    assert snapshot(out) == before
    with pytest.raises(ExportError, match="No space left"):
        export(model, prefixes, tmp_path / "new" / "out", 2, "fp32", progress=False)
    assert not (tmp_path / "new").exists()
    remove_tasks(out / "1-gpu", ["beta"])
    with pytest.raises(ExportError, match="cannot add: writing into"):
        add_tasks(out / "1-gpu", [prefixes[1]])
    assert list_tasks(out / "1-gpu") == [(0, "alpha", 3)]  # the removal stands; the failed add left no trace
    assert check_files(out / "1-gpu") == []


def test_task_name_path_tricks_refused_everywhere(neox, tmp_path, cli):
    model, cfg, (alpha, _) = neox
    out = tmp_path / "out"
    export(model, [alpha], out, 1, "fp32", progress=False)
    evil = with_task(make_prefix(tmp_path / "evil.safetensors", cfg, 3, "ok", 0, model), "../../escaped")
    before = snapshot(tmp_path)
    refused(cli("ft", "--model", str(model), "--prefix", str(evil), "--out", str(out), "--force",
                check=False), str(evil), "task name '../../escaped'", "retask")
    refused(cli("add", str(out / "1-gpu"), "--prefix", str(evil), check=False), str(evil),
            "task name '../../escaped'", "retask")
    torch.save(torch.zeros(2, 8), tmp_path / "r.weight")
    refused(cli("from-rinna", str(tmp_path / "r.weight"), "--model", str(model), "--task", "a/b", "--out",
                      str(tmp_path / "r.safetensors"), check=False), "--task", "task name 'a/b'")
    (tmp_path / "r.weight").unlink()
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("**/*escaped*"))
