"""Show what a smileface prefix learned: generations on held-out paragraphs with and without it, and the share of
generated line ends that carry 😃.

    python -m train.demo --prefix runs/smileface.safetensors

The held-out paragraphs are the training run's own dev records, rebuilt from the arguments stored in the prefix
file, so none of them was trained on. Each prompt is a paragraph's first line; every line end the model then
writes counts.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from prefixtune.data import build_split, builtin_records, read_jsonl
from prefixtune.prefix.base import load_base
from prefixtune.prefix.errors import UserError, exits_on_error, one_line
from prefixtune.prefix.generate import Generator, Sampling
from prefixtune.prefix.io import check_base_model, load_prefix

SMILE = "😃"


def line_end_share(texts: list[str]) -> tuple[int, int]:
    """(line ends preceded by 😃, all line ends) in generated texts; a trailing partial line does not count."""
    hit = total = 0
    for t in texts:
        for line in t.split("\n")[:-1]:
            if line.strip():
                total += 1
                hit += line.rstrip().endswith(SMILE)
    return hit, total


def held_out_prompts(train_args: dict, tokenizer, n: int) -> list[str]:
    """First lines of the run's own dev records: the split is rebuilt exactly as training built it (which records
    land in dev depends on how many examples each yields, so transform and lengths must match)."""
    from dataclasses import fields

    from prefixtune.train.args import TrainArgs

    a = TrainArgs(**{f.name: train_args[f.name] for f in fields(TrainArgs) if f.name in train_args})
    records = read_jsonl(a.data_path) if a.data_path else builtin_records()
    _, _, dev_records = build_split(records, tokenizer, max_len=a.max_seq_len, transform=a.data_transform,
                                    seed=a.seed, train_size=a.train_data_size, dev_size=a.dev_data_size,
                                    eos_id=tokenizer.eos_token_id)
    firsts = [r["text"].split("\n")[0] for r in dev_records if "text" in r and r["text"].strip()]
    return firsts[:n]


@exits_on_error()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", required=True, help="prefix .safetensors trained with the smileface transform")
    p.add_argument("--model", default=None, help="base model (default: the one stored in the prefix file)")
    p.add_argument("--n_prompts", type=int, default=32, help="held-out paragraphs to complete")
    p.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per paragraph")
    p.add_argument("--show", type=int, default=3, help="samples to print with and without the prefix")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--allow_other_base", action="store_true",
                   help="run the prefix on --model even if it was trained on another base model")
    a = p.parse_args(argv)
    try:
        table, shape, meta = load_prefix(a.prefix)
        if a.model:
            check_base_model(a.prefix, meta, a.model, allow_other=a.allow_other_base)
        base, tok, _ = load_base(a.model or meta["base_model"] or None)
        gen = Generator(base, tok)
        task = gen.add_prefix(a.prefix, loaded=(table, shape, meta))
        prompts = held_out_prompts(meta["train_args"], tok, a.n_prompts)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(one_line(e)) from None
    sampling = Sampling(max_new_tokens=a.max_new_tokens, greedy=True)
    result = {}
    for label, t in (("without prefix", None), (f"with prefix {task}", task)):
        outs = []
        for i in range(0, len(prompts), 8):
            outs += gen.generate(prompts[i:i + 8], t, sampling)
        hit, total = line_end_share(outs)
        result[label] = {"line_ends": total, "with_smile": hit, "share": hit / max(total, 1)}
        print(f"\n=== {label} ===")
        for prompt, out in list(zip(prompts, outs))[:a.show]:
            print(f"--- {prompt}\n{prompt}{out}")
    print("\nshare of generated line ends that carry 😃 (held-out paragraphs, greedy):")
    for label, r in result.items():
        print(f"  {label:<30} {r['with_smile']:>4} / {r['line_ends']:<4} = {100 * r['share']:5.1f} %")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
