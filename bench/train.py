"""Training throughput and peak memory: prefixtune vs PEFT prefix tuning, same model, data, prefix length, batch.

    python bench/train.py                  # default model (embedded SmolLM2-135M), P=16, batch 8, 12 timed steps
    python bench/train.py --steps 30 --json bench/results/train.json

Both run the same plain PyTorch loop (AdamW on the prefix parameters, frozen base in the given precision), each
configuration in its own process so peak memory (RSS on CPU, max allocated on CUDA) is its own. PEFT uses
`prefix_projection=True`, the same MLP reparameterisation. Tokens/s counts real (unpadded) tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(impl: str, dtype: str, a) -> dict:
    import torch

    from prefixtune.data import build_split, builtin_records, collate
    from prefixtune.prefix import PrefixEncoder, PrefixLM, prefix_shape, text_key_values
    from prefixtune.prefix.base import DTYPES, load_base

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok, _ = load_base(a.model, dtype, device)
    train, _, _ = build_split(builtin_records(), tok, max_len=a.max_seq_len, transform="smileface", seed=0,
                              train_size=None, dev_size=8, eos_id=None)
    batches = [collate(train[i:i + a.batch_size], tok.pad_token_id) for i in range(0, len(train), a.batch_size)]
    if impl == "prefixtune":
        shape = prefix_shape(base.config, a.prefix_len)
        enc = PrefixEncoder(shape, 512, 512)
        enc.reset("text", text_key_values(base, tok, "The following text is from Python's documentation.", shape))
        model = PrefixLM(base, enc.to(device)).to(device)
        if a.checkpointing:
            model.gradient_checkpointing(True)
        params = list(enc.parameters())

        def step(b):
            loss, _ = model(**b)
            return loss
    else:
        from peft import PrefixTuningConfig, get_peft_model

        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.prefix_len, prefix_projection=True,
                                 encoder_hidden_size=512)
        model = get_peft_model(base, cfg)
        model.prompt_encoder.to(DTYPES["fp32"])
        params = [p for p in model.parameters() if p.requires_grad]

        def step(b):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_tokens, t0 = 0, None
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        loss = step(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            n_tokens += int(b["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dt = time.perf_counter() - t0
    return {"impl": impl, "dtype": dtype, "checkpointing": a.checkpointing, "device": device,
            "tokens_per_s": n_tokens / dt, "s_per_step": dt / a.steps, "peak_mib": peak,
            "trainable_params": sum(p.numel() for p in params), "last_loss": float(loss)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--prefix_len", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=96)
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "train.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        impl, dtype = a.one.split(":")
        print(json.dumps(one(impl, dtype, a)))
        return 0
    rows = []
    configs = [(impl, dt, ck) for dt in a.dtypes.split(",") for impl, ck in
               (("prefixtune", False), ("peft", False), ("prefixtune", True))]
    for impl, dtype, ck in configs:
        cmd = [sys.executable, __file__, "--one", f"{impl}:{dtype}", "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--prefix_len", str(a.prefix_len), "--batch_size", str(a.batch_size),
               "--max_seq_len", str(a.max_seq_len)] + (["--model", a.model] if a.model else []) + \
              (["--checkpointing"] if ck else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            rows.append({"impl": impl, "dtype": dtype, "checkpointing": ck, "error": out.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {impl:<10} {dtype:<5} ckpt={ck!s:<5} {r['tokens_per_s']:8.0f} tok/s  {r['peak_mib']:8.0f} MiB",
              file=sys.stderr)
    print(f"\nprefix training, P={a.prefix_len}, batch {a.batch_size}, max_seq_len {a.max_seq_len}, "
          f"{a.steps} timed steps, device {rows[0].get('device', '?')}")
    print(f"{'impl':<11}{'dtype':<6}{'ckpt':<6}{'tokens/s':>10}{'s/step':>9}{'peak MiB':>10}{'trainable':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<11}{r['dtype']:<6}{str(r['checkpointing']):<6}  failed: {r['error']}")
            continue
        print(f"{r['impl']:<11}{r['dtype']:<6}{str(r['checkpointing']):<6}{r['tokens_per_s']:>10.0f}"
              f"{r['s_per_step']:>9.2f}{r['peak_mib']:>10.0f}{r['trainable_params']:>11,}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=2))
    print(f"\nwritten {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
