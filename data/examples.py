"""Records -> token examples (input ids + labels), the seeded train/dev split, and padded batches."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100  # label of tokens that carry no loss (prompts, padding)
SMILE = " 😃"


# Longer texts are tokenised in pieces cut at spaces: a 50 MB line in one call takes ~10 GB. Where a piece has no
# space (Japanese) the cut falls inside a word, and a sentencepiece tokenizer may give one token more there.
PIECE_CHARS = 65536


def _ids(tokenizer, text: str) -> list[int]:
    # No BOS/EOS from the tokenizer: the prefix is the context, and rinna's T5Tokenizer would append </s>.
    if len(text) <= PIECE_CHARS:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = []
    for piece in _pieces(text):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _pieces(text: str):
    """Cut `text` before a space near every PIECE_CHARS characters, so each piece starts a word."""
    start = 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def smileface_examples(text: str, tokenizer, max_len: int) -> list[list[int]]:
    """Append " 😃" to every line, blank lines included (as rinna's reference does), and pack whole lines into
    chunks of at most `max_len` tokens.

    Lines are tokenised one by one and joined with the tokenizer's own newline ids, so a tokenizer that drops
    "\\n" (rinna's T5Tokenizer) still sees every emoji. Unlike the seed, the last chunk of a document is kept,
    and a line longer than `max_len` is split rather than lost.
    """
    newline = _ids(tokenizer, "\n")
    chunks, cur = [], []
    for line in text.split("\n"):
        ids = _ids(tokenizer, line + SMILE) + newline
        if cur and len(cur) + len(ids) > max_len:
            chunks.append(cur)
            cur = []
        n_full = (len(ids) - 1) // max_len  # a line longer than max_len: whole windows, the rest carries on
        chunks.extend(ids[i * max_len:(i + 1) * max_len] for i in range(n_full))
        cur = cur + ids[n_full * max_len:]
    if cur:
        chunks.append(cur)
    return chunks


@dataclass
class SplitReport:
    """What build_split kept and what it left out, for the training log: nothing is dropped silently."""

    train_records: int = 0
    dev_records: int = 0
    empty_records: int = 0  # gave no example: a prompt with no room for its completion, or text of one token
    cut_completions: int = 0  # prompt/completion pairs whose completion was shortened to fit max_len
    dev_cut_examples: int = 0  # examples of the last dev record beyond --dev_data_size, left out of both halves
    train_cut_examples: int = 0  # beyond --train_data_size

    def lines(self) -> list[str]:
        out = [f"data: {self.train_records} records for training, {self.dev_records} held out for the dev loss"]
        if self.empty_records:
            out.append(f"data: {self.empty_records} record(s) gave no example (a prompt of --max_seq_len tokens or "
                       "more leaves no room for its completion; raise --max_seq_len or shorten the prompts)")
        if self.cut_completions:
            out.append(f"data: {self.cut_completions} completion(s) cut to fit --max_seq_len (prompts are kept whole)")
        if self.dev_cut_examples:
            out.append(f"data: {self.dev_cut_examples} examples of the last dev record go beyond --dev_data_size "
                       "and are used for neither half (training on them would leak the dev record)")
        if self.train_cut_examples:
            out.append(f"data: --train_data_size leaves out {self.train_cut_examples} training examples")
        return out


def record_examples(record: dict, tokenizer, max_len: int, transform: str, eos_id: int | None,
                    report: SplitReport | None = None) -> list[dict]:
    """One record -> examples `{"input_ids", "labels"}`; prompts carry no loss.

    A prompt/completion pair longer than `max_len` keeps its whole prompt and loses the completion's end: the
    completion only means something after its prompt. A prompt that leaves no room for one completion token
    gives no example (the caller counts it).
    """
    if "prompt" in record:
        prompt, completion = _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["completion"])
        if eos_id is not None:
            completion = completion + [eos_id]  # so the model learns to stop
        if len(prompt) >= max_len or not completion:
            return []
        if len(prompt) + len(completion) > max_len and report is not None:
            report.cut_completions += 1
        completion = completion[:max_len - len(prompt)]
        return [{"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}]
    if transform == "smileface":
        chunks = smileface_examples(record["text"], tokenizer, max_len)
    else:
        ids = _ids(tokenizer, record["text"])
        chunks = [ids[i:i + max_len] for i in range(0, len(ids), max_len)]
    return [{"input_ids": c, "labels": list(c)} for c in chunks if len(c) > 1]


def build_split(records, tokenizer, *, max_len: int, transform: str, seed: int, train_size: int | None,
                dev_size: int, eos_id: int | None, report: SplitReport | None = None):
    """Records -> (train examples, dev examples, dev records); sizes count examples, dev taken from whole records.

    In a seeded order, records go to dev until it holds `dev_size` examples (the last one cut to fit); a record
    with more examples than the whole dev set trains instead -- in dev it would be cut and mostly lost. Only if
    every record is that big is the first one cut into dev. `report` counts whatever is left out.
    """
    report = report if report is not None else SplitReport()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    dev, dev_recs, train = [], [], []
    oversized = None  # (start in train, number of examples, record) of the first record too big for dev
    for i in order:
        ex = record_examples(records[i], tokenizer, max_len, transform, eos_id, report)
        if not ex:
            report.empty_records += 1
        elif len(dev) < dev_size and len(ex) <= dev_size:
            dev.extend(ex)
            dev_recs.append(records[i])
        else:
            if oversized is None and len(ex) > dev_size:
                oversized = (len(train), len(ex), records[i])
            train.extend(ex)
            report.train_records += 1
    if not dev and oversized is not None:
        start, n, rec = oversized
        dev = train[start:start + n]
        del train[start:start + n]
        dev_recs.append(rec)
        report.train_records -= 1
    report.dev_cut_examples = max(0, len(dev) - dev_size)
    dev = dev[:dev_size]
    report.dev_records = len(dev_recs)
    if train_size is not None and len(train) > train_size:
        report.train_cut_examples = len(train) - train_size
        train = train[:train_size]
    return train, dev, dev_recs


BUCKET_WINDOW = 32  # global batches sorted together: wide enough to match lengths, narrow enough to stay random


def epoch_order(lengths: list[int], global_batch: int, seed: int, epoch: int, buckets: bool = True) -> list[int]:
    """The example indices of one epoch, in training order; optimizer step s takes
    order[s * global_batch:(s + 1) * global_batch] (the full steps come first; leftovers, if any, last).

    A seeded shuffle. With `buckets`, every window of BUCKET_WINDOW global batches of that shuffle is sorted by
    length and cut into global batches, and the batches' order is shuffled again: examples of like length share a
    batch, so padding (to the longest of the micro-batch) costs little compute, and every example is still seen
    once per epoch. A function of its arguments only: all ranks, a resumed run and the benchmark agree."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not buckets:
        return order
    window = global_batch * BUCKET_WINDOW
    full, partial = [], []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        for j in range(0, len(chunk), global_batch):
            (full if len(chunk) - j >= global_batch else partial).append(chunk[j:j + global_batch])
    shuffled = [full[b] for b in torch.randperm(len(full), generator=gen).tolist()]
    return [i for batch in shuffled + partial for i in batch]


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest example: (B, T) input_ids, attention_mask and labels."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n
        if padding_side == "left":
            ids.append([pad_id] * pad + e["input_ids"])
            mask.append([0] * pad + [1] * n)
            labels.append([IGNORE] * pad + e["labels"])
        else:
            ids.append(e["input_ids"] + [pad_id] * pad)
            mask.append([1] * n + [0] * pad)
            labels.append(e["labels"] + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
