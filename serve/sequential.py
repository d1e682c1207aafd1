"""`SequentialEngine`: the engine interface of `serve/engine.py`, one request at a time.

Requests wait in a FIFO queue and run one after another in a background thread, token by token over the prefix's
pre-filled KV cache (as `prefixtune.prefix.generate.Generator` does), so a request can be cancelled between two
tokens. Sampling (penalties, temperature, min-p, top-k, top-p, seeds, logprobs) is `serve/sampling.py`, the batched
engine's own sampler, so both engines give the same tokens and logprobs for the same request. It is the baseline of
`bench/serve.py` ("sequential generate calls") and lets the HTTP layer run without the batched engine.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from ..prefix.encoder import table_to_cache
from ..prefix.errors import one_line
from ..prefix.positions import budget_problem
from ..prefix.shapes import PrefixShape, base_dims
from ..prefix.tasks import BASE_TASK
from .contract import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStopped,
    GenRequest,
    QueueFull,
    UnknownTask,
    check_request,
    check_task,
    max_context,
)
from .sampling import RequestSampler, sample

log = logging.getLogger("prefixtune.serve")


@dataclass(eq=False)
class _Job:
    id: int
    req: GenRequest
    on_token: object
    key: str
    table: torch.Tensor | None
    shape: PrefixShape | None
    cancelled: bool = field(default=False)


class SequentialEngine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 256, route: str = "auto"):
        self.model, self.tok = model, tokenizer
        self.max_batch_size, self.max_queue, self.route = max_batch_size, max_queue, route  # batch size/route unused
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context, self.hard_limit, self.positions_field = max_context(model)
        self.dims = base_dims(model.config)
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.get_text_config().vocab_size)
        self._tasks: dict[str, tuple[torch.Tensor, PrefixShape]] = {}
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: _Job | None = None
        self._pending: Counter = Counter()        # task key -> requests waiting or running
        self._to_finish: list[tuple[_Job, str]] = []  # cancelled while waiting: finished by the engine thread
        self._ids = itertools.count(1)
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- tasks -------------------------------------------------------------------------------------------------
    def add_task(self, name: str, table: torch.Tensor, shape: PrefixShape, replace: bool = False) -> None:
        table = check_task(name, table, shape, self.dims).to(self.device)
        with self._cond:
            if name in self._tasks and not replace:
                raise ValueError(f"task {name!r} is already loaded")
            self._tasks[name] = (table, shape)

    def remove_task(self, name: str, timeout: float | None = None) -> bool:
        """Refuse new requests for `name` at once; return when its requests finished (False if `timeout` passed)."""
        with self._cond:
            if name not in self._tasks:
                raise UnknownTask(f"task {name!r} is not loaded")
            del self._tasks[name]
            return self._cond.wait_for(lambda: self._pending[name] == 0, timeout)

    def tasks(self) -> dict[str, PrefixShape]:
        with self._cond:
            return {name: shape for name, (_, shape) in self._tasks.items()}

    # --- requests ----------------------------------------------------------------------------------------------
    def submit(self, req: GenRequest, on_token) -> int:
        check_request(req, self.vocab_size)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if req.task is not None and req.task not in self._tasks:
                raise UnknownTask(f"task {req.task!r} is not loaded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue {self.max_queue})")
            table, shape = self._tasks[req.task] if req.task is not None else (None, None)
            problem = budget_problem(shape.prefix_len if shape else 0, len(req.prompt_ids), req.max_new_tokens,
                                     self.hard_limit, f"the model's {self.positions_field or 'position table'}")
            if problem:
                raise ValueError(problem)
            job = _Job(next(self._ids), req, on_token, req.task or BASE_TASK, table, shape)
            self._waiting.append(job)
            self._pending[job.key] += 1
            self._cond.notify_all()
            return job.id

    def cancel(self, request_id: int) -> None:
        with self._cond:
            if self._running is not None and self._running.id == request_id:
                self._running.cancelled = True
                return
            for job in self._waiting:
                if job.id == request_id:
                    self._waiting.remove(job)
                    self._to_finish.append((job, FINISH_CANCELLED))
                    self._cond.notify_all()
                    return

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="prefixtune-sequential-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish the queued and running ones (up to `timeout` seconds, then
        cancel what is left), else cancel them now. Returns when the engine thread has ended."""
        with self._cond:
            self._accepting = False
            if not drain:
                self._cancel_all_locked()
            if self._thread is not None and drain:
                if not self._cond.wait_for(lambda: not self._waiting and self._running is None, timeout):
                    self._cancel_all_locked()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:  # never started: nothing will run; tell every waiting request
            with self._cond:
                self._cancel_all_locked()
            self._finish_pending()

    def _cancel_all_locked(self) -> None:
        while self._waiting:
            self._to_finish.append((self._waiting.popleft(), FINISH_CANCELLED))
        if self._running is not None:
            self._running.cancelled = True
        self._cond.notify_all()

    @property
    def errored(self) -> str | None:
        return None  # a request's failure ends only that request; the loop itself does not die

    def stats(self) -> dict:
        with self._cond:
            waiting = Counter(job.key for job in self._waiting)
            running = Counter([self._running.key]) if self._running is not None else Counter()
            return {"running": dict(running), "waiting": dict(waiting), "queue_size": len(self._waiting),
                    "max_queue": self.max_queue}

    # --- the engine thread -------------------------------------------------------------------------------------
    def _emit(self, job: _Job, token, reason, logprob=None) -> bool:
        try:
            if logprob is None:
                job.on_token(token, reason)
            else:
                job.on_token(token, reason, logprob)
            return True
        except Exception:  # noqa: BLE001 - a broken callback cancels its own request, never the engine
            log.exception("on_token of request %d raised; cancelling it", job.id)
            job.cancelled = True
            return False

    def _done(self, job: _Job) -> None:
        with self._cond:
            self._pending[job.key] -= 1
            if self._pending[job.key] <= 0:
                del self._pending[job.key]
            if self._running is job:
                self._running = None
            self._cond.notify_all()

    def _finish_pending(self) -> None:
        with self._cond:
            todo, self._to_finish = self._to_finish, []
        for job, reason in todo:
            self._emit(job, None, reason)
            self._done(job)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._to_finish or self._stopping)
                job = None
                if self._waiting and not self._to_finish:
                    job = self._waiting.popleft()
                    self._running = job
                elif self._stopping and not self._waiting and not self._to_finish:
                    return
            self._finish_pending()
            if job is None:
                continue
            try:
                reason = self._generate(job)
            except Exception as e:  # noqa: BLE001 - one request's failure (OOM, a bad token id) ends only it
                log.exception("request %d failed", job.id)
                reason = f"error: {one_line(e)}"
            self._emit(job, None, reason)
            self._done(job)

    @torch.no_grad()
    def _generate(self, job: _Job) -> str:
        req, cfg = job.req, self.model.config
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        if job.table is not None:
            cache = table_to_cache(job.table, job.shape, 1, cfg, self.dtype)
            prefix_len = job.shape.prefix_len
        else:
            from transformers import DynamicCache

            cache, prefix_len = DynamicCache(config=cfg), 0
        mask = torch.ones(1, prefix_len + ids.shape[1], dtype=torch.long, device=self.device)
        sampler = RequestSampler(req, self.device)
        stop = set(req.stop_token_ids)
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for i in range(req.max_new_tokens):
            (token,) = sample(out.logits[:, -1], [sampler])
            if job.cancelled:
                return FINISH_CANCELLED
            if token in stop and not req.emit_stop_token:  # ends the request, not emitted (as in serve/engine.py)
                return FINISH_STOP
            if not self._emit(job, token, None, sampler.take(token)):
                return FINISH_CANCELLED
            if token in stop:
                return FINISH_STOP
            if i == req.max_new_tokens - 1:
                return FINISH_LENGTH
            self._finish_pending()  # requests cancelled while waiting do not wait for this one
            if job.cancelled:
                return FINISH_CANCELLED
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), attention_mask=mask,
                             past_key_values=out.past_key_values, use_cache=True)
        return FINISH_LENGTH
