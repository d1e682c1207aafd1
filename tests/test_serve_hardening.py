"""prefix_serve against hostile or careless clients (issue 15, "the server"): a body limit answered before the body is
read, prompts capped before tokenising and tokenised off the event loop, bounded stop strings, one task-name rule,
--max_loras, links in --prefix_dir, a non-ASCII API key, WWW-Authenticate, refused bodies in requests_total, an inline
--chat_template, and vLLM's metric names. Real HTTP (uvicorn in a thread) and the real `openai` client throughout.
"""
from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time

import openai
import pytest
from test_serve_api import (PROMPT, ScriptEngine, assert_error, byte_tokenizer, call, complete, metric,  # noqa: F401
                            start_server, tables)

from prefixtune.serve.__main__ import build, build_parser, chat_template_text
from prefixtune.serve.app import ServeOptions, create_app
from prefixtune.serve.detok import StopText
from prefixtune.serve.sequential import SequentialEngine
from prefixtune.serve.server import serve_in_thread

MB = 2 ** 20
# > 255 characters, so that taking it for a file name fails with "File name too long"
LONG_TEMPLATE = ("{# a chat template given inline on the command line, long enough that no file system takes it for a "
                 "file name: " + "padding " * 40 + "#}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def post(url: str, path: str, body, headers=None, timeout: float = 30.0):
    """(status, response headers, parsed JSON or text); `body` bytes (sent with Content-Length) or an iterable of
    bytes (sent chunked)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=not isinstance(body, bytes))
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, resp.headers, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, resp.headers, text


class HealthWatch:
    """Polls GET /health in a thread while the block runs: .worst is the slowest answer in seconds."""

    def __init__(self, url: str):
        self.url, self.worst, self.answers, self.failures = url, 0.0, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        host, port = self.url.removeprefix("http://").split(":")
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    self.failures.append(status)
            except OSError as e:
                self.failures.append(repr(e))
            self.worst = max(self.worst, time.perf_counter() - t)
            self.answers += 1
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)
        self.stop.set()
        self.thread.join(15)


def script_app(script="ABC", tokenizer=None, engine=None, **options):
    """A server over a scripted engine that answers every request with `script`, one byte token at a time."""
    ids = byte_tokenizer()(script, add_special_tokens=False).input_ids
    app = create_app(engine or ScriptEngine(ids), tokenizer or byte_tokenizer(), "bytes",
                     ServeOptions(**options))
    srv = serve_in_thread(app)
    srv.app = app
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=options.get("api_key") or "unused", max_retries=0,
                               timeout=60)
    return srv


@pytest.fixture(scope="module")
def script_server():
    srv = script_app()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tables, tmp_path_factory):
    """A tiny Llama with task alpha, --prefix_dir, --load_from the prefix folder, --max_loras 3 and the chat template
    given inline."""
    prefix_dir = tmp_path_factory.mktemp("hardening_prefix_dir")
    srv = start_server(tiny_llama_dir, tables, SequentialEngine, "--prefix", tables["dir"] / "alpha.safetensors",
                       "--prefix_dir", prefix_dir, "--load_from", tables["dir"], "--max_loras", 3,
                       "--chat_template", LONG_TEMPLATE)
    srv.prefix_dir, srv.state = prefix_dir, srv.app.state.serve
    yield srv
    srv.stop()


def load(srv, name, path):
    return call(srv.url, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def unload(srv, name):
    return call(srv.url, "POST", "/v1/unload_lora_adapter", {"lora_name": name})


# --- 1. the body limit, prompt characters, tokenising off the event loop ----------------------------------------------
def test_a_50mb_body_is_413_before_it_is_read_and_health_stays_fast(script_server):
    url = script_server.url
    big = b'{"model": "bytes", "prompt": "' + b"a" * (50 * MB) + b'"}'

    def chunked():  # no Content-Length: counted as it comes
        yield b'{"model": "bytes", "prompt": "'
        for _ in range(50):
            yield b"a" * MB
        yield b'"}'

    refused = metric(script_server, "prefixtune_requests_total", status="413")
    before = rss_mb()
    with HealthWatch(url) as health:
        t = time.perf_counter()
        status, _, body = post(url, "/v1/completions", big)
        with_length = time.perf_counter() - t
        t = time.perf_counter()
        status_chunked, _, body_chunked = post(url, "/v1/chat/completions", chunked())
        chunked_time = time.perf_counter() - t
    grown = rss_mb() - before
    for got, answer in ((status, body), (status_chunked, body_chunked)):
        assert_error((got, answer), 413, "--max_body_bytes", str(4 * MB))
        assert answer["error"]["code"] == "request_too_large"
    assert with_length < 5 and chunked_time < 5, (with_length, chunked_time)
    assert health.answers >= 1 and health.worst < 1.0 and not health.failures, (health.worst, health.failures)
    assert grown < 64, f"the server grew by {grown:.0f} MB for refused bodies"
    # the openai client sees the same 413
    with pytest.raises(openai.APIStatusError) as e:
        script_server.client.completions.create(model="bytes", prompt="a" * (5 * MB), max_tokens=2)
    assert e.value.status_code == 413
    assert metric(script_server, "prefixtune_requests_total", status="413") == refused + 3
    # a body under the limit, chunked or not, still works
    small = json.dumps({"model": "bytes", "prompt": "a" * 1000, "max_tokens": 2, "user": "u" * (3 * MB)}).encode()
    assert post(url, "/v1/completions", small)[0] == 200
    assert post(url, "/v1/completions", iter([small[:10], small[10:]]))[0] == 200


class SlowTokenizer:
    """The byte tokenizer, taking `delay` seconds per encoding (as a huge prompt would)."""

    def __init__(self, delay: float):
        self.tok, self.delay, self.calls = byte_tokenizer(), delay, 0
        self.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __call__(self, text, **kw):
        self.calls += 1
        time.sleep(self.delay)
        return self.tok(text, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_tokenising_runs_off_the_event_loop_and_long_prompts_are_refused_before_it():
    slow = SlowTokenizer(2.0)
    srv = script_app(tokenizer=slow, max_prompt_chars=1000)
    try:
        answers = []
        with HealthWatch(srv.url) as health:
            worker = threading.Thread(target=lambda: answers.append(
                srv.client.completions.create(model="bytes", prompt="hello", max_tokens=3)))
            worker.start()
            worker.join(30)
        assert answers and answers[0].choices[0].text == "ABC"
        assert health.answers >= 5 and health.worst < 1.0, (health.answers, health.worst)
        # past --max_prompt_chars: a 400 at once, the tokenizer never called
        calls, t = slow.calls, time.perf_counter()
        with pytest.raises(openai.BadRequestError, match="--max_prompt_chars") as e:
            srv.client.completions.create(model="bytes", prompt="a" * 1001, max_tokens=3)
        assert e.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError, match="--max_prompt_chars") as e:
            srv.client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": "a" * 600},
                                                                        {"role": "user", "content": "b" * 401}])
        assert e.value.body["param"] == "messages"
        assert slow.calls == calls and time.perf_counter() - t < 1.5
    finally:
        srv.stop()


def test_prompt_chars_default_follows_the_context():
    srv = script_app()
    try:
        limit = 32 * ScriptEngine.max_context  # CHARS_PER_POSITION x the positions
        with pytest.raises(openai.BadRequestError, match=f"--max_prompt_chars.*{ScriptEngine.max_context}"):
            srv.client.completions.create(model="bytes", prompt="a" * (limit + 1), max_tokens=1)
        assert srv.app.state.serve.max_prompt_chars == limit
    finally:
        srv.stop()


# --- 2. stop strings -------------------------------------------------------------------------------------------------
def test_stop_strings_are_bounded_in_number_and_length(script_server):
    client = script_server.client
    with pytest.raises(openai.BadRequestError, match="at most 16 stop strings, got 17"):
        client.completions.create(model="bytes", prompt="go", stop=[f"s{i}" for i in range(17)])
    with pytest.raises(openai.BadRequestError, match="at most 256 characters, got one of 257"):
        client.completions.create(model="bytes", prompt="go", stop=["x" * 257])
    with pytest.raises(openai.BadRequestError, match="at most 256 characters"):
        client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": "x"}], stop="y" * 300)
    ok = client.completions.create(model="bytes", prompt="go", max_tokens=3,
                                   stop=[f"{i:02d}" + "q" * 254 for i in range(16)])
    assert ok.choices[0].text == "ABC" and ok.choices[0].finish_reason == "length"
    assert client.completions.create(model="bytes", prompt="go", max_tokens=3, stop=["B"]).choices[0].text == "A"


def test_the_stop_check_looks_back_only_the_longest_stop():
    # what it searches stays under the longest stop string, however long the output grows
    stops = [f"{i:02d}" + "z" * 254 for i in range(16)]
    s = StopText(stops)
    t = time.perf_counter()
    for _ in range(3000):
        assert s.push("z y ") == ("z y ", False)
        assert len(s.pending) < 256
    assert time.perf_counter() - t < 1.0  # the whole-text scan took 3.4 s here
    s = StopText(["z" * 256])
    for _ in range(500):
        s.push("z" * 7)  # a tail that keeps looking like the start of the stop string
        assert len(s.pending) < 256
    # the same text and the same cut as searching the whole text, for random stops and deltas
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        deltas = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 8))]
        full, cut = "".join(deltas), None
        for k in range(1, len(deltas) + 1):  # the first prefix of deltas that contains a stop string
            seen = "".join(deltas[:k])
            hits = [seen.find(x) for x in stops if x in seen]
            if hits:
                cut = seen[:min(hits)]
                break
        s = StopText(stops)
        out = "".join(s.push(d)[0] for d in deltas) + ("" if s.stopped else s.flush())
        assert (out, s.stopped) == ((cut, True) if cut is not None else (full, False)), (stops, deltas)


# --- 3. task names, --max_loras, the lock map ------------------------------------------------------------------------
def test_task_names_follow_one_rule_and_tasks_are_bounded(llama, tables):
    d, url = tables["dir"], llama.url
    gamma = d / "gamma.safetensors"
    for bad in ["a\nb", "x" * 65, "../etc", "base", "BASE", ".hidden", "two words", "", llama.state.base_id]:
        r = load(llama, bad, gamma)
        assert_error(r, 400, "task name")
        assert r[1]["error"]["param"] == "lora_name"
        assert_error(unload(llama, bad), 400)
    assert set(llama.engine.tasks()) == {"alpha"}
    # --max_loras 3: alpha + two more; the fourth is refused, naming the flag, by path and through --prefix_dir
    assert load(llama, "gamma", gamma)[0] == 200 and load(llama, "gamma2", gamma)[0] == 200
    r = load(llama, "gamma3", gamma)
    assert_error(r, 400, "--max_loras 3", "unload")
    shutil.copy(d / "delta.safetensors", llama.prefix_dir / "delta.safetensors")
    with pytest.raises(openai.BadRequestError, match="--max_loras") as e:
        complete(llama, "delta")
    assert e.value.body["param"] == "model"
    assert call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(gamma),
                                                       "load_inplace": True})[0] == 200  # replacing takes no slot
    assert unload(llama, "gamma2")[0] == 200
    assert complete(llama, "delta").choices[0].finish_reason == "length"  # a slot is free again
    assert set(llama.engine.tasks()) == {"alpha", "gamma", "delta"}
    for name in ("gamma", "delta"):
        assert unload(llama, name)[0] == 200
    # the lock map only holds names in use: none now
    assert llama.state.models._locks == {}


def test_too_many_prefixes_or_bad_limits_are_refused_at_start(tiny_llama_dir, tables):
    d = tables["dir"]
    argv = ["--model", str(tiny_llama_dir), "--device", "cpu", "--prefix", str(d / "alpha.safetensors"),
            str(d / "beta.safetensors")]
    with pytest.raises(ValueError, match="--max_loras 1"):
        build(build_parser().parse_args(argv + ["--max_loras", "1"]))
    for flag in ("--max_loras", "--max_body_bytes", "--max_prompt_chars"):
        with pytest.raises(ValueError, match=f"expected {flag} of at least 1"):
            build(build_parser().parse_args(argv + [flag, "0"]))


# --- 4. links in --prefix_dir, the API key, refused bodies, --chat_template ------------------------------------------
def test_a_link_in_prefix_dir_leading_outside_is_refused(llama, tables, tmp_path):
    outside = tmp_path / "evil.safetensors"
    shutil.copy(tables["dir"] / "gamma.safetensors", outside)
    (llama.prefix_dir / "evil.safetensors").symlink_to(outside)
    (llama.prefix_dir / "inside.safetensors").symlink_to(tables["dir"] / "gamma.safetensors")  # a --load_from folder
    try:
        with pytest.raises(openai.PermissionDeniedError, match="outside the folders") as e:
            complete(llama, "evil")
        assert e.value.body["param"] == "model"
        assert "evil" not in llama.engine.tasks()
        listed = {m.id: m for m in llama.client.models.list().data}
        assert "evil" not in listed and "inside" in listed
        # the same file through load_lora_adapter: the same refusal
        assert_error(load(llama, "evil2", llama.prefix_dir / "evil.safetensors"), 403, "outside the folders")
        # a link to an allowed folder is served, from the file that was checked
        assert complete(llama, "inside").choices[0].finish_reason == "length"
        assert llama.client.models.retrieve("inside").root == str((tables["dir"] / "gamma.safetensors").resolve())
    finally:
        unload(llama, "inside")
        for name in ("evil", "inside"):
            (llama.prefix_dir / f"{name}.safetensors").unlink()


def test_a_non_ascii_api_key_works_and_401_says_bearer():
    key = "clé-🔑-ключ"
    srv = script_app(api_key=key)
    try:
        host, port = srv.url.removeprefix("http://").split(":")

        def models(auth: bytes | None):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.putrequest("GET", "/v1/models")
            if auth is not None:
                conn.putheader("Authorization", auth)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.status, resp.headers.get("WWW-Authenticate")

        assert models(b"Bearer " + key.encode("utf-8")) == (200, None)  # as curl sends it
        assert models(b"Bearer " + key.encode("utf-8")[:-1]) == (401, "Bearer")
        assert models(b"Bearer " + key.encode("latin-1", "replace")) == (401, "Bearer")
        assert models(None) == (401, "Bearer")
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.response.headers["www-authenticate"] == "Bearer"
        assert call(srv.url, "GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_refused_bodies_are_counted_in_requests_total(script_server):
    url = script_server.url
    before = metric(script_server, "prefixtune_requests_total", task="", status="400")
    bad = [("/v1/completions", b'{"model": "bytes", "prompt": '), ("/v1/completions", b"[1, 2]"),
           ("/v1/completions", b"\xff\xfe"), ("/v1/chat/completions", b"{}"),
           ("/v1/completions", json.dumps({"model": "bytes", "prompt": "x", "frobnicate": 1}).encode()),
           ("/v1/load_lora_adapter", b"not json"), ("/v1/unload_lora_adapter", b'{"lora_name": 3}')]
    for path, body in bad:
        assert post(url, path, body)[0] == 400, path
    assert metric(script_server, "prefixtune_requests_total", task="", status="400") == before + len(bad)
    unknown = metric(script_server, "prefixtune_requests_total", status="404")
    assert call(url, "GET", "/v1/nothing")[0] == 404
    assert metric(script_server, "prefixtune_requests_total", status="404") == unknown + 1


def test_chat_template_given_inline_works(llama, tmp_path):
    # the llama fixture passed LONG_TEMPLATE (over 255 characters) inline
    assert llama.state.tok.chat_template == LONG_TEMPLATE
    r = llama.client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(llama.state.tok("<user> hi <assistant> ", add_special_tokens=False)
                                        .input_ids)
    # a file is read; a value that is neither a file nor Jinja is an error at start, not a template
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert chat_template_text(str(f)) == "{{ messages[0]['content'] }}"
    assert chat_template_text("{{ x }}") == "{{ x }}"
    assert chat_template_text(LONG_TEMPLATE * 20) == LONG_TEMPLATE * 20  # longer than any path
    with pytest.raises(ValueError, match="no such file, and not a Jinja template"):
        chat_template_text(str(tmp_path / "missing.jinja"))


# --- 5. vLLM's metric names ----------------------------------------------------------------------------------------
def samples(url: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of metric `name` on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text = call(url, "GET", "/metrics")
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


def test_vllm_metrics_of_a_real_server(llama):
    base = llama.state.base_id
    complete(llama, "alpha", n=4)
    list(llama.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, stream=True))
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        got = samples(llama.url, name)
        assert [labels for labels, _ in got] == [{"model_name": base}], name
        assert got[0][1] >= 2, name
    for ours, theirs in (("prefixtune_prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("prefixtune_generation_tokens_total", "vllm:generation_tokens_total")):
        total = sum(v for _, v in samples(llama.url, ours))
        assert samples(llama.url, theirs) == [({"model_name": base}, total)] and total > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert samples(llama.url, name) == [({"model_name": base}, 0.0)], name  # idle
    [(labels, value)] = samples(llama.url, "vllm:lora_requests_info")
    assert labels == {"max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(value - time.time()) < 60


class StatsEngine(ScriptEngine):
    """A scripted engine that reports given stats; slow tokens, so a request is still generating when scraped."""

    max_batch_size = 4

    def __init__(self, script, stats):
        super().__init__(script)
        self._stats = stats

    def stats(self):
        return self._stats

    def submit(self, req, on_token):
        def slow(token, reason):
            if token is not None:
                time.sleep(0.02)
            on_token(token, reason)
        return super().submit(req, slow)


def test_vllm_gauges_follow_the_engine():
    stats = {"running": {"alpha": 2, "base": 1, "beta": 1}, "waiting": {"beta": 3}, "queue_size": 3}
    srv = script_app(engine=StatsEngine(byte_tokenizer()("A" * 200).input_ids, stats), max_loras=5)
    try:
        assert samples(srv.url, "vllm:num_requests_running") == [({"model_name": "bytes"}, 4.0)]
        assert samples(srv.url, "vllm:num_requests_waiting") == [({"model_name": "bytes"}, 3.0)]
        [(labels, _)] = samples(srv.url, "vllm:lora_requests_info")
        assert labels == {"max_lora": "5", "running_lora_adapters": "alpha,beta", "waiting_lora_adapters": "beta"}
        # the KV estimate: positions of the requests generating, over max_batch_size x max_context
        assert samples(srv.url, "vllm:kv_cache_usage_perc") == [({"model_name": "bytes"}, 0.0)]
        stream = srv.client.completions.create(model="bytes", prompt="go" * 500, max_tokens=200, stream=True)
        next(iter(stream))
        [(_, usage)] = samples(srv.url, "vllm:kv_cache_usage_perc")
        assert (1000 + 1) / (4 * 4096) <= usage <= (1000 + 200) / (4 * 4096)
        stream.close()
        # an engine that reports its own use wins
        stats["kv_cache_usage_perc"] = 0.5
        assert samples(srv.url, "vllm:kv_cache_usage_perc") == [({"model_name": "bytes"}, 0.5)]
    finally:
        srv.stop()


def test_new_flags_have_help_and_defaults():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for flag in ("max_body_bytes", "max_prompt_chars", "max_loras"):
        assert actions[flag].help, flag
    args = parser.parse_args([])
    assert (args.max_body_bytes, args.max_prompt_chars, args.max_loras) == (4 * MB, None, 64)
    assert parser.parse_args(["--max-loras", "7"]).max_loras == 7  # vLLM's spelling
