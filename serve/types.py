"""What the server and an engine exchange: a generation request and the errors `Engine.submit` raises.

Both engines (`serve/engine.py`, the batched one, and `serve/sequential.py`, one request at a time) import these, so
the HTTP layer (`serve/app.py`) works with either.
"""
from __future__ import annotations

from dataclasses import dataclass


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
