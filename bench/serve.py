"""Serving throughput and latency: prefixtune's server with 0, 1 and 8 tasks, stock `transformers serve`, and
sequential `generate` calls, on the same model, prompts and load; then a load test with a bounded queue.

    python bench/serve.py                       # embedded SmolLM2-135M, 8 clients x 4 requests, 32 new tokens each
    python bench/serve.py --clients 8 --requests 6 --max_tokens 48 --json bench/results/serve.json

Each scenario starts a fresh server process on 127.0.0.1 and drives it with N concurrent `openai` async clients,
streaming (time to first token = first chunk with text). Output tokens/s = generated tokens / wall time of the
whole scenario. Every request asks for exactly --max_tokens tokens (`ignore_eos`), so scenarios generate the same
amount; stock `transformers serve` refuses `ignore_eos` (422), so its requests may stop at EOS, and its tokens/s
counts what it generated. Prefixes are text-initialised (the base's own keys/values for 8 different sentences, P=16), like a
freshly started training run: realistic tables, no training needed.

Server scenarios run --rounds times, interleaved; the table shows each scenario's median run and every round's
tokens/s (this shared 2-core machine drifts by 20 % over minutes, so one run per scenario can mislead).

Goals (issue 7): eight tasks mixed >= 0.9x one task; the server without prefixes >= 0.9x `transformers serve`;
>= 3x sequential `generate` at 8 concurrent clients; the load test (64 clients x 20 requests) loses nothing:
every request gets its answer or a 429.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prefixtune.train.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The following text is taken from the documentation of the Python programming language.",
         "Please answer politely and briefly.", "Translate the following sentence into French.",
         "Summarise the paragraph below in one sentence.", "Write the answer as a list of short points.",
         "Explain it to a ten-year-old.", "Answer in the style of a pirate.", "Reply with a single word."]
PROMPTS = ["The for statement is used to", "A list comprehension consists of", "The with statement wraps",
           "Exceptions are raised when", "A function definition defines", "The import statement finds",
           "Dictionaries map keys to", "A class definition creates"]


def prepare(a, work: Path) -> tuple[Path, list[Path]]:
    """A Hugging Face folder of the model (both servers load the same files) and 8 prefix files."""
    import torch

    from prefixtune.prefix import PrefixEncoder, prefix_shape, text_key_values
    from prefixtune.prefix.base import load_base
    from prefixtune.prefix.io import save_prefix
    from prefixtune.prefix.weights import save_plain_model

    base, tok, name = load_base(a.model, "fp32")
    model_dir = work / "model"
    save_plain_model(base, tok, model_dir)  # a GGUF base: its dequantized weights, as a plain folder
    prefixes = []
    for i, text in enumerate(TEXTS):
        shape = prefix_shape(base.config, 16)
        enc = PrefixEncoder(shape)
        enc.reset("text", text_key_values(base, tok, text, shape))
        with torch.no_grad():
            table = enc()
        path = work / f"task{i}.safetensors"
        save_prefix(path, table, shape, task=f"task{i}", base_model=str(model_dir), architecture=base.config.model_type)
        prefixes.append(path)
    return model_dir, prefixes


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s")


def start(cmd: list[str], port: int, ready_path: str, log: Path) -> subprocess.Popen:
    """A server process whose output goes to `log` (a pipe nobody reads fills up and blocks the server)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc, log)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(port: int, models: list[str], clients: int, requests: int, max_tokens: int,
                ignore_eos: bool = True) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
    ttft, tpot, tokens = [], [], 0

    async def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            k = c * requests + r
            t0 = time.perf_counter()
            first, n = None, 0
            stream = await client.completions.create(
                model=models[k % len(models)], prompt=PROMPTS[k % len(PROMPTS)], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True} if ignore_eos else None)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            end = time.perf_counter()
            tokens += n
            if first is not None:
                ttft.append(first - t0)
                if n > 1:
                    tpot.append((end - first) / (n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()  # inside the loop: closing it after asyncio.run ended raises "Event loop is closed"
    q = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else [ttft[0]] * 99
    return {"output_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": q[98], "tpot_mean_s": statistics.mean(tpot) if tpot else None}


def sequential(model_dir: Path, prefixes: list[Path], models: list[str], clients: int, requests: int,
               max_tokens: int) -> dict:
    """The same requests one at a time through prefixtune.prefix.generate (what a script without a server does)."""
    import torch

    from prefixtune.prefix.base import load_base
    from prefixtune.prefix.generate import Generator, Sampling

    torch.set_num_threads(os.cpu_count() or 1)
    base, tok, _ = load_base(str(model_dir), "fp32")
    gen = Generator(base, tok)
    for p in prefixes:
        gen.add_prefix(p)
    sampling = Sampling(max_new_tokens=max_tokens, greedy=True)
    t0, tokens = time.perf_counter(), 0
    for k in range(clients * requests):
        task = models[k % len(models)]
        gen.model.generation_config.eos_token_id = None  # ignore_eos, as the servers are asked
        out = gen.generate([PROMPTS[k % len(PROMPTS)]], None if task == "base" else task, sampling)
        tokens += max_tokens if out else 0
    wall = time.perf_counter() - t0
    return {"output_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


async def load_test(port: int, models: list[str], clients: int, requests: int) -> dict:
    """Non-streaming requests as fast as the clients can send them; every one must end in 200 or 429."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
    counts: dict[str, int] = {}

    async def one_client(c: int) -> None:
        for r in range(requests):
            try:
                out = await client.completions.create(model=models[(c + r) % len(models)], max_tokens=4,
                                                      prompt=PROMPTS[(c + r) % len(PROMPTS)], temperature=0)
                key = "200" if out.usage.completion_tokens > 0 else "200 without tokens"
            except openai.APIStatusError as e:
                key = str(e.status_code)
            except openai.APIError as e:
                key = f"transport: {type(e).__name__}"
            counts[key] = counts.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    await client.close()
    lost = sum(n for k, n in counts.items() if k not in ("200", "429"))
    return {"clients": clients, "requests": clients * requests, "by_status": counts, "lost": lost,
            "wall_s": time.perf_counter() - t0}


STOCK = "transformers serve (no prefix)"


def ours_run(a, ours: list[str], prefixes: list[Path], models: list[str], label: str, tmp: str) -> dict:
    port = free_port()
    proc = start([*ours, "--port", str(port), "--prefix", *map(str, prefixes)], port, "/health",
                 Path(tmp) / f"{label}.log")
    try:
        ids = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"]
        base_id = next(m["id"] for m in ids if not m.get("parent"))
        names = [base_id if m == "base" else m for m in models]
        asyncio.run(drive(port, names, 2, 1, 4))  # warm-up
        return asyncio.run(drive(port, names, a.clients, a.requests, a.max_tokens))
    finally:
        stop(proc)


def stock_run(a, model_dir: Path, tmp: str) -> dict:
    port = free_port()
    cmd = ["transformers", "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
           "--continuous-batching", "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[a.dtype], "--device", "cpu"]
    try:
        proc = start(cmd, port, "/health", Path(tmp) / "stock.log")
        try:
            # it refuses vLLM's ignore_eos (422): its requests may stop early; tok/s counts what they made
            asyncio.run(drive(port, [str(model_dir)], 2, 1, 4, ignore_eos=False))
            return asyncio.run(drive(port, [str(model_dir)], a.clients, a.requests, a.max_tokens, ignore_eos=False))
        finally:
            stop(proc)
    except Exception as e:  # noqa: BLE001 - report, do not hide: the table says it did not run
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its latencies with it), and every run's throughput."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["output_tok_s"])
    if not ok:
        return runs[-1]
    return {**ok[len(ok) // 2], "rounds_tok_s": [r["output_tok_s"] for r in runs if "error" not in r]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients per scenario")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max_tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="precision of both servers")
    p.add_argument("--skip_stock", action="store_true", help="leave out `transformers serve`")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each server scenario, interleaved; the table gives the median run")
    p.add_argument("--load_clients", type=int, default=64, help="load test: clients")
    p.add_argument("--load_requests", type=int, default=20, help="load test: requests per client")
    p.add_argument("--load_queue", type=int, default=16, help="load test: the server's --max_queue")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve.json"), help="where the results go")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    results: dict = {"config": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefixes = prepare(a, Path(tmp))
        tasks = [f"task{i}" for i in range(8)]
        ours = [sys.executable, "-m", "prefixtune.serve", "--model", str(model_dir), "--dtype", a.dtype,
                "--max_batch_size", str(max(16, a.clients))]
        scenarios = {"base only": ["base"], "one task": tasks[:1], "eight tasks round-robin": tasks}
        if not a.skip_stock:
            scenarios[STOCK] = None
        runs: dict[str, list[dict]] = {label: [] for label in scenarios}
        # Rounds interleave the scenarios (A B C D A B C D ...): this shared machine's speed drifts by 20 % over
        # minutes, so back-to-back repeats of one scenario would compare one period's speed against another's.
        for rnd in range(a.rounds):
            for label, models in scenarios.items():
                run = stock_run(a, model_dir, tmp) if models is None else ours_run(a, ours, prefixes, models, label, tmp)
                runs[label].append(run)
                if "error" in run:
                    print(f"round {rnd + 1}, {label}: did not run: {run['error']}", flush=True)
                else:
                    print(f"round {rnd + 1}, {label}: {run['output_tok_s']:.1f} tok/s", flush=True)
        for label, rs in runs.items():
            results[label] = median_run(rs)
        results["sequential generate (8 tasks)"] = sequential(model_dir, prefixes, tasks, a.clients, a.requests,
                                                              a.max_tokens)
        port = free_port()
        proc = start([*ours, "--port", str(port), "--max_queue", str(a.load_queue), "--log_level", "warning",
                      "--prefix", *map(str, prefixes)], port, "/health", Path(tmp) / "load.log")
        try:
            results["load test"] = asyncio.run(load_test(port, tasks, a.load_clients, a.load_requests))
        finally:
            stop(proc)
    report(results)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nwrote {a.json}")
    return 0


def report(r: dict) -> None:
    print(f"\n{'scenario':<34}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT':>9}  each round (tok/s)")
    for label, v in r.items():
        if label in ("config", "load test"):
            continue
        if "error" in v:
            print(f"{label:<34}  did not run: {v['error']}")
            continue
        ms = lambda x: f"{1000 * x:.0f} ms" if x is not None else "-"  # noqa: E731
        print(f"{label:<34}{v['output_tok_s']:>10.1f}{ms(v.get('ttft_p50_s')):>10}{ms(v.get('ttft_p99_s')):>10}"
              f"{ms(v.get('tpot_mean_s')):>9}  {' '.join(f'{x:.0f}' for x in v.get('rounds_tok_s', []))}")
    one, eight = r["one task"]["output_tok_s"], r["eight tasks round-robin"]["output_tok_s"]
    seq = r["sequential generate (8 tasks)"]["output_tok_s"]
    print(f"\neight tasks / one task: {eight / one:.2f}x (goal >= 0.9)")
    stock = r.get(STOCK, {})
    if "output_tok_s" in stock:
        print(f"ours without prefix / transformers serve: {r['base only']['output_tok_s'] / stock['output_tok_s']:.2f}x"
              " (goal >= 0.9)")
    print(f"eight tasks / sequential generate: {eight / seq:.2f}x (goal >= 3)")
    lt = r["load test"]
    print(f"load test: {lt['requests']} requests from {lt['clients']} clients: {lt['by_status']}, lost {lt['lost']} "
          f"(goal 0) in {lt['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
