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
    # rinna's reference appends " 😃" to every line, blank ones included: `f"{tmp_text}\n{sent} 😃"`
    assert tok.decode(chunks[0]) == "first line 😃\nsecond line 😃\n 😃\nthird 😃\n"


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


def test_a_long_prompt_is_kept_and_the_completion_cut(sp_tokenizer_dir):
    """A completion that fills --max_seq_len used to push the whole prompt out: the record then trained as
    unconditional text. The prompt stays whole; the completion loses its end and the report counts it."""
    from prefixtune.data import SplitReport

    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    prompt, completion = "The quick brown fox", " jumps over the lazy dog" * 10
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert len(p_ids) + len(c_ids) > 24  # the completion alone would fill the window
    report = SplitReport()
    [ex] = record_examples({"prompt": prompt, "completion": completion}, tok, 24, "none", eos_id=2, report=report)
    assert ex["input_ids"] == p_ids + c_ids[:24 - len(p_ids)]
    assert ex["labels"] == [IGNORE] * len(p_ids) + c_ids[:24 - len(p_ids)]
    assert report.cut_completions == 1
    # a prompt with no room for one completion token gives no example, and build_split says so
    records = [{"prompt": "The quick brown fox jumps over the lazy dog " * 5, "completion": "x"},
               {"prompt": "a", "completion": " b c"}, {"prompt": "b", "completion": " c d"}]
    report = SplitReport()
    train, dev, _ = build_split(records, tok, max_len=16, transform="none", seed=0, train_size=None, dev_size=1,
                                eos_id=2, report=report)
    assert (len(train), len(dev), report.empty_records) == (1, 1, 1)
    assert any("gave no example" in line for line in report.lines())


def test_a_record_bigger_than_the_dev_set_trains_instead_of_vanishing(sp_tokenizer_dir):
    """One huge record used to land in dev (first in the shuffled order) and be cut to --dev_data_size there:
    everything else in it was lost. Now it trains, and dev takes records that fit whole."""
    tok = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    huge = {"text": "\n".join(["The quick brown fox jumps over the lazy dog."] * 400)}
    small = [{"text": f"Python is a programming language.\nLists and tuples {i}."} for i in range(6)]
    for seed in range(4):
        train, dev, dev_recs = build_split([huge, *small], tok, max_len=32, transform="smileface", seed=seed,
                                           train_size=None, dev_size=4, eos_id=None)
        assert huge not in dev_recs and 0 < len(dev) <= 4
        n_huge = len(smileface_examples(huge["text"], tok, 32))
        assert len(train) + len(dev) == n_huge + sum(len(smileface_examples(r["text"], tok, 32)) for r in small)
    # only when no record fits at all is one cut, and the report says how much was left out
    from prefixtune.data import SplitReport

    report = SplitReport()
    train, dev, _ = build_split([huge], tok, max_len=32, transform="smileface", seed=0, train_size=None, dev_size=4,
                                eos_id=None, report=report)
    assert len(dev) == 4 and train == [] and report.dev_cut_examples == n_huge - 4
    assert any("used for neither half" in line for line in report.lines())
    # dev is filled with whole records, the last one cut to --dev_data_size; the cut is counted, not hidden
    report = SplitReport()
    train, dev, dev_recs = build_split(small, tok, max_len=12, transform="smileface", seed=0, train_size=None,
                                       dev_size=3, eos_id=None, report=report)
    total = sum(len(smileface_examples(r["text"], tok, 12)) for r in small)
    assert len(dev) == 3 and len(train) + len(dev) + report.dev_cut_examples == total


def test_a_long_line_is_tokenised_in_pieces_with_bounded_memory(tmp_path):
    """A 4 MB line (the 50 MB case in small): tokenising it in one call costs ~200x the text in memory; in pieces
    the peak stays a small multiple of what is kept. Measured in a child process, so the figure is its own."""
    import subprocess
    import sys

    script = r"""
import json, resource, sys
from prefixtune.prefix.base import load_tokenizer
from prefixtune.data import read_jsonl, build_split
tok = load_tokenizer(None)
path = sys.argv[1]
line = " ".join(["word%d" % (i % 1000) for i in range(600_000)])
open(path, "w").write(json.dumps({"text": line}) + "\n" + json.dumps({"text": "short one\nshort two"}) + "\n")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train, dev, _ = build_split(read_jsonl(path), tok, max_len=96, transform="smileface", seed=0, train_size=None,
                            dev_size=1, eos_id=None)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"grew_mib": grew, "train_tokens": sum(len(e["input_ids"]) for e in train), "dev": len(dev)}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "long.jsonl")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dev"] == 1 and out["train_tokens"] > 1_000_000  # nothing dropped: the long line trains
    assert out["grew_mib"] < 300, out  # one call over the whole line grows by ~760 MiB here


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_non_utf8_file_is_named_in_one_line(tmp_path, encoding, name):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n', encoding=encoding)
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}: the file is {name} text") and "\n" not in str(e.value)
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # Latin-1 on line 2
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(path)


def test_length_buckets_keep_every_example_once_and_cut_padding():
    """--batching buckets: a permutation of the epoch (each example once, full batches first), the same on every
    call (ranks and resumes agree), batches of like lengths (far less padding than the plain shuffle), and still a
    shuffle: batch order and membership change with the seed and the epoch."""
    import random

    from prefixtune.data import epoch_order

    rng = random.Random(0)
    lengths = [rng.randint(4, 300) for _ in range(1003)]
    gb = 8
    order = epoch_order(lengths, gb, seed=3, epoch=0)
    assert sorted(order) == list(range(len(lengths)))
    assert order == epoch_order(lengths, gb, seed=3, epoch=0)
    assert order != epoch_order(lengths, gb, seed=3, epoch=1) and order != epoch_order(lengths, gb, seed=4, epoch=0)
    full = len(lengths) // gb

    def padded(o):  # tokens computed when each batch pads to its longest
        return sum(max(lengths[i] for i in o[s * gb:(s + 1) * gb]) * gb for s in range(full))

    plain = epoch_order(lengths, gb, seed=3, epoch=0, buckets=False)
    assert sorted(plain) == list(range(len(lengths)))
    real = sum(lengths[i] for i in order[:full * gb])
    assert padded(order) < 1.1 * real < padded(plain)
    spans = [max(lengths[i] for i in order[s * gb:(s + 1) * gb]) for s in range(full)]
    assert spans != sorted(spans)  # batches are not in length order
