"""Records -> token examples (input ids + labels), the seeded train/dev split, and padded batches."""
from __future__ import annotations

import random

import torch

IGNORE = -100  # label of tokens that carry no loss (prompts, padding)
SMILE = " 😃"


def _ids(tokenizer, text: str) -> list[int]:
    # No BOS/EOS from the tokenizer: the prefix is the context, and rinna's T5Tokenizer would append </s>.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def smileface_examples(text: str, tokenizer, max_len: int) -> list[list[int]]:
    """Append " 😃" to every line and pack whole lines into chunks of at most `max_len` tokens.

    Lines are tokenised one by one and joined with the tokenizer's own newline ids, so a tokenizer that drops
    "\\n" (rinna's T5Tokenizer) still sees every emoji. Unlike the seed, the last chunk of a document is kept,
    and a line longer than `max_len` is split rather than lost.
    """
    newline = _ids(tokenizer, "\n")
    chunks, cur = [], []
    for line in text.split("\n"):
        if not line.strip():
            continue
        ids = _ids(tokenizer, line + SMILE) + newline
        if cur and len(cur) + len(ids) > max_len:
            chunks.append(cur)
            cur = []
        while len(ids) > max_len:
            chunks.append(ids[:max_len])
            ids = ids[max_len:]
        cur = cur + ids
    if cur:
        chunks.append(cur)
    return chunks


def record_examples(record: dict, tokenizer, max_len: int, transform: str, eos_id: int | None) -> list[dict]:
    """One record -> examples `{"input_ids", "labels"}`; prompts carry no loss."""
    if "prompt" in record:
        prompt, completion = _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["completion"])
        if eos_id is not None:
            completion = completion + [eos_id]  # so the model learns to stop
        ids = (prompt + completion)[-max_len:]  # keep the completion; trim the prompt's start if too long
        n_prompt = max(0, len(ids) - len(completion))
        return [{"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]}]
    if transform == "smileface":
        chunks = smileface_examples(record["text"], tokenizer, max_len)
    else:
        ids = _ids(tokenizer, record["text"])
        chunks = [ids[i:i + max_len] for i in range(0, len(ids), max_len)]
    return [{"input_ids": c, "labels": list(c)} for c in chunks if len(c) > 1]


def build_split(records, tokenizer, *, max_len: int, transform: str, seed: int, train_size: int | None,
                dev_size: int, eos_id: int | None):
    """Records -> (train examples, dev examples, dev records); sizes count examples, dev taken from whole records."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    dev, dev_recs, train = [], [], []
    for i in order:
        ex = record_examples(records[i], tokenizer, max_len, transform, eos_id)
        if len(dev) < dev_size:
            dev.extend(ex)
            dev_recs.append(records[i])
        else:
            train.extend(ex)
    dev = dev[:dev_size]
    if train_size is not None:
        train = train[:train_size]
    return train, dev, dev_recs


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
