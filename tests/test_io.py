"""The prefix file: exact round trip, self-description, and errors that say what mismatches."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from prefixtune.prefix import PrefixShape, prefix_shape
from prefixtune.prefix.io import check_compatible, load_prefix, save_prefix


def test_round_trip_exact(tmp_path):
    shape = PrefixShape(num_layers=2, num_kv_heads=2, head_dim=8, prefix_len=4)
    table = torch.randn(4, shape.width, dtype=torch.float64)
    path = tmp_path / "task.safetensors"
    save_prefix(path, table, shape, task="smile", base_model="some/model", architecture="llama",
                train_args={"max_lr": 0.001, "seed": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.safetensors"]  # no temporary left behind
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["prefix"]
        raw = f.get_tensor("prefix")
        meta = f.metadata()
    assert raw.dtype == torch.float32 and raw.shape == (4, 2 * 2 * 2 * 8)
    assert meta == {"format": "prefixtune", "format_version": "1", "task": "smile", "base_model": "some/model",
                    "architecture": "llama", "num_layers": "2", "num_kv_heads": "2", "head_dim": "8",
                    "prefix_len": "4", "train_args": json.dumps({"max_lr": 0.001, "seed": 3})}
    loaded, loaded_shape, loaded_meta = load_prefix(path)
    assert torch.equal(loaded, table.float())
    assert loaded_shape == shape
    assert loaded_meta["train_args"] == {"max_lr": 0.001, "seed": 3}


def test_element_order_is_position_layer_kv_head_dim(tmp_path):
    """Each element's value encodes its (p, l, kv, h, d) index; the stored flat order must match."""
    shape = PrefixShape(num_layers=3, num_kv_heads=2, head_dim=4, prefix_len=5)
    p, l, kv, h, d = torch.meshgrid(*(torch.arange(n) for n in (5, 3, 2, 2, 4)), indexing="ij")
    code = (p * 10000 + l * 1000 + kv * 100 + h * 10 + d).float()
    save_prefix(tmp_path / "x.safetensors", code.reshape(5, -1), shape, task="t", base_model="m", architecture="a")
    table, _, _ = load_prefix(tmp_path / "x.safetensors")
    assert table[2, 0].item() == 20000  # position 2, layer 0, key, head 0, dim 0
    assert table[2, 1].item() == 20001  # next element: head_dim
    assert table[2, 4].item() == 20010  # then head
    assert table[2, 8].item() == 20100  # then key/value
    assert table[2, 16].item() == 21000  # then layer


def test_mismatch_names_every_dimension(tmp_path):
    model = tiny_model("llama")  # 2 layers, 2 kv heads, head_dim 8
    wrong = PrefixShape(num_layers=3, num_kv_heads=2, head_dim=4, prefix_len=4)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.zeros(4, wrong.width), wrong, task="t", base_model="big/model", architecture="gpt_neox")
    _, shape, meta = load_prefix(path)
    with pytest.raises(ValueError) as e:
        check_compatible(path, shape, meta, model.config)
    msg = str(e.value)
    assert "num_layers: prefix has 3, base model has 2" in msg
    assert "head_dim: prefix has 4, base model has 8" in msg
    assert "num_kv_heads" not in msg and "big/model" in msg and str(path) in msg
    check_compatible(path, prefix_shape(model.config, 4), meta, model.config)  # a fitting shape passes


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prefix(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prefix(tmp_path / "junk.safetensors")
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'prefix'"):
        load_prefix(tmp_path / "other.safetensors")
    save_file({"prefix": torch.zeros(2, 3)}, str(tmp_path / "nometa.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="header field format is 'x', expected 'prefixtune'"):
        load_prefix(tmp_path / "nometa.safetensors")
    meta = {"format": "prefixtune", "format_version": "1", "num_layers": "2", "num_kv_heads": "1",
            "head_dim": "2", "prefix_len": "2"}
    save_file({"prefix": torch.zeros(2, 3)}, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), but the header says \(2, 8\)"):
        load_prefix(tmp_path / "shape.safetensors")


def test_failed_save_keeps_existing_file(tmp_path):
    shape = PrefixShape(1, 1, 2, 2)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.ones(2, 4), shape, task="t", base_model="m", architecture="a")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_prefix(path, torch.ones(3, 4), shape, task="t", base_model="m", architecture="a")
    assert path.read_bytes() == before


def _one_line_naming(e, path) -> str:
    """The error names the file on one line; returns the message without the path (tmp paths hold test names)."""
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg.replace(str(path), "")


def test_pickles_renamed_to_safetensors_are_refused_unread(tmp_path):
    """A torch.save checkpoint (zip) or a bare pickle named .safetensors: refused, and never unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):  # unpickling this would create a file
            return (open, (str(tmp_path / "pwned"), "w"))

    shape = PrefixShape(1, 1, 2, 2)
    zipped, raw = tmp_path / "zip.safetensors", tmp_path / "raw.safetensors"
    torch.save({"prefix": torch.zeros(2, shape.width), "x": Boom()}, zipped)
    raw.write_bytes(pickle.dumps({"prefix": Boom()}))
    for path, what in ((zipped, "a zip archive (a torch.save checkpoint?)"), (raw, "a Python pickle")):
        with pytest.raises(ValueError) as e:
            load_prefix(path)
        msg = _one_line_naming(e, path)
        assert "not a readable safetensors file" in msg and what in msg and "never unpickles" in msg
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_empty_files_are_refused(tmp_path):
    shape = PrefixShape(2, 2, 8, 4)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.randn(4, shape.width), shape, task="t", base_model="m", architecture="llama")
    data = path.read_bytes()
    for n in (len(data) // 2, len(data) - 1, 100):
        cut = tmp_path / f"cut{n}.safetensors"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError) as e:
            load_prefix(cut)
        assert "truncated" in _one_line_naming(e, cut)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        load_prefix(tmp_path / "empty.safetensors")
    assert "empty" in _one_line_naming(e, tmp_path / "empty.safetensors")


def test_non_finite_table_is_refused(tmp_path):
    shape = PrefixShape(1, 1, 2, 2)
    table = torch.zeros(2, shape.width)
    table[1, 2] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_prefix(path, table, shape, task="t", base_model="m", architecture="a")
    with pytest.raises(ValueError) as e:
        load_prefix(path)
    assert "NaN" in _one_line_naming(e, path)


def test_rename_task_keeps_everything_else(tmp_path):
    from helpers import run

    shape = PrefixShape(1, 1, 2, 2)
    table = torch.randn(2, shape.width)
    path = tmp_path / "p.safetensors"
    save_prefix(path, table, shape, task="base", base_model="some/model", architecture="llama",
                train_args={"seed": 3})
    run([sys.executable, "-m", "prefixtune.convert", "retask", "--prefix", str(path), "--task", "smile"])
    loaded, loaded_shape, meta = load_prefix(path)
    assert torch.equal(loaded, table) and loaded_shape == shape
    assert (meta["task"], meta["base_model"], meta["architecture"], meta["train_args"]) == \
        ("smile", "some/model", "llama", {"seed": 3})
    proc = run([sys.executable, "-m", "prefixtune.convert", "retask", "--prefix", str(path), "--task", "base"],
               check=False)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and "reserved" in proc.stderr
    assert "Traceback" not in proc.stderr and load_prefix(path)[2]["task"] == "smile"


def test_torch_load_only_with_weights_only_in_prefix():
    """No code under prefix/ unpickles: every torch.load call (if any) passes weights_only=True."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "prefix"
    files = sorted(root.glob("*.py"))
    assert len(files) >= 9
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{f.name}:{node.lineno}: torch.load without weights_only=True"
        assert "pickle.load" not in f.read_text(encoding="utf-8"), f.name


def test_the_table_is_read_only_after_every_header_check(tmp_path, monkeypatch):
    """A file that does not fit (or a caller's check that fails) costs a header read: get_tensor is never called.
    The header declares the shape, so a 10 GB table with the wrong width is refused without reading 10 GB."""
    import prefixtune.prefix.io as io

    reads = []
    real_open = io.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(io, "safe_open", Spy)
    shape = PrefixShape(num_layers=2, num_kv_heads=1, head_dim=4, prefix_len=3)
    path = tmp_path / "p.safetensors"
    save_prefix(path, torch.randn(3, shape.width), shape, task="t", base_model="m", architecture="llama")

    def refuse(s, meta):
        raise ValueError(f"does not fit: width {s.width}")

    with pytest.raises(ValueError, match="does not fit: width 16"):
        load_prefix(path, refuse)
    meta = {"format": "prefixtune", "format_version": "1", "num_layers": "2", "num_kv_heads": "1", "head_dim": "4",
            "prefix_len": "3"}
    save_file({"prefix": torch.zeros(3, 99)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"shape \(3, 99\), but the header says \(3, 16\)"):
        load_prefix(tmp_path / "bad.safetensors", lambda s, m: None)
    assert reads == []
    table, _, _ = load_prefix(path, lambda s, m: None)
    assert reads == ["prefix"] and table.shape == (3, 16)
