"""The OpenAI-compatible HTTP API over an engine: vLLM's surface, where `model` picks a task.

    POST /v1/completions, POST /v1/chat/completions     model = a task name, or the base id (or "base") for none
    GET  /v1/models, GET /v1/models/{id}                the base and every task (parent = the base id)
    POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}   a prefix file becomes a task
    POST /v1/unload_lora_adapter {"lora_name"}          returns once the task's in-flight requests finished
    GET  /health (200, 503 while draining), GET /metrics (Prometheus)

`create_app(engine, tokenizer, base_id, options)` builds it; the engine runs in its own thread and reports each token
through `on_token`, which `loop.call_soon_threadsafe` puts on the request's asyncio queue. Errors are OpenAI's JSON:
400 bad body or field, prompt too long, unsupported field; 401 API key; 404 unknown model; 429 queue full; 503
draining; 500 an engine error (only that request's).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixtune.prefix.base import one_line
from prefixtune.prefix.io import BASE_TASK, check_base_model, check_compatible, check_task_name, load_prefix

from .detok import IncrementalDetokenizer, StopText
from .engine import in_passing_thread
from .metrics import Metrics
from .protocol import (ApiError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest,
                       parse)
from .types import EngineStopped, GenRequest, QueueFull, UnknownTask

log = logging.getLogger("prefixtune.serve")
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")  # what --prefix_dir accepts as a file's task name


@dataclass
class ServeOptions:
    model_ref: str | None = None       # the base as --model names it (None = the embedded default): check_base_model
    config: Any = None                 # the base model's config: check_compatible (prefix shapes)
    api_key: str | None = None         # required as "Authorization: Bearer KEY" on /v1/* when set
    prefix_dir: str | None = None      # DIR/<task>.safetensors becomes a task on its first request
    load_from: tuple[str, ...] = ()    # folders load_lora_adapter may read from (besides prefix_dir)
    allow_other_base: bool = False     # accept prefixes trained on another base_model (shapes still checked)
    max_model_len: int | None = None   # cap on engine.max_context
    drain_timeout: float = 30.0        # seconds shutdown waits for in-flight requests
    stop_token_ids: tuple[int, ...] | None = None  # end of sequence ids (None: the tokenizer's eos)
    vocab_size: int | None = None      # token ids a prompt may hold (None: the config's, else the tokenizer's)
    sources: dict[str, str] = field(default_factory=dict)  # task -> the file it came from (for /v1/models)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Run:
    """One request inside the engine: its token queue, incremental text, stop strings, timing and metrics."""

    def __init__(self, state: "ServeState", gen: GenRequest, task_label: str, stops: list[str], arrived: float):
        self.state, self.gen, self.label, self.arrived = state, gen, task_label, arrived
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = IncrementalDetokenizer(state.tok, gen.prompt_ids)
        self.text = StopText(stops)
        self.completion_tokens = 0
        self.finish: str | None = None   # OpenAI finish_reason once known
        self.error: str | None = None
        self.engine_done = False
        self.closed = False
        self.last_token: float | None = None
        loop = asyncio.get_running_loop()

        def on_token(token, reason):  # the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (token, reason))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.rid = state.engine.submit(gen, on_token)  # QueueFull, UnknownTask, EngineStopped, ValueError
        state.metrics.prompt_tokens.labels(task_label).inc(len(gen.prompt_ids))

    async def pieces(self):
        """The text as it becomes final; sets self.finish (and self.error) before it ends."""
        m = self.state.metrics
        while True:
            token, reason = await self.queue.get()
            if token is not None:
                now = time.perf_counter()
                if self.last_token is None:
                    m.ttft.labels(self.label).observe(now - self.arrived)
                else:
                    m.tpot.labels(self.label).observe(now - self.last_token)
                self.last_token = now
                self.completion_tokens += 1
                m.generation_tokens.labels(self.label).inc()
                out, stopped = self.text.push(self.detok.add(token))
                if out:
                    yield out
                if stopped:
                    self.finish = "stop"
                    self.state.engine.cancel(self.rid)
                    return
                continue
            self.engine_done = True
            out, stopped = self.text.push(self.detok.flush())
            out += "" if stopped else self.text.flush()
            if out:
                yield out
            if stopped or reason == "stop":
                self.finish = "stop"
            elif reason == "length":
                self.finish = "length"
            elif reason == "cancelled":
                self.finish = "abort"
            else:
                detail = str(reason).removeprefix("error:").strip() or "engine error"
                ref = f"err-{uuid.uuid4().hex[:12]}"
                log.error("request %s (%s) failed: %s", ref, self.label, detail)
                self.finish, self.error = "error", f"{ref}, the server log has the details"
            return

    def close(self) -> None:
        """Always called once the response is over (or the client left): cancel what still runs, count it."""
        if self.closed:
            return
        self.closed = True
        if not self.engine_done and self.finish is None:
            self.state.engine.cancel(self.rid)
        status = self.finish or "cancelled"
        m = self.state.metrics
        m.requests.labels(self.label, status).inc()
        if self.finish is not None:
            m.e2e.labels(self.label).observe(time.perf_counter() - self.arrived)

    def usage(self) -> dict:
        n = len(self.gen.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}


class ServeState:
    def __init__(self, engine, tokenizer, base_id: str, options: ServeOptions):
        self.engine, self.tok, self.base_id, self.options = engine, tokenizer, base_id, options
        self.metrics = Metrics(engine)
        self.draining = False
        self.inflight = 0
        self.created = int(time.time())
        self.sources = options.sources
        self._locks: dict[str, asyncio.Lock] = {}
        stop = options.stop_token_ids
        if stop is None:
            stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        self.stop_token_ids = tuple(stop)
        self.vocab_size = options.vocab_size or getattr(options.config, "vocab_size", None) or len(tokenizer)

    @property
    def max_context(self) -> int:
        ctx = self.engine.max_context
        return min(ctx, self.options.max_model_len) if self.options.max_model_len else ctx

    # --- draining ----------------------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """From now on /v1/* and /health answer 503; requests already accepted go on."""
        self.draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no accepted request is left (True), or `timeout` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.inflight > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- tasks -------------------------------------------------------------------------------------------------
    def reserved(self, name: str) -> bool:
        return name in (BASE_TASK, self.base_id)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _read_checked(self, name: str, path: str):
        """Read a prefix file and check it against the served base (a worker thread: it reads the file). Everything
        is checked on the header before the table is read."""
        other = []

        def check(shape, meta):
            check_task_name(path, name)
            if self.options.config is not None:
                check_compatible(path, shape, meta, self.options.config)
            if shape.prefix_len >= self.max_context:
                raise ValueError(f"{path}: prefix length {shape.prefix_len} leaves no room in this model's "
                                 f"{self.max_context} positions")
            if not check_base_model(path, meta, self.options.model_ref, self.options.allow_other_base):
                other.append(meta.get("base_model") or "smollm2")

        table, shape, _ = load_prefix(path, check)
        if other:
            log.warning("%s was trained on %s; serving it on %s (--allow_other_base)", path, other[0], self.base_id)
        return table, shape

    async def load_task(self, name: str, path: str, replace: bool = False) -> None:
        if self.reserved(name):
            raise ApiError(400, f"task name {name!r} is reserved: it means the base model without a prefix",
                           param="lora_name")
        async with self._lock(name):
            if name in self.engine.tasks() and not replace:
                raise ApiError(400, f"task {name!r} is already loaded (from {self.sources.get(name, '?')}); "
                               "unload it first or pass load_inplace=true", param="lora_name")
            try:
                table, shape = await asyncio.to_thread(in_passing_thread, self._read_checked, name, path)
                await asyncio.to_thread(in_passing_thread, self.engine.add_task, name, table, shape, replace)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise ApiError(400, f"cannot load task {name!r}: {one_line(e)}", param="lora_path") from None
            self.sources[name] = str(path)
        log.info("task %s loaded from %s", name, path)

    def check_load_path(self, path: str) -> None:
        """load_lora_adapter reads files on the server: only inside --prefix_dir or a --load_from folder (after
        resolving links and '..'), so an API key holder cannot make the server read arbitrary paths."""
        roots = [r for r in (self.options.prefix_dir, *self.options.load_from) if r]
        if not roots:
            raise ApiError(403, "loading prefixes by path is off on this server: start it with --load_from DIR "
                           "(or --prefix_dir DIR) to allow files in DIR", param="lora_path", type="permission_error")
        target = Path(path).expanduser().resolve()
        if not any(target.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
            raise ApiError(403, f"lora_path {path} is outside the folders this server loads from "
                           f"({', '.join(roots)}); move the file there or add its folder with --load_from",
                           param="lora_path", type="permission_error")

    def dir_file(self, name: str) -> Path | None:
        """--prefix_dir's file for task `name`, if there is one."""
        d = self.options.prefix_dir
        if not d or not TASK_NAME.fullmatch(name) or ".." in name or self.reserved(name):
            return None
        path = Path(d) / f"{name}.safetensors"
        return path if path.is_file() else None

    async def resolve(self, name: str) -> str | None:
        """A request's `model` -> the engine's task (None = the base model); 404 if there is no such model."""
        if self.reserved(name):
            return None
        if name in self.engine.tasks():
            return name
        path = self.dir_file(name)
        if path is not None:
            async with self._lock(name):
                loaded = name in self.engine.tasks()
            if not loaded:
                try:
                    await self.load_task(name, str(path))
                except ApiError as e:
                    if name not in self.engine.tasks():  # another request may have loaded it meanwhile
                        raise ApiError(400, e.message, param="model") from None
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def model_cards(self) -> list[dict]:
        def card(mid, root, parent):
            return {"id": mid, "object": "model", "created": self.created, "owned_by": "prefixtune", "root": root,
                    "parent": parent, "max_model_len": self.max_context}

        cards = [card(self.base_id, self.options.model_ref or self.base_id, None)]
        tasks = self.engine.tasks()
        cards += [card(name, self.sources.get(name), self.base_id) for name in tasks]
        if self.options.prefix_dir and Path(self.options.prefix_dir).is_dir():
            for path in sorted(Path(self.options.prefix_dir).glob("*.safetensors")):
                if path.stem not in tasks and self.dir_file(path.stem) is not None:
                    cards.append(card(path.stem, str(path), self.base_id))
        return cards

    # --- generation --------------------------------------------------------------------------------------------
    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"expected one prompt per request, got {len(prompt)}; send them as separate "
                               "requests (they are batched on the server)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tok(prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token ids must lie in [0, {self.vocab_size}), got {bad[:5]}",
                               param="prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty: expected at least one token", param="prompt")
        return ids

    def chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, f"the tokenizer of {self.base_id} has no chat template, so /v1/chat/completions "
                           "cannot format messages: use /v1/completions, or start the server with --chat_template",
                           param="messages")
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, raise_exception() in the template, ...
            raise ApiError(400, f"the chat template cannot format these messages: {one_line(e)}",
                           param="messages") from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the formatted chat is empty", param="messages")
        return ids

    async def start(self, body, prompt_ids: list[int], task: str | None, default_max: int | None,
                    arrived: float) -> _Run:
        label = task or BASE_TASK
        tasks = self.engine.tasks()
        if task is not None and task not in tasks:
            raise ApiError(404, f"The model `{task}` does not exist.", param="model", code="model_not_found")
        prefix_len = tasks[task].prefix_len if task is not None else 0
        ctx, n = self.max_context, len(prompt_ids)
        max_new = body.max_new if isinstance(body, ChatCompletionRequest) else body.max_tokens
        if max_new is None:
            max_new = default_max if default_max is not None else max(ctx - n - prefix_len, 1)
        if n + prefix_len + max_new > ctx:
            what = f"{n} in the prompt, " + (f"{prefix_len} in the prefix of task {task}, " if task else "")
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{n + prefix_len + max_new} tokens ({what}{max_new} for the completion). Please reduce "
                           "the length of the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        gen = GenRequest(prompt_ids=prompt_ids, task=task, max_new_tokens=max_new,
                         temperature=0.0 if temperature < 1e-5 else temperature,  # as vLLM: tiny = greedy
                         top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                         stop_token_ids=() if body.ignore_eos else self.stop_token_ids)
        try:
            return _Run(self, gen, label, body.stops, arrived)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({one_line(e)}); retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except UnknownTask:
            raise ApiError(404, f"The model `{task}` does not exist.", param="model",
                           code="model_not_found") from None
        except EngineStopped:
            if getattr(self.engine, "_fatal", None):
                raise ApiError(500, "the generation engine has stopped; restart the server",
                               code="engine_stopped") from None
            raise ApiError(503, "the server is shutting down", code="server_shutting_down") from None
        except ValueError as e:
            raise ApiError(400, one_line(e)) from None


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {one_line(e)}") from None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Gate:
    """Pure ASGI middleware: the API key on /v1/*, 503 while draining, and the count of requests in flight."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, st = scope.get("path", ""), self.state
        error = None
        if st.options.api_key and path.startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(),
                                                                        st.options.api_key.encode()):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
        if error is None and st.draining and path != "/metrics":
            error = ApiError(503, "the server is shutting down and takes no new requests",
                             code="server_shutting_down", headers={"Retry-After": "5"})
        if error is not None:
            if path.startswith("/v1"):
                st.metrics.requests.labels("", str(error.status)).inc()
            return await _error_response(error)(scope, receive, send)
        counted = path.startswith("/v1")
        st.inflight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            st.inflight -= counted


def create_app(engine, tokenizer, base_id: str, options: ServeOptions | None = None) -> FastAPI:
    options = options or ServeOptions()
    state = ServeState(engine, tokenizer, base_id, options)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            state.begin_drain()
            await asyncio.to_thread(engine.shutdown, True, options.drain_timeout)

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        ref = f"err-{uuid.uuid4().hex[:12]}"
        log.exception("internal error %s", ref)  # the text may hold paths and internals: the log has it, not the client
        return _error_response(ApiError(500, f"internal server error {ref} (the server log has the details)"))

    async def generate(request: Request, body, kind: str):
        arrived = time.perf_counter()
        label = ""
        try:
            body.check()
            task = await state.resolve(body.model)
            label = task or BASE_TASK
            if kind == "chat":
                ids, default_max = state.chat_ids(body), None
            else:
                ids, default_max = state.prompt_ids(body), 16  # OpenAI's default max_tokens for completions
            run = await state.start(body, ids, task, default_max, arrived)
        except ApiError as e:
            state.metrics.requests.labels(label, str(e.status)).inc()
            raise
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(run, kind, rid, created, body.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(run.close))  # also if the stream never started
        try:
            text = await _collect(run, request)
        finally:
            run.close()
        if text is None:  # the client disconnected: the request is cancelled, nobody reads an answer
            return Response(status_code=499)
        if run.error is not None:
            raise ApiError(500, f"generation failed: {run.error}", type="server_error")
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": run.finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                             "choices": [choice], "usage": run.usage(), "system_fingerprint": None})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse(CompletionRequest, await _json_body(request)), "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse(ChatCompletionRequest, await _json_body(request)), "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for card in state.model_cards():
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = parse(LoadAdapterRequest, await _json_body(request))
        state.check_load_path(body.lora_path)
        await state.load_task(body.lora_name, body.lora_path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = parse(UnloadAdapterRequest, await _json_body(request))
        name = body.lora_name
        if state.reserved(name):
            raise ApiError(400, f"{name!r} is the base model, not a task", param="lora_name")
        try:
            # bounded: a request that never ends must not hold this worker thread (and the client) forever
            gone = await asyncio.to_thread(engine.remove_task, name, state.options.drain_timeout)
        except UnknownTask:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found") from None
        state.sources.pop(name, None)
        if not gone:
            log.info("task %s: refusing new requests; unloads when its last request ends", name)
            return PlainTextResponse(f"Accepted: LoRA adapter '{name}' takes no new requests and is removed when its "
                                     f"requests in flight end (still running after {state.options.drain_timeout:g} s)",
                                     status_code=202)
        log.info("task %s unloaded", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/health")
    async def health():
        # a dead engine thread answers every request with an error: say so, so an orchestrator restarts the process
        return Response(status_code=503 if getattr(engine, "_fatal", None) else 200)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _collect(run: _Run, request: Request) -> str | None:
    """The whole text of a non-streamed request; None if the client disconnected first (the caller cancels)."""
    async def consume():
        return "".join([piece async for piece in run.pieces()])

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
    if not consumer.done() or consumer.cancelled():
        return None
    return consumer.result()


async def _stream(run: _Run, kind: str, rid: str, created: int, model: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that disconnects cancels
    the request (Starlette cancels this generator; `finally` tells the engine)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra})

    try:
        if kind == "chat":
            yield chunk(None, None, role=True)
        async for piece in run.pieces():
            yield chunk(piece, None)
        if run.error is not None:
            yield _sse(ApiError(500, f"generation failed: {run.error}", type="server_error").body())
        else:
            yield chunk(None, run.finish)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": run.usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.close()
