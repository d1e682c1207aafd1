"""`prefix_inference`: talk to a base model with or without prefixes, or generate for a JSONL file of prompts.

    prefix_inference --prefix runs/smileface.safetensors            # REPL; :tasks, :task NAME, :base, :quit
    echo "The for statement" | prefix_inference --prefix a.safetensors --greedy   # one prompt per line
    prefix_inference --prefix a.safetensors b.safetensors --input prompts.jsonl --output out.jsonl
    prefix_inference --prefix a.safetensors --device_map auto --max_memory 0=14GiB,cpu=30GiB --offload_dir off/
    prefix_inference --prefix a.safetensors --quantize int8             # int8 weights (torchao), CPU or GPU
    python -m prefixtune.inference --model_type gpt-neox --pretrained_model_dir DIR \
        --prefix_checkpoint_path a.safetensors --decode_method nucleus --top_p 0.9     # the seed's flags

Input JSONL lines are {"prompt": ...} with an optional "task"; output lines add "completion".
Without --model the prefixes' own base model (header field base_model) is loaded; with --model, a prefix trained on
another model is refused unless --allow_other_base. Every error is one line on stderr, `error: ...`, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..prefix.errors import UserError, exits_on_error, one_line

# torch, transformers and the modules that import them load in the functions that use them, after parsing: --help
# answers at once (flags.py)
from ..prefix.flags import (  # noqa: F401
    DTYPE_NAMES,
    DefaultsOnceFormatter,
    add_device_flag,
    add_offload_flags,
    add_quantize_flag,
    default_device,
)

if TYPE_CHECKING:
    from ..prefix.generate import Generator, Sampling


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix_inference", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceFormatter)
    p.add_argument("--model", "--pretrained_model_dir", dest="model", default=None,
                   help="base model: HF folder or name, a .gguf file, or 'smollm2' (default: the base_model stored in "
                        "the --prefix files, else the embedded SmolLM2-135M)")
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
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="precision of the base model")
    add_device_flag(p)
    add_offload_flags(p)
    add_quantize_flag(p)
    p.add_argument("--input", help="JSONL of {\"prompt\", \"task\"?}: batch generation instead of the REPL")
    p.add_argument("--output", help="where batch generation writes JSONL (default: standard output)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch in batch generation")
    p.add_argument("--task", help="task for prompts without one (default: the first --prefix; 'base' = none)")
    p.add_argument("--allow_other_base", action="store_true",
                   help="run prefixes on a --model other than the base_model stored in their files")
    return p


def sampling_from(args) -> Sampling:
    from ..prefix.generate import Sampling

    s = Sampling(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k)
    if args.decode_method == "greedy":
        s.greedy = True
    elif args.decode_method == "sample":
        s.top_p = 1.0
    elif args.decode_method == "nucleus":
        s.top_k = 0
    return s


def stdin_lines(interactive: bool, prompt):
    """(line number, text) for each line of standard input; text is None for a line that is not valid UTF-8."""
    if interactive:
        try:  # input() decodes with stdin's errors setting: keep undecodable bytes as surrogates, then report them
            sys.stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError):
            pass
        n = 0
        while True:
            try:
                line = input(prompt())
            except EOFError:
                return
            n += 1
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield n, None
                continue
            yield n, line
    raw_lines = getattr(sys.stdin, "buffer", None)
    if raw_lines is None:  # stdin replaced by a text stream (tests, embedding)
        yield from ((n, line.rstrip("\r\n")) for n, line in enumerate(sys.stdin, 1))
        return
    for n, raw in enumerate(raw_lines, 1):  # bytes, decoded per line: one bad line does not end the session
        try:
            yield n, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield n, None


def repl(gen: Generator, task: str | None, sampling: Sampling, interactive: bool) -> None:
    import torch
    from transformers import TextStreamer

    out = sys.stdout
    if interactive:
        print(f"tasks: {', '.join(gen.tasks) or 'none'}; now: {task or 'base'}. "
              "Commands :tasks, :task NAME, :base, :quit. Ctrl+D ends.", file=sys.stderr)
    lines = stdin_lines(interactive, lambda: f"[{task or 'base'}]> ")
    while True:
        try:
            n, line = next(lines)
        except StopIteration:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        if line is None:
            print(f"line {n} is not valid UTF-8, skipped", file=sys.stderr)
            continue
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
            elif cmd == "task" and arg.strip() == "base":
                task = None
            elif cmd == "task":
                print(f"unknown task {arg.strip()!r}; loaded: {', '.join(gen.tasks) or 'none'}", file=sys.stderr)
            elif cmd in ("quit", "q", "exit"):
                break
            else:
                print(f"unknown command :{cmd}; use :tasks, :task NAME, :base, :quit", file=sys.stderr)
            continue
        # Count tokens before generating: a 100k-character line would otherwise allocate gigabytes first.
        n_tokens = len(gen.tok(line, add_special_tokens=False)["input_ids"])
        problem = gen.length_problem(n_tokens, task, sampling.max_new_tokens, absolute_only=False)
        if problem:
            print(f"line {n} skipped: {problem}", file=sys.stderr)
            continue
        try:
            streamer = TextStreamer(gen.tok, skip_prompt=True, skip_special_tokens=True)
            gen.generate([line], task, sampling, streamer=streamer)
        except KeyboardInterrupt:  # stop this generation, keep the session
            print(file=out)
        except (ValueError, torch.OutOfMemoryError) as e:
            print(f"line {n} skipped: {one_line(e)}", file=sys.stderr)
        out.flush()


def read_prompt_lines(path: str) -> list[tuple[int, dict]]:
    """(line number, {"prompt", "task"?}) for each non-blank line of a JSONL file; UserError on a bad line."""
    from ..data.jsonl import DataError, iter_json_lines

    rows = []
    try:
        for n, obj in iter_json_lines(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{path}:{n}: expected an object with a string field 'prompt'")
            rows.append((n, obj))
    except DataError as e:
        raise UserError(f"{e}") from None
    return rows


def stop_tokens(model) -> tuple[int, ...]:
    """The tokens that end generation as model.generate would end it: the generation config's eos token(s)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(int(t) for t in eos if t is not None and int(t) >= 0)


def generate_rows(gen: Generator, rows: list[dict], sampling: Sampling, batch_size: int, where: list[str]) -> list[str]:
    """Complete every row ({"prompt", "task"}, task None = base) through the serving engine: rows of all tasks share
    the batches (up to `batch_size` running at once; a finished row's place goes to the next one at once).
    Sampling draws from one generator per row, seeded from torch's global generator (--seed), so a row's
    completion does not depend on the rows around it."""
    import torch
    from tqdm import tqdm

    from ..serve.engine import Engine, GenRequest, QueueFull
    from ..serve.threads import in_passing_thread

    engine = in_passing_thread(Engine, gen.model, gen.tok, max_batch_size=batch_size, max_queue=max(1, len(rows)))
    for name, (table, shape) in gen.tasks.items():
        in_passing_thread(engine.add_task, name, table, shape)
    stop = stop_tokens(gen.model)
    seeds = torch.randint(0, 2**62, (len(rows),)).tolist()
    outs: list[list[int]] = [[] for _ in rows]
    ends: list[str | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="generate", unit="prompt", file=sys.stderr)

    def collector(i):
        def on_token(token, reason):
            if token is not None:
                outs[i].append(token)
            else:
                ends[i] = reason
                bar.update(1)
        return on_token

    try:
        for i, (row, at) in enumerate(zip(rows, where)):
            ids = gen.tok(row["prompt"], add_special_tokens=False)["input_ids"]
            if not ids:
                raise UserError(f"{at}: the prompt is empty (no tokens): give some text")
            req = GenRequest(ids, task=row["task"], max_new_tokens=sampling.max_new_tokens,
                             temperature=0.0 if sampling.greedy else sampling.temperature, top_p=sampling.top_p,
                             top_k=sampling.top_k or 0, seed=seeds[i], stop_token_ids=stop)
            try:
                engine.submit(req, collector(i))
            except (ValueError, QueueFull) as e:
                raise UserError(f"{at}: {one_line(e)}") from None
        engine.start()
        engine.shutdown(drain=True)  # returns once every row has finished
    finally:
        engine.shutdown(drain=False)
        bar.close()
    for at, end in zip(where, ends):
        if end is None or end.startswith("error") or end == "cancelled":
            raise UserError(f"{at}: generation failed ({end or 'no result'})")
    # as Generator.generate: max_new_tokens can cut a character that spans several tokens; drop the incomplete tail
    return [gen.tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd") for ids in outs]


def batch(gen: Generator, rows: list[dict], default_task, sampling: Sampling, batch_size: int, output,
          where: list[str] | None = None) -> None:
    """Generate for every row; `where` names each row in errors (default: 'prompt N')."""
    from ..prefix.io import atomic_path

    where = where or [f"prompt {i + 1}" for i in range(len(rows))]
    for row, at in zip(rows, where):
        t = row.get("task", default_task)
        row["task"] = None if t in (None, "base") else t
        if row["task"] is not None and row["task"] not in gen.tasks:
            raise UserError(f"{at}: task {t!r} is not loaded; loaded: {', '.join(gen.tasks) or 'none'}")
        # Refuse before generating anything, against the model's positions as the REPL does (past an absolute
        # position table generation would crash midway); the engine's cache size is its own business.
        n_tokens = len(gen.tok(row["prompt"], add_special_tokens=False)["input_ids"])
        problem = gen.length_problem(n_tokens, row["task"], sampling.max_new_tokens, absolute_only=False)
        if problem:
            raise UserError(f"{at}: {problem}")
    completions = generate_rows(gen, rows, sampling, batch_size, where)
    for row, text in zip(rows, completions):
        row["completion"] = text
    text = "".join(json.dumps({**r, "task": r["task"] or "base"}, ensure_ascii=False) + "\n" for r in rows)
    if output:
        with atomic_path(output) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _refused(e: BaseException | str) -> UserError:
    return UserError(one_line(e, limit=None))


@exits_on_error()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch  # only now: --help and a bad flag answer without it

    from ..prefix.base import load_base, load_config
    from ..prefix.generate import Generator
    from ..prefix.io import check_prefixes, choose_model
    from ..prefix.offload import offload_options
    from ..prefix.resolve import is_default_model
    from ..prefix.tasks import BASE_TASK, load_prefixes, task_of
    from ..serve.threads import in_passing_thread

    args.device = args.device or default_device()
    if args.max_new_tokens < 1:
        raise UserError(f"expected --max_new_tokens of at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"expected --batch_size of at least 1, got {args.batch_size}")
    torch.manual_seed(args.seed)
    try:
        placement = offload_options(args.device_map, args.max_memory, args.offload_dir)
        loaded = load_prefixes(args.prefix)
        names = [task_of(path, meta) for path, (_, _, meta) in loaded]
        task = args.task if args.task is not None else (names[0] if names else None)
        task = None if task == BASE_TASK else task
        if task is not None and task not in names:
            raise ValueError(f"--task {task!r} is not among the loaded prefixes: {', '.join(names) or 'none'}; "
                             "pass one of them, or base")
        model = choose_model(args.model, loaded)
    except (ValueError, FileNotFoundError) as e:
        raise _refused(e) from None
    try:
        config = load_config(model)
    except (ValueError, FileNotFoundError) as e:
        if args.model is None and loaded and not is_default_model(model):
            raise _refused(f"--model not given, so the base model comes from {loaded[0][0]}'s header (base_model "
                         f"{model}), which cannot be used: {e}; pass --model with the model it was trained on"
                         ) from None
        raise _refused(e) from None
    try:
        for warning in check_prefixes(loaded, config, model, args.model is not None, args.allow_other_base):
            print(f"warning: {warning}", file=sys.stderr)
        device_map, max_memory, offload_dir = placement
        # in a thread that ends with it: no OpenMP pool left beside the batch engine's (serve/engine.py)
        base, tok, _ = in_passing_thread(load_base, model, args.dtype, args.device, config=config,
                                         device_map=device_map, max_memory=max_memory, offload_dir=offload_dir,
                                         log=lambda line: print(line, file=sys.stderr), quantize=args.quantize)
    except (ValueError, FileNotFoundError) as e:
        raise _refused(e) from None
    gen = Generator(base, tok)
    try:
        for path, prefix in loaded:
            in_passing_thread(gen.add_prefix, path, loaded=prefix)
    except (ValueError, FileNotFoundError) as e:
        raise _refused(e) from None
    sampling = sampling_from(args)
    if args.input:
        numbered = read_prompt_lines(args.input)
        batch(gen, [row for _, row in numbered], task, sampling, args.batch_size, args.output,
              where=[f"{args.input}:{n}" for n, _ in numbered])
    else:
        repl(gen, task, sampling, interactive=sys.stdin.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
