"""The choices of one request as OpenAI responses: n choices per prompt, several prompts, logprobs, usage.

A request becomes one engine request (`app._Run`) per choice, in OpenAI's order for batched prompts: choice index =
prompt_i x n + j. With a seed, choice j samples with seed + j (as vLLM's n > 1), so every choice is reproducible and
the choices differ. `collect` waits for all of them (non-streamed), `stream` interleaves their chunks as they come.

Usage: prompt_tokens counts each prompt once (not once per choice, as vLLM), completion_tokens every generated token
of every choice, a stop token included (as vLLM). prompt_tokens_details.cached_tokens is always 0: no prompt token is
ever served from a cache here (block sharing is off on the paged route, the padded route and the sequential engine
recompute every prompt). A task's prefix fills P positions from precomputed keys/values, but those are not prompt
tokens and are counted nowhere in usage.

Logprobs are the engine's `TokenLogprob`s (serve/sampling.py: log-softmax of the raw logits, prefix included, before
penalties and temperature, vLLM's "raw_logprobs"), one per generated token, in OpenAI's two shapes:
  completions  {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}: each dict holds the
               sampled token and the `logprobs` most likely ones (as vLLM); text_offset adds up token lengths
  chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}: the
               `top_logprobs` most likely tokens, best first
A token is `tokenizer.decode([id])` (special tokens kept, as vLLM), or "token_id:N" with vLLM's
return_tokens_as_token_ids; -inf is written -9999.0.
"""
from __future__ import annotations

import asyncio
import json

from .sampling import LOGPROB_FLOOR, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}


class TokenStrings:
    """Token id -> its text alone, cached (logprobs name every alternative token)."""

    def __init__(self, tokenizer, limit: int = 1 << 16):
        self.tok, self.limit, self.cache = tokenizer, limit, {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.tok.decode([token]) or ""
            if len(self.cache) < self.limit:
                self.cache[token] = text
        return text


def _lp(x: float) -> float:
    return max(x, LOGPROB_FLOOR)


def completion_logprobs(entries: list[TokenLogprob], text, offset: int = 0) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for e in entries:
        token = text(e.token)
        tokens.append(token)
        token_logprobs.append(_lp(e.logprob))
        top = {token: _lp(e.logprob)}
        for tid, lp in e.top:
            top.setdefault(text(tid), _lp(lp))
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], text) -> dict:
    def item(tid: int, lp: float) -> dict:
        token = text(tid)
        return {"token": token, "logprob": _lp(lp), "bytes": list(token.encode("utf-8", errors="replace"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def as_ids(token: int) -> str:
    """vLLM's return_tokens_as_token_ids: a token named by its id."""
    return f"token_id:{token}"


def logprobs_of(run, kind: str, text, stream: bool = False) -> dict | None:
    """The run's logprobs not handed out yet (all of them unless streaming), or None if it asked for none. `text`
    names a token (TokenStrings, or as_ids)."""
    if run.gen.logprobs is None:
        return None
    start = run.lp_sent if stream else 0
    entries = run.logprobs[start:]
    if stream:
        run.lp_sent = len(run.logprobs)
    if kind == "chat":
        return chat_logprobs(entries, text)
    out = completion_logprobs(entries, text, run.lp_offset if stream else 0)
    if stream and out["tokens"]:
        run.lp_offset = out["text_offset"][-1] + len(out["tokens"][-1])
    return out


async def collect(runs, disconnected) -> list[str] | None:
    """The whole text of every run; None if the client disconnected first (`disconnected()` returned)."""
    async def consume(run):
        return "".join([piece async for piece in run.pieces()])

    everything = asyncio.ensure_future(asyncio.gather(*(consume(run) for run in runs)))
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({everything, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not everything.done():
            everything.cancel()
    if not everything.done() or everything.cancelled():
        return None
    return everything.result()


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def stream(runs, kind: str, rid: str, created: int, model: str, text, *, include_usage: bool,
                 continuous_usage: bool, prompt_tokens: int, error_body):
    """Server-sent events in OpenAI's chunk format, the choices interleaved as their text comes, ending with
    `data: [DONE]`. With continuous_usage (and include_usage), every chunk carries its choice's usage so far. A client
    that disconnects cancels every choice (Starlette cancels this generator; `finally` tells the engine)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    continuous_usage = continuous_usage and include_usage

    def chunk(run, piece: str | None, finish: str | None, role: bool = False) -> str:
        logprobs = None if role else logprobs_of(run, kind, text, stream=True)
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            choice = {"index": run.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": run.index, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
        extra = {}
        if continuous_usage:
            extra = {"usage": usage(len(run.gen.prompt_ids), run.completion_tokens)}
        elif include_usage:
            extra = {"usage": None}
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra})

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(run):
        try:
            async for piece in run.pieces():
                merged.put_nowait((run, piece))
        finally:
            merged.put_nowait((run, None))

    tasks = []
    try:
        if kind == "chat":
            for run in runs:
                yield chunk(run, None, None, role=True)
        tasks = [asyncio.ensure_future(pump(run)) for run in runs]
        left, failed = len(runs), False
        while left:
            run, piece = await merged.get()
            if piece is not None:
                yield chunk(run, piece, None)
                continue
            left -= 1
            if run.error is not None:
                yield _sse(error_body(run))
                failed = True
                break
            yield chunk(run, None, run.finish)
        if include_usage and not failed:
            yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": usage(prompt_tokens, sum(run.completion_tokens for run in runs))})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.close()
