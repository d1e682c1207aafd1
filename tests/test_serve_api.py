"""prefix_serve's OpenAI API, driven by the official `openai` client against a real uvicorn on a tiny Llama.

The engine is a fixture (`engine_cls`): every test that generates runs against `SequentialEngine` and, once
serve/engine.py builds on serve/contract.py, against the batched `Engine` too. Greedy outputs are compared with greedy
decoding by full recomputation through HF eager attention (tests/test_equivalence.py's `reference_logits`).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from test_equivalence import P, reference_logits
from test_inference import greedy_reference

from prefixtune.prefix import prefix_shape
from prefixtune.prefix.io import save_prefix
from prefixtune.serve import contract as serve_types
from prefixtune.serve.__main__ import build, build_parser
from prefixtune.serve.app import ServeOptions, create_app
from prefixtune.serve.detok import IncrementalDetokenizer, StopText
from prefixtune.serve.sequential import SequentialEngine
from prefixtune.serve.server import serve_in_thread

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT = "The quick brown fox"


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sequential", "batched"])
def engine_cls(request):
    if request.param == "sequential":
        return SequentialEngine
    from prefixtune.serve.engine import Engine

    return Engine


@pytest.fixture(scope="module")
def tables(tiny_llama_dir, tmp_path_factory):
    """Random prefix tables saved as prefix files: alpha and beta (given at start), gamma (loaded at run time),
    delta (appears in --prefix_dir)."""
    from transformers import AutoConfig

    shape = prefix_shape(AutoConfig.from_pretrained(tiny_llama_dir), P)
    d = tmp_path_factory.mktemp("serve_prefixes")
    out = {"dir": d, "shape": shape}
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        torch.manual_seed(20 + i)
        out[name] = torch.randn(P, shape.width) * 2
        save_prefix(d / f"{name}.safetensors", out[name], shape, task=name, base_model=str(tiny_llama_dir),
                    architecture="llama")
    return out


def start_server(model_dir, tables, engine_cls, *extra):
    argv = ["--model", str(model_dir), "--engine", "sequential", "--device", "cpu", "--dtype", "fp32",
            "--chat_template", CHAT_TEMPLATE, *map(str, extra)]
    app, engine = build(build_parser().parse_args(argv), engine_cls=engine_cls)
    srv = serve_in_thread(app, drain_timeout=30)
    srv.engine, srv.app = engine, app
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return srv


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tables, engine_cls, tmp_path_factory):
    prefix_dir = tmp_path_factory.mktemp("prefix_dir")
    d = tables["dir"]
    srv = start_server(tiny_llama_dir, tables, engine_cls, "--prefix", d / "alpha.safetensors",
                       d / "beta.safetensors", "--prefix_dir", prefix_dir, "--load_from", d)
    srv.prefix_dir = prefix_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_llama_dir)
    t.chat_template = CHAT_TEMPLATE
    return t


# --- helpers ----------------------------------------------------------------------------------------------------
_EAGER = {}


def reference(model_dir, table, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy ids by full recomputation through HF eager attention over a hand-built prefix cache."""
    from transformers import AutoModelForCausalLM

    if model_dir not in _EAGER:
        _EAGER[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    eager = _EAGER[model_dir]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones_like(ids)
            logits = (eager(input_ids=ids, attention_mask=mask).logits if table is None
                      else reference_logits(eager, table, ids, mask))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def continuation(tok, prompt_ids, new_ids) -> str:
    """The text the new ids add to the prompt (a sentencepiece word keeps its leading space)."""
    def dec(ids):
        return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return dec(list(prompt_ids) + list(new_ids))[len(dec(prompt_ids)):]


def call(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def assert_error(status_body, status: int, *words):
    got, body = status_body
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for w in words:
        assert w in body["error"]["message"], body


def complete(srv, model, prompt=PROMPT, n=8, **kw):
    return srv.client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"ignore_eos": True}, **kw)


def metric(srv, name: str, **labels) -> float:
    _, text = call(srv.url, "GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            got = head[len(name):].strip("{}")
            if all(f'{k}="{v}"' in got for k, v in labels.items()) or not want:
                total += float(value)
    return total


class Blocker:
    """A request submitted straight to the engine whose first token blocks the engine thread until release()."""

    def __init__(self, engine, prompt_ids):
        self.go, self.blocked, self.done = threading.Event(), threading.Event(), threading.Event()

        def on_token(token, reason):
            if token is not None and not self.blocked.is_set():
                self.blocked.set()
                self.go.wait(60)
            if reason is not None:
                self.done.set()

        engine.submit(serve_types.GenRequest(prompt_ids, max_new_tokens=2), on_token)
        assert self.blocked.wait(30), "the engine never started the blocking request"

    def release(self):
        self.go.set()
        assert self.done.wait(30)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def waiting(engine) -> int:
    return sum((engine.stats().get("waiting") or {}).values())


def in_engine(engine, task) -> int:
    stats = engine.stats()
    return (stats.get("waiting") or {}).get(task, 0) + (stats.get("running") or {}).get(task, 0)


# --- generation -------------------------------------------------------------------------------------------------
def test_completions_match_greedy_reference(server, tables, tok, tiny_llama_dir):
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    base_id = str(tiny_llama_dir)
    for model, table in [("alpha", tables["alpha"]), ("beta", tables["beta"]), (base_id, None), ("base", None)]:
        r = complete(server, model)
        want = reference(str(tiny_llama_dir), table, ids, 8)
        assert r.choices[0].text == continuation(tok, ids, want), model
        assert r.choices[0].finish_reason == "length" and r.model == model
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    # the reference above is test_inference's greedy_reference, up to the leading space of the first word
    assert complete(server, "alpha").choices[0].text.strip() == greedy_reference(
        tiny_llama_dir, tables["alpha"], PROMPT, 8).strip()
    assert len({complete(server, m).choices[0].text for m in ("alpha", "beta", base_id)}) == 3


def test_streaming_equals_non_streaming(server):
    full = complete(server, "alpha", n=12)
    chunks = list(complete(server, "alpha", n=12, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # on the wire: server-sent events ending with [DONE]
    status, text = call(server.url, "POST", "/v1/completions", {"model": "beta", "prompt": PROMPT, "max_tokens": 4,
                                                                 "temperature": 0, "stream": True})
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_chat_completions(server, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lists and tuples"}]
    r = server.client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    same = complete(server, "alpha", prompt=text, n=6)
    assert r.choices[0].message.content == same.choices[0].text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == same.usage.prompt_tokens and r.object == "chat.completion"
    chunks = list(server.client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == same.choices[0].text
    assert chunks[-1].usage.total_tokens == same.usage.total_tokens


def test_stop_strings(server):
    full = complete(server, "alpha", n=16).choices[0].text
    k = len(full) // 2
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    r = complete(server, "alpha", n=16, stop=[stop, "never appears"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    chunks = list(complete(server, "alpha", n=16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(server):
    a, b = (server.client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9,
                                             seed=7).choices[0].text for _ in range(2))
    assert a == b


# --- models and tasks at run time ---------------------------------------------------------------------------------
def test_models_lists_base_and_tasks(server, tiny_llama_dir):
    cards = {m.id: m for m in server.client.models.list().data}
    base = str(tiny_llama_dir)
    assert {base, "alpha", "beta"} <= set(cards)
    assert cards[base].parent is None and cards["alpha"].parent == base and cards["beta"].parent == base
    assert cards["alpha"].root.endswith("alpha.safetensors")
    assert server.client.models.retrieve("alpha").id == "alpha"


def test_load_and_unload_a_task(server, tables, tok, tiny_llama_dir):
    url, d = server.url, tables["dir"]
    load = {"lora_name": "gamma", "lora_path": str(d / "gamma.safetensors")}
    assert call(url, "POST", "/v1/load_lora_adapter", load)[0] == 200
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    want = continuation(tok, ids, reference(str(tiny_llama_dir), tables["gamma"], ids, 8))
    assert complete(server, "gamma").choices[0].text == want
    assert server.client.models.retrieve("gamma").parent == str(tiny_llama_dir)
    assert_error(call(url, "POST", "/v1/load_lora_adapter", load), 400, "already loaded")
    # refused before any request can use it
    assert_error(call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": load["lora_path"]}),
                 400, "reserved")
    assert_error(call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(d / "no")}),
                 400, "does not exist")
    shape = tables["shape"]
    save_prefix(d / "other.safetensors", torch.zeros(P, shape.width), shape, task="other",
                base_model="some/other-model", architecture="llama")
    assert_error(call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "other",
                                                             "lora_path": str(d / "other.safetensors")}),
                 400, "some/other-model")
    bad = shape.__class__(shape.num_layers, shape.num_kv_heads, shape.head_dim * 2, P)
    save_prefix(d / "wide.safetensors", torch.zeros(P, bad.width), bad, task="wide",
                base_model=str(tiny_llama_dir), architecture="llama")
    assert_error(call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "wide",
                                                             "lora_path": str(d / "wide.safetensors")}),
                 400, "head_dim")
    # unload: gone afterwards
    assert call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        complete(server, "gamma")
    assert "gamma" not in {m.id for m in server.client.models.list().data}
    assert_error(call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"}), 404, "gamma")


def test_unload_waits_for_requests_in_flight(server, tables, tok):
    url = server.url
    load = {"lora_name": "gamma2", "lora_path": str(tables["dir"] / "gamma.safetensors")}
    assert call(url, "POST", "/v1/load_lora_adapter", load)[0] == 200
    blocker = Blocker(server.engine, tok(PROMPT, add_special_tokens=False).input_ids)
    answers, unloaded = [], []
    t1 = threading.Thread(target=lambda: answers.append(complete(server, "gamma2", n=3)))
    t1.start()
    wait_for(lambda: in_engine(server.engine, "gamma2") == 1)
    t2 = threading.Thread(target=lambda: unloaded.append(call(url, "POST", "/v1/unload_lora_adapter",
                                                               {"lora_name": "gamma2"})))
    t2.start()
    wait_for(lambda: "gamma2" not in server.engine.tasks())  # new requests are refused at once ...
    assert_error(call(url, "POST", "/v1/completions", {"model": "gamma2", "prompt": "x"}), 404, "gamma2")
    time.sleep(0.2)
    assert t2.is_alive() and not unloaded  # ... but the unload waits for the one in flight
    blocker.release()
    t1.join(30)
    t2.join(30)
    assert answers[0].usage.completion_tokens == 3 and unloaded[0][0] == 200


def test_prefix_dir_loads_on_first_request(server, tables, tok, tiny_llama_dir):
    import shutil

    with pytest.raises(openai.NotFoundError):
        complete(server, "delta")
    shutil.copy(tables["dir"] / "delta.safetensors", server.prefix_dir / "delta.safetensors")
    (server.prefix_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert "delta" in {m.id for m in server.client.models.list().data}
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    want = continuation(tok, ids, reference(str(tiny_llama_dir), tables["delta"], ids, 8))
    assert complete(server, "delta").choices[0].text == want
    assert "delta" in server.engine.tasks()
    with pytest.raises(openai.BadRequestError, match="broken"):
        complete(server, "broken")
    with pytest.raises(openai.NotFoundError):
        complete(server, "../delta")
    assert complete(server, "alpha").choices[0].finish_reason == "length"


# --- errors --------------------------------------------------------------------------------------------------------
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url = server.url
    assert_error(call(url, "POST", "/v1/completions", raw=b'{"model": "alpha", "prompt": '), 400, "JSON")
    assert_error(call(url, "POST", "/v1/completions", raw=b"[1, 2]"), 400, "object")
    r = call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": "many"})
    assert_error(r, 400, "max_tokens")
    assert r[1]["error"]["param"] == "max_tokens"
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "temperature": -1}), 400,
                 "temperature")
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "n": 0}), 400, "n")
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "best_of": 2}), 400,
                 "best_of")
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "echo": True}), 400, "echo")
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "frobnicate": 1}), 400,
                 "frobnicate")
    assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": ["a", ""]}), 400, "prompt[1]")
    assert_error(call(url, "POST", "/v1/chat/completions", {"model": "alpha", "messages": [
        {"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "tool")
    assert_error(call(url, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "nope")
    # too long: prompt + prefix + max_tokens past the model's 256 positions
    ctx = server.engine.max_context
    r = call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": ctx})
    assert_error(r, 400, "maximum context length", str(ctx))
    assert r[1]["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.completions.create(model="alpha", prompt="fox " * ctx, max_tokens=1)
    assert_error(call(url, "GET", "/v1/nothing"), 404)
    # the openai client raises the right classes
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        server.client.completions.create(model="alpha", prompt="x", logit_bias={"5": 1.0})
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert complete(server, "alpha").choices[0].finish_reason == "length"
    assert call(url, "GET", "/health")[0] == 200


def test_queue_full_is_429(tiny_llama_dir, tables, engine_cls, tok):
    srv = start_server(tiny_llama_dir, tables, engine_cls, "--prefix", tables["dir"] / "alpha.safetensors",
                       "--max_queue", 1, "--max_batch_size", 1)
    try:
        ids = tok(PROMPT, add_special_tokens=False).input_ids
        blocker = Blocker(srv.engine, ids)
        results = []
        t = threading.Thread(target=lambda: results.append(complete(srv, "alpha", n=3)))
        t.start()
        wait_for(lambda: waiting(srv.engine) == 1)
        r = call(srv.url, "POST", "/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
        assert_error(r, 429, "busy")
        with pytest.raises(openai.RateLimitError):
            complete(srv, "alpha")
        blocker.release()
        t.join(30)
        assert results and results[0].usage.completion_tokens == 3  # the queued request got its answer
        assert complete(srv, "alpha").choices[0].finish_reason == "length"
        assert metric(srv, "prefixtune_requests_total", status="429") == 2
    finally:
        srv.stop()


def test_draining_answers_503_and_finishes_requests_in_flight(tiny_llama_dir, tables, engine_cls, tok):
    srv = start_server(tiny_llama_dir, tables, engine_cls, "--prefix", tables["dir"] / "alpha.safetensors")
    try:
        ids = tok(PROMPT, add_special_tokens=False).input_ids
        blocker = Blocker(srv.engine, ids)
        chunks = []
        t = threading.Thread(target=lambda: chunks.extend(complete(srv, "alpha", n=6, stream=True)))
        t.start()
        wait_for(lambda: in_engine(srv.engine, "alpha") == 1)
        srv.drain()  # what SIGTERM does
        wait_for(lambda: call(srv.url, "GET", "/health")[0] == 503)
        assert_error(call(srv.url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x"}), 503, "shutting down")
        with pytest.raises(openai.InternalServerError):
            complete(srv, "alpha")
        assert call(srv.url, "GET", "/metrics")[0] == 200
        assert srv.thread.is_alive()  # still waiting for the request in flight
        blocker.release()
        t.join(30)
        assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
        srv.thread.join(30)
        assert not srv.thread.is_alive()  # then it exits by itself
    finally:
        srv.stop()


def test_client_disconnect_cancels_its_request(server, tok):
    before = metric(server, "prefixtune_requests_total", task="beta", status="cancelled")
    tokens_before = metric(server, "prefixtune_generation_tokens_total", task="beta")
    n = server.engine.max_context - P - len(tok(PROMPT, add_special_tokens=False).input_ids)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": "beta", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the first chunk came
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: metric(server, "prefixtune_requests_total", task="beta", status="cancelled") == before + 1)
    wait_for(lambda: not (server.engine.stats().get("running") or {}).get("beta"))
    assert metric(server, "prefixtune_generation_tokens_total", task="beta") - tokens_before < n
    assert complete(server, "beta").choices[0].finish_reason == "length"


def test_metrics(server):
    complete(server, "alpha")
    list(complete(server, "beta", stream=True))
    _, text = call(server.url, "GET", "/metrics")
    for name in ("prefixtune_num_requests_running", "prefixtune_num_requests_waiting",
                 "prefixtune_time_to_first_token_seconds_bucket", "prefixtune_time_per_output_token_seconds_bucket",
                 "prefixtune_e2e_request_latency_seconds_bucket", "prefixtune_prompt_tokens_total",
                 "prefixtune_generation_tokens_total", "prefixtune_requests_total"):
        assert name in text, name
    assert metric(server, "prefixtune_time_to_first_token_seconds_count", task="alpha") >= 1
    assert metric(server, "prefixtune_requests_total", task="beta", status="length") >= 1
    assert metric(server, "prefixtune_requests_total", status="404") >= 1


# --- the HTTP layer alone: a scripted engine and a byte-level tokenizer --------------------------------------------
def byte_tokenizer():
    """One token per byte (GPT-2's byte-level alphabet), so 😃 spans four tokens; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


class ScriptEngine:
    """The engine interface with no model: every request gets the same token script, one token at a time."""

    max_context = 4096
    errored = None

    def __init__(self, script):
        self.script, self.cancelled, self.ids = script, set(), iter(range(1, 10 ** 6))

    def tasks(self):
        return {}

    def submit(self, req, on_token):
        rid = next(self.ids)

        def run():
            for i, t in enumerate(self.script[:req.max_new_tokens]):
                if rid in self.cancelled:
                    return on_token(None, "cancelled")
                on_token(t, None)
                time.sleep(0.001)
            on_token(None, "length" if req.max_new_tokens <= len(self.script) else "stop")

        threading.Thread(target=run, daemon=True).start()
        return rid

    def cancel(self, rid):
        self.cancelled.add(rid)

    def start(self):
        pass

    def shutdown(self, drain=True, timeout=None):
        pass

    def stats(self):
        return {"running": {}, "waiting": {}}


def test_incremental_detokenizer_never_splits_a_character():
    tok = byte_tokenizer()
    text = "Hi 😃 é, ok 😃😃"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # several tokens per emoji
    d = IncrementalDetokenizer(tok, tok("x", add_special_tokens=False).input_ids)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    d = IncrementalDetokenizer(tok, [])
    assert [d.add(i) for i in ids[3:5]] == ["", ""] and d.flush() == "\ufffd"  # an unfinished emoji, flushed
    s = StopText(["STOP", "xyz"])
    assert s.push("abc ST") == ("abc ", False)  # "ST" may begin "STOP": held back
    assert s.push("OP and more") == ("", True) and s.text == "abc "
    s = StopText(["STOP"])
    assert s.push("abc ST") == ("abc ", False) and s.push("ay") == ("STay", False) and s.flush() == ""


def test_streamed_chunks_never_hold_half_a_character():
    tok = byte_tokenizer()
    text = "Smile 😃 every line 😃 END tail"
    app = create_app(ScriptEngine(tok(text, add_special_tokens=False).input_ids), tok, "bytes",
                     ServeOptions(api_key="sekret"))
    srv = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        chunks = [c.choices[0].text for c in client.completions.create(model="bytes", prompt="go", max_tokens=100,
                                                                       stream=True)]
        assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
        assert any("😃" in c for c in chunks)
        stopped = list(client.completions.create(model="bytes", prompt="go", max_tokens=100, stream=True, stop="END"))
        assert "".join(c.choices[0].text for c in stopped) == "Smile 😃 every line 😃 "
        assert stopped[-1].choices[0].finish_reason == "stop"
        # the API key: 401 without it or with another, /health and /metrics open
        assert_error(call(srv.url, "POST", "/v1/completions", {"model": "bytes", "prompt": "go"}), 401, "API key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert call(srv.url, "GET", "/health")[0] == 200 and call(srv.url, "GET", "/metrics")[0] == 200
        # a tokenizer without a chat template: 400 that says so
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model="bytes", prompt="go", max_tokens=5).choices[0].text == text[:5]
    finally:
        srv.stop()


# --- the command line ----------------------------------------------------------------------------------------------
def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_sigterm_drains_then_exits(tiny_llama_dir, tables, tok):
    """The real command: SIGTERM lets the stream in flight finish, turns new requests away with 503, exits 0."""
    from helpers import ROOT, free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prefixtune.serve", "--model", str(tiny_llama_dir), "--prefix",
                             str(tables["dir"] / "alpha.safetensors"), "--engine", "sequential", "--device", "cpu",
                             "--port", str(port), "--log_level", "warning"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if call(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        n = 120
        streams, first_chunk = [], threading.Event()

        def stream():  # a long stream; the engine runs them one after another
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps({
                "model": "alpha", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True}), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            first = resp.readline()
            first_chunk.set()
            streams.append(first.decode() + resp.read().decode())

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        assert first_chunk.wait(30)
        srv = type("Srv", (), {"url": url})
        wait_for(lambda: metric(srv, "prefixtune_num_requests_running", task="alpha")
                 + metric(srv, "prefixtune_num_requests_waiting", task="alpha") == 2)  # both in flight
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: call(url, "GET", "/health")[0] == 503)
        assert_error(call(url, "POST", "/v1/completions", {"model": "alpha", "prompt": "x"}), 503, "shutting down")
        for t in threads:
            t.join(60)
        assert len(streams) == 2
        for text in streams:  # every stream in flight finished whole
            events = [e for e in text.split("\n\n") if e.strip()]
            assert events[-1].strip() == "data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _FakeTok:
    """Three tokens for any prompt, one 'x' per token: enough for the app around a fake engine."""
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5, 6, 7]}

    def decode(self, ids, **kw):
        return "x" * len(ids)

    def __len__(self):
        return 100


def test_health_says_when_the_engine_died():
    """A dead engine thread must not look healthy: /health is 503 and requests get a 500 that says to restart."""
    from fastapi.testclient import TestClient

    from prefixtune.serve.app import ServeOptions, create_app
    from prefixtune.serve.contract import EngineStopped

    class Dead:
        max_context = 64
        errored = "RuntimeError: boom"

        def tasks(self):
            return {}

        def stats(self):
            return {"running": {}, "waiting": {}}

        def submit(self, req, on_token):
            raise EngineStopped("the engine has stopped")

        def start(self):
            pass

        def shutdown(self, drain=True, timeout=None):
            pass

    app = create_app(Dead(), _FakeTok(), "tiny", ServeOptions())
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and "restart" in r.json()["error"]["message"]


def test_load_by_path_only_inside_the_allowed_folders(server, tables, tmp_path):
    """load_lora_adapter reads server files: a path outside --prefix_dir / --load_from is 403, also through '..'
    or a link; nothing is loaded."""
    import os
    import shutil

    url, d = server.url, tables["dir"]
    outside = tmp_path / "gamma.safetensors"
    shutil.copy(d / "gamma.safetensors", outside)
    link = d / "link_out.safetensors"
    os.symlink(outside, link)
    try:
        for path in (outside, d / ".." / tmp_path.name / "gamma.safetensors", link, "/etc/passwd"):
            r = call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": str(path)})
            assert_error(r, 403, "--load_from")
        assert "sneaky" not in server.engine.tasks()
    finally:
        link.unlink()


def _fake_app(engine, **options):
    from fastapi.testclient import TestClient

    from prefixtune.serve.app import ServeOptions, create_app

    return TestClient(create_app(engine, _FakeTok(), "tiny", ServeOptions(**options)), raise_server_exceptions=False)


class _FakeEngine:
    max_context = 64
    errored = None

    def tasks(self):
        return {"slow": None}

    def stats(self):
        return {"running": {}, "waiting": {}}

    def start(self):
        pass

    def shutdown(self, drain=True, timeout=None):
        pass


def test_loading_by_path_is_off_without_a_folder():
    with _fake_app(_FakeEngine()) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp/a.safetensors"})
        assert r.status_code == 403 and "--load_from" in r.json()["error"]["message"]


def test_unload_answers_202_when_requests_outlive_the_deadline():
    calls = []

    class Engine(_FakeEngine):
        def remove_task(self, name, timeout=None):
            calls.append((name, timeout))
            return False  # still in flight after `timeout`

    with _fake_app(Engine(), drain_timeout=0.5) as client:
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "slow"})
    assert r.status_code == 202 and "in flight" in r.text and calls == [("slow", 0.5)]


def test_internal_errors_do_not_reach_the_client(caplog):
    """An unexpected exception is a 500 with a reference; its text (paths, internals) goes only to the log."""
    class Engine(_FakeEngine):
        def submit(self, req, on_token):
            raise RuntimeError("secret at /home/ops/weights/model.bin")

    with _fake_app(Engine()) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    msg = r.json()["error"]["message"]
    assert r.status_code == 500 and "secret" not in msg and "/home" not in msg
    ref = msg.split()[3]
    assert ref.startswith("err-") and any(ref in rec.getMessage() for rec in caplog.records)
    assert "secret at /home/ops" in caplog.text
