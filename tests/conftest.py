"""Tiny models and tokenizers built on the spot: no test downloads anything."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The embedded GGUF's converted copy (prefix/gguf_cache.py): one per test session, never in the user's home.
if "PREFIXTUNE_CACHE" not in os.environ:
    import tempfile

    os.environ["PREFIXTUNE_CACHE"] = tempfile.mkdtemp(prefix="prefixtune-test-cache-")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A prefix is a short sequence of learned key and value vectors.",
    "Every layer of the model attends to the prefix before the real tokens.",
    "Python is a programming language that lets you work quickly.",
    "Lists, tuples and dictionaries are built-in container types.",
    "😃 smiles at the end of every line 😃",
]


def tiny_config(arch: str, vocab_size: int = 300):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=vocab_size, n_positions=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                             vocab_size=vocab_size, rotary_pct=0.5, max_position_embeddings=256,
                             use_parallel_residual=True, bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # grouped-query attention with an explicit head_dim
        return LlamaConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                           head_dim=8, intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa", vocab_size: int = 300):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # larger weights than the default init make differences visible
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A sentencepiece T5Tokenizer folder laid out like rinna's (spiece.model + tokenizer_config.json), trained
    here; like rinna's, it drops '\\n'."""
    import shutil

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=80,
                                   user_defined_symbols=["😃"], character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=3, pad_piece="[PAD]", minloglevel=2)
    out = d / "tok"
    out.mkdir()
    shutil.copy(d / "spiece.model", out / "spiece.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "do_lower_case": False, "extra_ids": 0,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}), encoding="utf-8")
    return out


def save_tiny(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(arch, seed, vocab_size=max(len(tok), 128))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_neox_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny("gpt_neox", sp_tokenizer_dir, tmp_path_factory.mktemp("neox") / "model")


@pytest.fixture(scope="session")
def tiny_llama_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny("llama", sp_tokenizer_dir, tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    lines = []
    for i in range(40):
        text = "\n".join(CORPUS[(i + j) % 5] for j in range(3))
        lines.append(json.dumps({"text": text}))
    path = d / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
