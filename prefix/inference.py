"""`prefix_inference`: talk to a base model with or without prefixes, or generate for a JSONL file of prompts.

    prefix_inference --prefix runs/smileface.safetensors            # REPL; :tasks, :task NAME, :base, :quit
    echo "The for statement" | prefix_inference --prefix a.safetensors --greedy   # one prompt per line
    prefix_inference --prefix a.safetensors b.safetensors --input prompts.jsonl --output out.jsonl
    python -m prefixtune.prefix.inference --model_type gpt-neox --pretrained_model_dir DIR \
        --prefix_checkpoint_path a.safetensors --decode_method nucleus --top_p 0.9     # the seed's flags

Input JSONL lines are {"prompt": ...} with an optional "task"; output lines add "completion".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .base import DTYPES, load_base
from .generate import Generator, Sampling
from .io import atomic_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix_inference", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "--pretrained_model_dir", dest="model", default=None,
                   help="base model: HF folder or name, a .gguf file, or 'smollm2' (default: embedded SmolLM2-135M)")
    p.add_argument("--model_type", choices=["gpt-neox", "gpt"], help="seed compatibility; the model's config decides")
    p.add_argument("--prefix", "--prefix_checkpoint_path", dest="prefix", nargs="*", default=[],
                   help="prefix .safetensors file(s); none = the bare base model")
    p.add_argument("--max_new_tokens", "--max_output_len", dest="max_new_tokens", type=int, default=64,
                   help="tokens to generate per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --decode_method greedy)")
    p.add_argument("--decode_method", choices=["greedy", "sample", "nucleus"], default=None,
                   help="seed compatibility: greedy; sample (temperature, top-k, no top-p); nucleus (top-p)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling: keep the smallest set of tokens "
                                                             "whose probability reaches this")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the base model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--input", help="JSONL of {\"prompt\", \"task\"?}: batch generation instead of the REPL")
    p.add_argument("--output", help="where batch generation writes JSONL (default: standard output)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch in batch generation")
    p.add_argument("--task", help="task for prompts without one (default: the first --prefix; 'base' = none)")
    return p


def sampling_from(args) -> Sampling:
    s = Sampling(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k)
    if args.decode_method == "greedy":
        s.greedy = True
    elif args.decode_method == "sample":
        s.top_p = 1.0
    elif args.decode_method == "nucleus":
        s.top_k = 0
    return s


def repl(gen: Generator, task: str | None, sampling: Sampling, interactive: bool) -> None:
    from transformers import TextStreamer

    out = sys.stdout
    if interactive:
        print(f"tasks: {', '.join(gen.tasks) or 'none'}; now: {task or 'base'}. "
              "Commands :tasks, :task NAME, :base, :quit. Ctrl+D ends.", file=sys.stderr)
    while True:
        try:
            line = input(f"[{task or 'base'}]> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith(":"):
            cmd, _, arg = line[1:].partition(" ")
            if cmd == "tasks":
                print("\n".join(f"{'*' if t == task else ' '} {t}" for t in ["base", *gen.tasks]), file=out)
            elif cmd == "base":
                task = None
            elif cmd == "task" and arg.strip() in gen.tasks:
                task = arg.strip()
            elif cmd == "task":
                print(f"unknown task {arg.strip()!r}; loaded: {', '.join(gen.tasks) or 'none'}", file=sys.stderr)
            elif cmd in ("quit", "q", "exit"):
                break
            else:
                print(f"unknown command :{cmd}; use :tasks, :task NAME, :base, :quit", file=sys.stderr)
            continue
        try:
            streamer = TextStreamer(gen.tok, skip_prompt=True, skip_special_tokens=True)
            gen.generate([line], task, sampling, streamer=streamer)
        except KeyboardInterrupt:  # stop this generation, keep the session
            print(file=out)
        out.flush()


def read_prompts(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise SystemExit(f"{path}:{n}: expected an object with a string field 'prompt'")
            rows.append(obj)
    return rows


def batch(gen: Generator, rows: list[dict], default_task, sampling: Sampling, batch_size: int, output) -> None:
    from tqdm import tqdm

    for row in rows:
        t = row.get("task", default_task)
        row["task"] = None if t in (None, "base") else t
        if row["task"] is not None and row["task"] not in gen.tasks:
            raise SystemExit(f"prompt {row['prompt'][:40]!r} asks for task {t!r}; loaded: {', '.join(gen.tasks)}")
    by_task: dict = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row["task"], []).append(i)
    with tqdm(total=len(rows), desc="generate", unit="prompt", file=sys.stderr) as bar:
        for t, idx in by_task.items():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                for i, text in zip(chunk, gen.generate([rows[i]["prompt"] for i in chunk], t, sampling)):
                    rows[i]["completion"] = text
                bar.update(len(chunk))
    text = "".join(json.dumps({**r, "task": r["task"] or "base"}, ensure_ascii=False) + "\n" for r in rows)
    if output:
        with atomic_path(output) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    base, tok, _ = load_base(args.model, args.dtype, args.device)
    gen = Generator(base, tok)
    try:
        names = [gen.add_prefix(p) for p in args.prefix]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    task = args.task if args.task is not None else (names[0] if names else None)
    task = None if task == "base" else task
    if task is not None and task not in gen.tasks:
        raise SystemExit(f"--task {task!r} is not among the loaded prefixes: {', '.join(names) or 'none'}")
    sampling = sampling_from(args)
    if args.input:
        batch(gen, read_prompts(args.input), task, sampling, args.batch_size, args.output)
    else:
        repl(gen, task, sampling, interactive=sys.stdin.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
