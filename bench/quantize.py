"""Quality and weight memory of a quantized frozen base (--quantize): dev loss of the same prefixes over the
full-precision, int8 and int4 base, and of a prefix trained over the int8 base.

    python bench/quantize.py --steps 40 --json bench/results/quantize.json      # embedded SmolLM2-135M-Instruct
    python bench/quantize.py --work /tmp/qq        # reuse the prefixes trained there (smile_none/smile_int8)

1. Trains two prefixes with the README demo's settings (built-in data, smileface, P=16, batch 8, lr 1e-3, the
   precision the machine picks) for --steps optimizer steps: one over the full-precision base (`--quantize none`),
   one over the int8 base (`--quantize int8`). Existing prefixes in --work are reused.
2. Loads the base three times (none, int8, int4; fp32 activations) and, on each, computes the token-weighted loss
   over training's own dev split (64 examples, seed 42) of: no prefix, the text-initialised prefix every run starts
   from (step 0), and the two trained prefixes.
Weight memory = bytes of every parameter and buffer (a quantized weight counts its int8 storage and its scales;
tied embeddings once).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("none", "int8", "int4")


def train_prefix(work: Path, quantize: str, steps: int) -> Path:
    out = work / f"smile_{quantize}.safetensors"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "train", "--save_name", f"smile_{quantize}", "--save_dir", str(work),
                        "--max_steps", str(steps), "--eval_every", str(steps), "--quantize", quantize, "--overwrite"],
                       cwd=ROOT, check=True)
    return out


def dev_examples(tok):
    from prefixtune.data import build_split, builtin_records
    from prefixtune.train.args import TrainArgs

    a = TrainArgs()  # the demo's defaults: max_seq_len 96, smileface, seed 42, 64 dev examples
    _, dev, _ = build_split(builtin_records(), tok, max_len=a.max_seq_len, transform=a.data_transform, seed=a.seed,
                            train_size=a.train_data_size, dev_size=a.dev_data_size, eos_id=tok.eos_token_id)
    return dev


def dev_loss(base, tok, dev, table, batch_size: int = 8) -> float:
    """Token-weighted next-token loss over `dev`, as training's evaluate() computes it (table None = no prefix)."""
    import torch.nn.functional as F

    from prefixtune.data import collate
    from prefixtune.prefix import prefix_hidden_states

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dev), batch_size):
            b = collate(dev[i:i + batch_size], tok.pad_token_id)
            if table is None:
                hidden = base.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            else:
                hidden = prefix_hidden_states(base, b["input_ids"], b["attention_mask"], table)
            targets = b["labels"][:, 1:]
            keep = targets != -100
            logits = base.get_output_embeddings()(hidden[:, :-1][keep])
            total += F.cross_entropy(logits.float(), targets[keep], reduction="sum").item()
            tokens += int(keep.sum())
    return total / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each trained prefix")
    p.add_argument("--work", default=None, help="where the trained prefixes (and their training states) go; kept "
                                                "prefixes are reused (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from prefixtune.prefix import PrefixEncoder, prefix_shape, text_key_values
    from prefixtune.prefix.base import load_base
    from prefixtune.prefix.io import load_prefix
    from prefixtune.prefix.quantize import quantized_count, weight_bytes
    from prefixtune.train.args import TrainArgs

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_quantize_"))
    work.mkdir(parents=True, exist_ok=True)
    trained = {q: train_prefix(work, q, a.steps) for q in ("none", "int8")}
    tables = {f"trained over {q}": load_prefix(path)[0] for q, path in trained.items()}
    rows = []
    for kind in KINDS:
        t0 = time.time()
        base, tok, _ = load_base(None, "fp32", "cpu", quantize=kind)
        load_s = time.time() - t0
        if kind == "none":  # the step-0 prefix of every run: the full-precision base's keys/values for a text
            shape = prefix_shape(base.config, TrainArgs().prefix_seq_len)
            enc = PrefixEncoder(shape)
            enc.reset("text", text_key_values(base, tok, TrainArgs().prefix_init_text, shape))
            with torch.no_grad():
                tables = {"text-initialised (step 0)": enc(), **tables}
        dev = dev_examples(tok)
        row = {"base": kind, "weight_bytes": weight_bytes(base), "quantized_linears": quantized_count(base),
               "load_s": round(load_s, 1), "no prefix": dev_loss(base, tok, dev, None)}
        t0 = time.time()
        for name, table in tables.items():
            row[name] = dev_loss(base, tok, dev, table)
        row["eval_s_per_prefix"] = round((time.time() - t0) / len(tables), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del base
    cols = ["no prefix", *tables]
    print("\n| base | weight bytes | " + " | ".join(f"dev loss, {c}" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['base']} | {r['weight_bytes']:,} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": a.steps, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
