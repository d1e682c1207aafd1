"""The engine contract: what the HTTP layer (`serve/app.py`) and the REPL's batch mode ask of an engine, and the
checks every engine makes the same way.

    EngineClient        the Protocol: tasks (add, remove, list), requests (submit, cancel), lifecycle (start,
                        shutdown, errored), stats, max_context
    GenRequest          one generation request; on_token(token, None[, TokenLogprob]) per token, then
                        on_token(None, reason) once
    QueueFull, UnknownTask, EngineStopped      what submit / remove_task raise (HTTP 429, 404, 503)
    check_request, check_task                  the one validation of a request and of a task's table
    max_context                                the one rule for an engine's context length

An engine is a class that implements EngineClient; `serve/engine.py` (batched, two routes) and `serve/sequential.py`
(one request at a time) do, and tests/test_serve_engine.py runs every engine through this contract. Sampling is
`serve/sampling.py`, shared by both; the position budget is `prefix/positions.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..prefix.positions import absolute_position_limit, max_positions
from ..prefix.shapes import PrefixShape
from ..prefix.tasks import check_task_name
from .limits import MAX_LOGPROBS

DEFAULT_CONTEXT = 2048  # max_context when neither the model nor the engine's cache names one


@dataclass
class GenRequest:
    prompt_ids: list[int]
    task: str | None = None          # None = the bare base model
    max_new_tokens: int = 16
    temperature: float = 0.0         # 0 = greedy (as in vLLM)
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # a stop token ends the request ("stop"); emitted only with emit_stop_token
    top_k: int = 0                   # 0 = off
    # serve/sampling.py applies these (both engines, every route)
    min_p: float = 0.0               # 0 = off; drop ids less likely than min_p x the most likely one
    presence_penalty: float = 0.0    # OpenAI: minus this for every id generated at least once
    frequency_penalty: float = 0.0   # OpenAI: minus this x the id's count among the generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM: over prompt + generated ids, logit > 0 -> / r, else x r
    logprobs: int | None = None      # None: none; k >= 0: on_token(token, None, TokenLogprob) with the k best
    emit_stop_token: bool = False    # pass the stop token to on_token before on_token(None, "stop")


class QueueFull(Exception):
    """`submit` refused a request: the waiting queue already holds `max_queue` requests (HTTP 429)."""


class UnknownTask(KeyError):
    """`submit` or `remove_task` named a task that is not loaded (or is being removed)."""

    def __str__(self) -> str:  # KeyError would show the repr of its argument
        return str(self.args[0]) if self.args else "unknown task"


class EngineStopped(RuntimeError):
    """`submit` after `shutdown` began: the engine takes no new requests (HTTP 503)."""


# on_token(token_id, None) per generated token (on_token(token_id, None, logprob) when req.logprobs is not None, a
# serve.sampling.TokenLogprob), then once on_token(None, reason): one of these, or "error: <message>".
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


OnToken = Callable[..., None]


@runtime_checkable
class EngineClient(Protocol):
    """What every engine offers. Thread-safe; callbacks run on the engine's own thread."""

    max_context: int     # positions one sequence may take (prefix + prompt + new tokens - 1): the API's max_model_len
    max_batch_size: int  # requests decoding at once (1 for a sequential engine)

    def add_task(self, name: str, table: torch.Tensor, shape: PrefixShape, replace: bool = False) -> None:
        """Load a task's table [P, L*2*H_kv*D] (check_task first); effective for requests submitted after it."""

    def remove_task(self, name: str, timeout: float | None = None) -> bool:
        """Refuse new requests for `name` at once (UnknownTask if not loaded); True once its requests have ended,
        False if `timeout` passed first (it goes when its last request ends)."""

    def tasks(self) -> dict[str, PrefixShape]:
        """The loaded tasks that take requests."""

    def submit(self, req: GenRequest, on_token: OnToken) -> int:
        """Queue a request (check_request first); its id. Raises QueueFull, UnknownTask, EngineStopped, ValueError."""

    def cancel(self, request_id: int) -> None:
        """End a request; on_token(None, "cancelled") follows, unless it had ended already."""

    def start(self) -> None:
        """Start the engine thread (idempotent)."""

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain` finish the others (up to `timeout` s), else cancel them; then stop."""

    def stats(self) -> dict:
        """At least {"running": {task: n}, "waiting": {task: n}, "queue_size": n, "max_queue": n}."""

    @property
    def errored(self) -> str | None:
        """Why the engine stopped serving for good (its thread died), or None while it is healthy."""


def max_context(model, capacity: int | None = None) -> tuple[int, int | None, str]:
    """(an engine's max_context, the hard limit or None, the config field it comes from): a learned absolute position
    table (GPT-2) is a hard limit; else the config's position count, else the engine's cache capacity, else
    DEFAULT_CONTEXT."""
    hard = absolute_position_limit(model)
    positions, field = max_positions(model.config)
    return hard or positions or capacity or DEFAULT_CONTEXT, hard, field


def check_request(req: GenRequest, vocab_size: int) -> None:
    """ValueError for a request no engine can run: no prompt, token ids outside the vocabulary, no new tokens, or
    sampling parameters out of range (the API checks the same first, with its own words)."""
    ids = req.prompt_ids
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError("expected prompt_ids to be a non-empty list of token ids")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"expected prompt token ids in [0, {vocab_size})")
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        raise ValueError(f"expected max_new_tokens >= 1, got {req.max_new_tokens!r}")
    check_sampling(req)


def check_task(name: str, table: torch.Tensor, shape: PrefixShape, dims: tuple[int, int, int]) -> torch.Tensor:
    """The task's table as fp32 on the CPU, after the one check of every engine: the task-name rule, the shape
    against the model's (layers, kv heads, head dim) `dims`, finite values."""
    check_task_name(name, "add_task")
    have = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    if have != tuple(dims):
        raise ValueError(f"task {name!r}: prefix shape (layers, kv heads, head dim) {have} does not fit the "
                         f"model's {tuple(dims)}")
    if shape.prefix_len < 1 or tuple(table.shape) != (shape.prefix_len, shape.width):
        raise ValueError(f"task {name!r}: expected a table of shape {(shape.prefix_len, shape.width)}, "
                         f"got {tuple(table.shape)}")
    table = table.detach().float().cpu()
    if not torch.isfinite(table).all():
        raise ValueError(f"task {name!r}: the table holds NaN or infinity")
    return table


def check_sampling(req: GenRequest) -> None:
    """ValueError for sampling parameters no engine can honour (the API checks them first, with its own words)."""
    if not req.temperature >= 0 or math.isinf(req.temperature):
        raise ValueError(f"expected a finite temperature >= 0, got {req.temperature!r}")
    if not 0 < req.top_p <= 1:
        raise ValueError(f"expected 0 < top_p <= 1, got {req.top_p!r}")
    if not isinstance(req.top_k, int) or req.top_k < 0:
        raise ValueError(f"expected top_k >= 0, got {req.top_k!r}")
    if not 0 <= req.min_p <= 1:
        raise ValueError(f"expected 0 <= min_p <= 1, got {req.min_p!r}")
    if not req.repetition_penalty > 0 or math.isinf(req.repetition_penalty):
        raise ValueError(f"expected a finite repetition_penalty > 0, got {req.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(req, name)):
            raise ValueError(f"expected a finite {name}, got {getattr(req, name)!r}")
    if req.logprobs is not None and not (isinstance(req.logprobs, int) and 0 <= req.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"expected logprobs in [0, {MAX_LOGPROBS}] or None, got {req.logprobs!r}")
    if not all(isinstance(t, int) for t in req.stop_token_ids):
        raise ValueError("expected stop_token_ids to be token ids")
