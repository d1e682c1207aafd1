"""The GGUF base converted once into a plain folder (prefix/gguf_cache.py) loads what the GGUF file loads."""
from __future__ import annotations

import json
import os

import torch

from prefixtune.prefix import gguf_cache
from prefixtune.prefix.base import load_base
from prefixtune.prefix.resolve import resolve_model


def test_converted_copy_matches_the_gguf_file(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    where, kwargs = resolve_model(None)
    assert gguf_cache.lookup(where, kwargs) == (where, kwargs)  # nothing converted yet

    # as the second rank of a launch: save_pretrained would write no weights there (only rank 0 saves)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    base, tok, name = load_base(None, "bf16")  # converts, then loads the copy
    monkeypatch.undo()
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    folder = gguf_cache.cached_folder(where, kwargs)
    assert name == "smollm2" and (folder / "model.safetensors").is_file()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in saved
    assert gguf_cache.lookup(where, kwargs) == (str(folder), {})
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temporary left

    ref = AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16, **kwargs).eval()  # the GGUF route
    ref_tok = AutoTokenizer.from_pretrained(where, **kwargs)
    for text in ["Hello world 😃", "  two  spaces\n\nand lines", "日本語", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([tok("The quick brown fox").input_ids])
    with torch.no_grad():
        assert torch.equal(base(ids).logits, ref(ids).logits)
    for (n, p), (_, q) in zip(base.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n


def test_an_unwritable_cache_falls_back_to_the_gguf_file(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.ENV, str(blocked / "cache"))  # mkdir fails: a file is in the way
    where, kwargs = resolve_model(None)
    assert gguf_cache.convert(where, kwargs, lambda: (_ for _ in ()).throw(AssertionError("no load"))) is False
    assert gguf_cache.lookup(where, kwargs) == (where, kwargs)
    assert os.listdir(tmp_path) == ["file"]
