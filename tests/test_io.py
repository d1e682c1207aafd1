"""The prefix file: exact round trip, self-description, and errors that say what mismatches."""
from __future__ import annotations

import json

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
