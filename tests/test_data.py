"""Data: JSONL errors with file and line, the smileface transform, labels, the split."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from prefixtune.data import IGNORE, DataError, build_split, builtin_records, collate, read_jsonl, record_examples
from prefixtune.data.examples import smileface_examples


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"text": 3}', "field 'text' must be a string, got int"),
    ('{"prompt": "p"}', "field 'completion' must be a string, got nothing"),
    ('{"prompt": "p", "completion": ""}', "field 'completion' is empty"),
    ('{"body": "x"}', "expected a field 'text', or 'prompt' and 'completion'; got fields ['body']"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_smileface_keeps_every_line_and_the_last_chunk(sp_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    lines = ["The quick brown fox jumps over the lazy dog" + " and the dog" * i for i in range(7)]
    chunks = smileface_examples("\n".join(lines), tok, max_len=40)
    assert len(chunks) > 1 and all(len(c) <= 40 for c in chunks)
    smile = tok.convert_tokens_to_ids("😃")
    # this tokenizer drops "\n" like rinna's, yet every line keeps its emoji, the last chunk included
    assert sum(c.count(smile) for c in chunks) == 7
    assert chunks[-1].count(smile) >= 1
    text = tok.decode([t for c in chunks for t in c])
    assert text.count("😃") == 7 and text.rstrip().endswith("the dog😃")


def test_smileface_on_a_newline_tokenizer():
    from prefixtune.prefix.base import load_tokenizer

    tok = load_tokenizer(None)  # the embedded SmolLM2 tokenizer keeps "\n"
    chunks = smileface_examples("first line\nsecond line\n\nthird", tok, max_len=96)
    assert tok.decode(chunks[0]) == "first line 😃\nsecond line 😃\nthird 😃\n"


def test_prompt_completion_loss_only_on_completion(sp_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    [ex] = record_examples({"prompt": "The quick brown", "completion": " fox jumps"}, tok, 64, "none", eos_id=2)
    n_prompt = len(tok("The quick brown", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == 2


def test_split_is_seeded_and_disjoint(sp_tokenizer_dir, text_jsonl):
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    records = read_jsonl(text_jsonl)
    for i, r in enumerate(records):
        r["text"] += f"\nrecord {i}"
    kw = dict(max_len=64, transform="smileface", train_size=None, dev_size=5, eos_id=None)
    train, dev, dev_recs = build_split(records, tok, seed=1, **kw)
    again = build_split(records, tok, seed=1, **kw)
    other = build_split(records, tok, seed=2, **kw)
    assert (train, dev) == again[:2] and dev != other[1]
    assert len(dev) == 5
    dev_texts = {r["text"] for r in dev_recs}
    assert not dev_texts & {r["text"] for r in records if r not in dev_recs}
    limited = build_split(records, tok, seed=1, **{**kw, "train_size": 7})[0]
    assert limited == train[:7]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_and_masks(side):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0, side)
    if side == "left":
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE, IGNORE, 8]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].sum().item() == 4


def test_builtin_records_are_prose():
    records = builtin_records()
    assert len(records) > 500
    assert all(r["text"].count("\n") >= 1 for r in records)
    assert json.dumps(records[:3])  # plain JSON-able records
