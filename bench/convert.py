"""Peak memory and time of an FT export of a 3.6B-shaped GPT-NeoX (rinna japanese-gpt-neox-3.6b's shape).

    python bench/convert.py                       # 3.6B shape, fp16, tp 2, one prefix of length 10
    python bench/convert.py --scale 0.25          # a quarter of the layers, for a quick look

Random weights are written shard by shard (one layer per safetensors shard, never the whole model in memory),
then `python -m prefixtune.convert ft` runs in a child process whose peak RSS is the figure reported, and the export's files
are checked against config.ini. Needs ~2x the model size in free disk (7.2 GB each at 3.6B fp16).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RINNA_36B = dict(hidden_size=2816, num_attention_heads=22, num_hidden_layers=36, intermediate_size=11264,
                 vocab_size=32000, rotary_pct=1.0, use_parallel_residual=False, max_position_embeddings=2048,
                 bos_token_id=2, eos_token_id=3, layer_norm_eps=1e-5)


def write_checkpoint(folder: Path, cfg: dict) -> int:
    from transformers import GPTNeoXConfig

    folder.mkdir(parents=True)
    GPTNeoXConfig(**cfg).save_pretrained(folder)
    E, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    weight_map, n_params = {}, 0
    shards = [("embed", lambda: {"gpt_neox.embed_in.weight": rnd(V, E)})]
    for n in range(L):
        p = f"gpt_neox.layers.{n}."
        shards.append((f"layer{n}", lambda p=p: {
            p + "input_layernorm.weight": torch.ones(E).half(), p + "input_layernorm.bias": rnd(E),
            p + "post_attention_layernorm.weight": torch.ones(E).half(), p + "post_attention_layernorm.bias": rnd(E),
            p + "attention.query_key_value.weight": rnd(3 * E, E), p + "attention.query_key_value.bias": rnd(3 * E),
            p + "attention.dense.weight": rnd(E, E), p + "attention.dense.bias": rnd(E),
            p + "mlp.dense_h_to_4h.weight": rnd(I, E), p + "mlp.dense_h_to_4h.bias": rnd(I),
            p + "mlp.dense_4h_to_h.weight": rnd(E, I), p + "mlp.dense_4h_to_h.bias": rnd(E)}))
    shards.append(("head", lambda: {"gpt_neox.final_layer_norm.weight": torch.ones(E).half(),
                                    "gpt_neox.final_layer_norm.bias": rnd(E), "embed_out.weight": rnd(V, E)}))
    for i, (_, make) in enumerate(shards):
        tensors = make()
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        n_params += sum(t.numel() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return n_params


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the 36 layers to build")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--prefix_len", type=int, default=10)
    p.add_argument("--workdir", help="where to build (default: a temporary folder, removed afterwards)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "convert.json"))
    a = p.parse_args()
    cfg = dict(RINNA_36B, num_hidden_layers=max(1, round(36 * a.scale)))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ftbench"))
    try:
        t0 = time.time()
        n_params = write_checkpoint(work / "model", cfg)
        t_build = time.time() - t0

        from transformers import GPTNeoXConfig

        from prefixtune.prefix import prefix_shape
        from prefixtune.prefix.io import save_prefix

        shape = prefix_shape(GPTNeoXConfig(**cfg), a.prefix_len)
        save_prefix(work / "task.safetensors", torch.randn(a.prefix_len, shape.width) * 0.02, shape, task="task",
                    base_model="random-3.6b", architecture="gpt_neox")
        # The child reports VmHWM (peak RSS of its own address space); ru_maxrss would carry over this parent's
        # RSS across fork+exec. A first child that only imports gives the baseline.
        hwm = ("import re, runpy, sys\n"
               "mod, sys.argv = (sys.argv[1], sys.argv[1:]) if len(sys.argv) > 1 else (None, sys.argv)\n"
               "try:\n    runpy.run_module(mod, run_name='__main__', alter_sys=True) if mod "
               "else __import__('prefixtune.convert.ft_export')\nexcept SystemExit as e:\n    code = e.code\n"
               "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
               "file=sys.stderr)\n")
        base = subprocess.run([sys.executable, "-c", hwm], cwd=ROOT, capture_output=True, text=True, check=True)
        baseline_mib = int(base.stderr.split("VmHWM")[-1].split()[0]) / 1024
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", hwm, "prefixtune.convert", "ft", "--model", str(work / "model"), "--prefix",
                               str(work / "task.safetensors"), "--out", str(work / "ft"), "--tp", str(a.tp),
                               "--dtype", a.dtype], cwd=ROOT, capture_output=True, text=True)
        t_convert = time.time() - t0
        if proc.returncode != 0 or not (work / "ft" / f"{a.tp}-gpu").is_dir():
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        peak_mib = int(proc.stderr.split("VmHWM")[-1].split()[0]) / 1024

        from prefixtune.convert.ft_verify import check_files

        problems = check_files(work / "ft" / f"{a.tp}-gpu")
        out_bytes = sum(f.stat().st_size for f in (work / "ft" / f"{a.tp}-gpu").iterdir())
        row = {"params": n_params, "layers": cfg["num_hidden_layers"], "tp": a.tp, "dtype": a.dtype,
               "checkpoint_build_s": t_build, "convert_s": t_convert, "convert_peak_rss_mib": peak_mib,
               "import_baseline_rss_mib": baseline_mib, "model_size_mib": n_params * 2 / 2**20, "export_mib": out_bytes / 2**20,
               "file_check_problems": problems}
        print(f"\nFT export of a {n_params / 1e9:.2f}B-parameter GPT-NeoX ({cfg['num_hidden_layers']} layers, "
              f"hidden {cfg['hidden_size']}), tp {a.tp}, {a.dtype}, one prefix of length {a.prefix_len}")
        print(f"{'checkpoint (fp16)':<22}{row['model_size_mib']:>10.0f} MiB")
        print(f"{'export written':<22}{row['export_mib']:>10.0f} MiB")
        print(f"{'convert time':<22}{t_convert:>10.1f} s")
        print(f"{'convert peak RSS':<22}{peak_mib:>10.0f} MiB   (whole model: {row['model_size_mib']:.0f} MiB)")
        print(f"{'  of which imports':<22}{baseline_mib:>10.0f} MiB   (Python, torch, transformers)")
        print(f"{'  working memory':<22}{peak_mib - baseline_mib:>10.0f} MiB   (largest tensor and its copies)")
        print(f"{'file check':<22}{'ok' if not problems else problems[:3]}")
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(row, indent=2))
        print(f"written {a.json}")
        return 0 if not problems else 1
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
