"""The OpenAI-compatible HTTP API over an engine: vLLM's surface, where `model` picks a task.

    POST /v1/completions, POST /v1/chat/completions     model = a task name, or the base id (or "base") for none
    GET  /v1/models, GET /v1/models/{id}                the base and every task (parent = the base id)
    POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}   a prefix file becomes a task
    POST /v1/unload_lora_adapter {"lora_name"}          returns once the task's in-flight requests finished
    POST /tokenize {"prompt"} or {"messages"}, POST /detokenize {"tokens"}, GET /version   as vLLM's (the API key, when
                                                        set, is required on the first two as on /v1/*)
    GET  /health (200, 503 while draining), GET /metrics (Prometheus)

A completion request may hold several prompts and ask n choices of each (serve/choices.py builds the responses:
logprobs, usage, interleaved streams); sampling is serve/sampling.py, the same in both engines.

`create_app(engine, tokenizer, base_id, options)` builds it; the engine runs in its own thread and reports each token
through `on_token`, which `loop.call_soon_threadsafe` puts on the request's asyncio queue. Errors are OpenAI's JSON:
400 bad body or field, prompt too long, unsupported field, bad task name, --max_loras reached; 401 API key (with
WWW-Authenticate: Bearer); 403 a file outside --prefix_dir / --load_from (also through a link); 404 unknown model;
413 body over --max_body_bytes (answered before it is read); 429 queue full; 503 draining; 500 an engine error (only
that request's). Tokenising and chat templates run in one worker thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..prefix.errors import one_line
from ..prefix.positions import positions_needed
from ..prefix.tasks import BASE_TASK
from .choices import TokenStrings, as_ids, collect, logprobs_of, stream, usage
from .contract import EngineStopped, GenRequest, QueueFull, UnknownTask
from .detok import IncrementalDetokenizer, StopText
from .limits import CHARS_PER_POSITION, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_LORAS
from .metrics import Metrics
from .models import ServingModels
from .protocol import (
    MAX_CHOICES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadAdapterRequest,
    parse,
)

log = logging.getLogger("prefixtune.serve")


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger request body is a 413, answered before it is read
    max_prompt_chars: int | None = None  # prompt characters checked before tokenising (None: CHARS_PER_POSITION x
                                         # the context positions)
    max_loras: int = DEFAULT_MAX_LORAS   # most tasks loaded at once; loading one more is a 400


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Run:
    """One request inside the engine: its token queue, incremental text, stop strings, timing and metrics."""

    def __init__(self, state: "ServeState", gen: GenRequest, task_label: str, stops: list[str], arrived: float,
                 index: int = 0, include_stop: bool = False):
        self.state, self.gen, self.label, self.arrived = state, gen, task_label, arrived
        self.index, self.include_stop = index, include_stop  # choice index; include_stop_str_in_output
        self.stop_ids = frozenset(gen.stop_token_ids)
        self.logprobs: list = []          # serve.sampling.TokenLogprob per generated token (when asked for)
        self.lp_sent = self.lp_offset = 0  # streaming: logprobs handed out, text_offset of the next one
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

        def on_token(token, reason, logprob=None):  # the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (token, reason, logprob))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self.rid = state.engine.submit(gen, on_token)  # QueueFull, UnknownTask, EngineStopped, ValueError
        state.live.add(self)
        state.metrics.prompt_tokens.labels(task_label).inc(len(gen.prompt_ids))

    async def pieces(self):
        """The text as it becomes final; sets self.finish (and self.error) before it ends."""
        m = self.state.metrics
        while True:
            token, reason, logprob = await self.queue.get()
            if token is not None:
                now = time.perf_counter()
                if self.last_token is None:
                    m.ttft.labels(self.label).observe(now - self.arrived)
                else:
                    m.tpot.labels(self.label).observe(now - self.last_token)
                self.last_token = now
                self.completion_tokens += 1
                m.generation_tokens.labels(self.label).inc()
                if logprob is not None:
                    self.logprobs.append(logprob)
                if token in self.stop_ids and not self.include_stop:
                    continue  # a stop token (the engine ends the request next): counted, its text dropped (vLLM)
                out, stopped = self.text.push(self.detok.add(token))
                out += self.text.matched if stopped and self.include_stop else ""
                if out:
                    yield out
                if stopped:
                    self.finish = "stop"
                    self.state.engine.cancel(self.rid)
                    return
                continue
            self.engine_done = True
            out, stopped = self.text.push(self.detok.flush())
            out += (self.text.matched if self.include_stop else "") if stopped else self.text.flush()
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
        self.state.live.discard(self)
        if not self.engine_done and self.finish is None:
            self.state.engine.cancel(self.rid)
        status = self.finish or "cancelled"
        m = self.state.metrics
        m.requests.labels(self.label, status).inc()
        if self.finish is not None:
            m.e2e.labels(self.label).observe(time.perf_counter() - self.arrived)


class ServeState:
    def __init__(self, engine, tokenizer, base_id: str, options: ServeOptions):
        self.engine, self.tok, self.base_id, self.options = engine, tokenizer, base_id, options
        self.live: set[_Run] = set()  # requests in the engine (vllm:kv_cache_usage_perc's estimate)
        self.metrics = Metrics(engine, base_id, options.max_loras, self.kv_usage)
        self.draining = False
        self.inflight = 0
        self.models = ServingModels(engine, base_id, options, lambda: self.max_context)
        # tokenising and chat templates run here, off the event loop (one thread, as vLLM's tokenizer executor)
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="prefixtune-tokenize")
        self.token_strings = TokenStrings(tokenizer)  # logprobs' token texts
        stop = options.stop_token_ids
        if stop is None:
            stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        self.stop_token_ids = tuple(stop)
        self.vocab_size = options.vocab_size or getattr(options.config, "vocab_size", None) or len(tokenizer)

    @property
    def max_context(self) -> int:
        ctx = self.engine.max_context
        return min(ctx, self.options.max_model_len) if self.options.max_model_len else ctx

    @property
    def max_prompt_chars(self) -> int:
        return self.options.max_prompt_chars or CHARS_PER_POSITION * self.max_context

    def check_prompt_chars(self, n: int, param: str) -> None:
        """Refuse a prompt of more than --max_prompt_chars characters before tokenising it."""
        if n > self.max_prompt_chars:
            raise ApiError(400, f"the prompt has {n} characters, more than this server tokenises "
                           f"({self.max_prompt_chars}, --max_prompt_chars); its {self.max_context} positions could "
                           "not hold it anyway", param=param, code="context_length_exceeded")

    async def off_loop(self, fn, *args):
        """fn(*args) in the tokenizer thread, so that a long prompt never stalls the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tok_pool, fn, *args)

    def kv_usage(self) -> float | None:
        """vllm:kv_cache_usage_perc when the engine's stats() has none: positions held by the requests that are
        generating (prefix + prompt + tokens so far) over the most the engine holds at once (max_batch_size x
        max_context). Requests still in their prefill are not counted, so it is an estimate from below."""
        slots = (getattr(self.engine, "max_batch_size", None) or 1) * (self.engine.max_context or 0)
        if not slots:
            return None
        tasks, used = self.engine.tasks(), 0
        for run in list(self.live):
            if run.last_token is not None and not run.engine_done:
                shape = tasks.get(run.gen.task) if run.gen.task is not None else None
                used += len(run.gen.prompt_ids) + run.completion_tokens + (shape.prefix_len if shape else 0)
        return min(used / slots, 1.0)

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

    # --- generation --------------------------------------------------------------------------------------------
    def prompt_ids(self, body: CompletionRequest) -> list[list[int]]:
        """The token ids of every prompt: `prompt` is one prompt (a string or token ids) or a list of them."""
        prompt = body.prompt
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        if len(batch) * (body.n or 1) > MAX_CHOICES:
            raise ApiError(400, f"expected at most {MAX_CHOICES} choices per request (prompts x n), got "
                           f"{len(batch)} x {body.n or 1}", param="prompt")
        out = []
        for i, one in enumerate(batch):
            param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
            if isinstance(one, str):
                self.check_prompt_chars(len(one), param)
                ids = self.tok(one, add_special_tokens=body.add_special_tokens)["input_ids"]
            else:
                bad = [t for t in one if not 0 <= t < self.vocab_size]
                if bad:
                    raise ApiError(400, f"prompt token ids must lie in [0, {self.vocab_size}), got {bad[:5]}",
                                   param=param)
                ids = list(one)
            if not ids:
                raise ApiError(400, f"the {param} is empty: expected at least one token", param=param)
            out.append(ids)
        return out

    def tokenize(self, body) -> list[int]:
        """/tokenize's ids (the tokenizer thread): a prompt, or messages through the chat template."""
        if isinstance(body, TokenizeCompletionRequest):
            self.check_prompt_chars(len(body.prompt), "prompt")
            return list(self.tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, f"the tokenizer of {self.base_id} has no chat template: start the server with "
                           "--chat_template", param="messages")
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - as chat_ids
            raise ApiError(400, f"the chat template cannot format these messages: {one_line(e)}",
                           param="messages") from None
        self.check_prompt_chars(len(text), "messages")
        return list(self.tok(text, add_special_tokens=body.add_special_tokens)["input_ids"])

    def chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, f"the tokenizer of {self.base_id} has no chat template, so /v1/chat/completions "
                           "cannot format messages: use /v1/completions, or start the server with --chat_template",
                           param="messages")
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, raise_exception() in the template, ...
            raise ApiError(400, f"the chat template cannot format these messages: {one_line(e)}",
                           param="messages") from None
        self.check_prompt_chars(len(text), "messages")
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the formatted chat is empty", param="messages")
        return ids

    async def start(self, body, prompts: list[list[int]], task: str | None, default_max: int | None,
                    arrived: float) -> list[_Run]:
        """One engine request per choice: n per prompt, choice index prompt_i x n + j (choice j samples with seed
        + j). All are checked before any is submitted; if one is refused, those already submitted are cancelled."""
        label = task or BASE_TASK
        tasks = self.engine.tasks()
        if task is not None and task not in tasks:
            raise ApiError(404, f"The model `{task}` does not exist.", param="model", code="model_not_found")
        prefix_len = tasks[task].prefix_len if task is not None else 0
        ctx = self.max_context
        asked = body.max_new if isinstance(body, ChatCompletionRequest) else body.max_tokens
        bad_stop = [t for t in body.stop_token_ids or () if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise ApiError(400, f"stop_token_ids must lie in [0, {self.vocab_size}), got {bad_stop[:5]}",
                           param="stop_token_ids")
        stop_ids = tuple(dict.fromkeys((() if body.ignore_eos else self.stop_token_ids) + tuple(body.stop_token_ids
                                                                                                   or ())))
        temperature = 1.0 if body.temperature is None else body.temperature
        n_choices = body.n or 1
        gens = []
        for prompt_ids in prompts:
            n = len(prompt_ids)
            max_new = asked
            if max_new is None:
                max_new = default_max if default_max is not None else max(ctx - positions_needed(prefix_len, n) + 1, 1)
            needed = positions_needed(prefix_len, n, max_new)
            if needed > ctx:
                what = f"{n} in the prompt, " + (f"{prefix_len} in the prefix of task {task}, " if task else "")
                raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                               f"{needed} tokens ({what}{max_new} for the completion, whose last token takes no "
                               "position). Please reduce the length of the prompt or max_tokens.",
                               param="max_tokens", code="context_length_exceeded")
            for j in range(n_choices):
                gens.append(GenRequest(
                    prompt_ids=prompt_ids, task=task, max_new_tokens=max_new,
                    temperature=0.0 if temperature < 1e-5 else temperature,  # as vLLM: tiny = greedy
                    top_p=1.0 if body.top_p is None else body.top_p,
                    seed=None if body.seed is None else (body.seed + j) % 2 ** 64,
                    stop_token_ids=stop_ids, top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
                    presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                    logprobs=body.logprob_count, emit_stop_token=True))
        runs: list[_Run] = []
        try:
            try:
                for index, gen in enumerate(gens):
                    runs.append(_Run(self, gen, label, body.stops, arrived, index, body.include_stop_str_in_output))
            except BaseException:
                for run in runs:  # cancelled: a request gets all its choices or none
                    run.close()
                raise
            return runs
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({one_line(e)}); retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except UnknownTask:
            raise ApiError(404, f"The model `{task}` does not exist.", param="model",
                           code="model_not_found") from None
        except EngineStopped:
            if self.engine.errored:
                raise ApiError(500, "the generation engine has stopped; restart the server",
                               code="engine_stopped") from None
            raise ApiError(503, "the server is shutting down", code="server_shutting_down") from None
        except ValueError as e:
            raise ApiError(400, one_line(e)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefixtune")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server accepts ({limit} bytes, --max_body_bytes)",
                    code="request_too_large")


async def _json_body(request: Request):
    """The body's JSON, read up to --max_body_bytes: past it a 413, also for a chunked body (counted as it comes;
    the gate refuses a larger Content-Length before reading anything)."""
    limit = request.app.state.serve.options.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
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
    """Pure ASGI middleware: the API key on /v1/*, a Content-Length past --max_body_bytes (413, before the body is
    read), 503 while draining, and the count of requests in flight."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, st = scope.get("path", ""), self.state
        error = None
        headers = dict(scope.get("headers") or [])
        if st.options.api_key and path.startswith(("/v1", "/tokenize", "/detokenize")):
            # bytes as sent: clients send a non-ASCII key as UTF-8; compare_digest takes constant time
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(),
                                                                         st.options.api_key.encode("utf-8")):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"")
        if error is None and length.isdigit() and int(length) > st.options.max_body_bytes:
            error = _too_large(st.options.max_body_bytes)
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
            state.tok_pool.shutdown(wait=False)

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(_Gate, state=state)

    def refused(request, e: ApiError) -> JSONResponse:
        """The error response; a /v1 request refused before generate() counted it (a malformed body, an unknown
        route, a failed load) goes into requests_total too."""
        if request.url.path.startswith("/v1") and not getattr(e, "counted", False):
            state.metrics.requests.labels("", str(e.status)).inc()
        return _error_response(e)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return refused(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return refused(request, ApiError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        ref = f"err-{uuid.uuid4().hex[:12]}"
        log.exception("internal error %s", ref)  # the text may hold paths and internals: the log has it, not the client
        return refused(request, ApiError(500, f"internal server error {ref} (the server log has the details)"))

    async def generate(request: Request, body, kind: str):
        arrived = time.perf_counter()
        label = ""
        try:
            body.check()
            task = await state.models.resolve(body.model)
            label = task or BASE_TASK
            if kind == "chat":  # tokenising and templating: off the event loop
                prompts, default_max = [await state.off_loop(state.chat_ids, body)], None
            else:
                prompts, default_max = await state.off_loop(state.prompt_ids, body), 16  # OpenAI's default max_tokens
            runs = await state.start(body, prompts, task, default_max, arrived)
        except ApiError as e:
            state.metrics.requests.labels(label, str(e.status)).inc()
            e.counted = True
            raise
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt once, whatever n (as vLLM)
        names = as_ids if body.return_tokens_as_token_ids else state.token_strings  # logprobs' token names

        def close_all():
            for run in runs:
                run.close()

        if body.stream:
            opts = body.stream_options
            events = stream(runs, kind, rid, created, body.model, names,
                            include_usage=bool(opts and opts.include_usage),
                            continuous_usage=bool(opts and opts.continuous_usage_stats), prompt_tokens=prompt_tokens,
                            error_body=lambda run: ApiError(500, f"generation failed: {run.error}",
                                                            type="server_error").body())
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(close_all))  # also if the stream never started
        try:
            texts = await collect(runs, lambda: _disconnected(request))
        finally:
            close_all()
        if texts is None:  # the client disconnected: the request is cancelled, nobody reads an answer
            return Response(status_code=499)
        failed = next((run for run in runs if run.error is not None), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", type="server_error")
        choices = []
        for run, text in zip(runs, texts):
            logprobs = logprobs_of(run, kind, names)
            if kind == "chat":
                choices.append({"index": run.index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": run.finish})
            else:
                choices.append({"index": run.index, "text": text, "logprobs": logprobs, "finish_reason": run.finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": created, "model": body.model, "choices": choices,
                             "usage": usage(prompt_tokens, sum(run.completion_tokens for run in runs)),
                             "system_fingerprint": None})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse(CompletionRequest, await _json_body(request)), "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse(ChatCompletionRequest, await _json_body(request)), "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state.models.model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for card in state.models.model_cards():
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize: {"prompt"} or chat {"messages"} -> {"count", "max_model_len", "tokens"}; the ids are
        those /v1/completions or /v1/chat/completions would feed the model (add_special_tokens defaults to False)."""
        raw = await _json_body(request)
        chat = isinstance(raw, dict) and "messages" in raw
        body = parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, raw)
        state.models.check_model(body.model)
        ids = await state.off_loop(state.tokenize, body)
        out = {"count": len(ids), "max_model_len": state.max_context, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = state.tok.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's /detokenize: {"tokens"} -> {"prompt"} (special tokens kept, as vLLM)."""
        body = parse(DetokenizeRequest, await _json_body(request))
        state.models.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise ApiError(400, f"token ids must lie in [0, {state.vocab_size}), got {bad[:5]}", param="tokens")
        return {"prompt": await state.off_loop(state.tok.decode, body.tokens)}

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = parse(LoadAdapterRequest, await _json_body(request))
        state.models.check_name(body.lora_name)
        path = state.models.check_load_path(body.lora_path)  # resolved once: the file checked is the file read
        await state.models.load_task(body.lora_name, path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = parse(UnloadAdapterRequest, await _json_body(request))
        name = body.lora_name
        gone = await state.models.unload_task(name)
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
        return Response(status_code=503 if engine.errored else 200)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
