"""The request surface vLLM's OpenAI server offers, through real HTTP and the `openai` client, on the sequential
engine and on both routes of the batched engine (paged, padded): logprobs, n, penalties, top_k, min_p,
stop_token_ids, include_stop_str_in_output, batched prompts, continuous usage stats, /tokenize, /detokenize, /version.

Every value is checked against an independent reference: logprobs against torch.log_softmax of a plain HF eager
forward over [prefix as past_key_values + prompt + tokens so far] (tests/test_equivalence.py's `reference_logits`),
penalties against a penalised argmax computed here by hand, n > 1 against single requests with seed + j.
"""
from __future__ import annotations

import math

import openai
import pytest
import torch
from test_equivalence import reference_logits
from test_serve_api import PROMPT, assert_error, call, continuation, reference, start_server, tables, tok  # noqa: F401

from prefixtune.serve.sequential import SequentialEngine

VARIANTS = ["sequential", "paged", "padded"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lists and tuples"}]
IDS = {"return_tokens_as_token_ids": True}  # logprobs name tokens "token_id:N": ids that decode to "" stay apart


@pytest.fixture(scope="module", params=VARIANTS)
def srv(request, tiny_llama_dir, tables):  # noqa: F811
    if request.param == "sequential":
        s = start_server(tiny_llama_dir, tables, SequentialEngine, "--prefix", tables["dir"] / "alpha.safetensors",
                         tables["dir"] / "beta.safetensors")
    else:
        from prefixtune.serve.engine import Engine

        s = start_server(tiny_llama_dir, tables, Engine, "--prefix", tables["dir"] / "alpha.safetensors",
                         tables["dir"] / "beta.safetensors", "--route", request.param)
    s.variant = request.param
    yield s
    s.stop()


# --- references ---------------------------------------------------------------------------------------------------
_EAGER = {}


def raw_logits(model_dir, table, ids: list[int]) -> torch.Tensor:
    """The model's fp32 logits (V,) after `ids`, the prefix in front as a hand-built cache (eager attention)."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _EAGER:
        _EAGER[key] = AutoModelForCausalLM.from_pretrained(key, attn_implementation="eager").eval()
    model = _EAGER[key]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = (model(input_ids=x, attention_mask=torch.ones_like(x)).logits if table is None
                  else reference_logits(model, table, x, torch.ones_like(x)))
    return logits[0, -1].float()


def penalised_greedy(model_dir, table, prompt: list[int], n: int, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy ids with the penalties applied by hand: repetition over prompt + output (HF/vLLM), presence and
    frequency over the output (OpenAI)."""
    out: list[int] = []
    for _ in range(n):
        x = raw_logits(model_dir, table, prompt + out).tolist()
        for t in set(prompt) | set(out):
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t in set(out):
            x[t] -= frequency * out.count(t) + presence
        out.append(max(range(len(x)), key=x.__getitem__))
    return out


def token_id(name: str) -> int:
    assert name.startswith("token_id:"), name
    return int(name.removeprefix("token_id:"))


def ids_of(tok, text):  # noqa: F811
    return tok(text, add_special_tokens=False).input_ids


def chat_ids(tok):  # noqa: F811
    return ids_of(tok, tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))


# --- logprobs -----------------------------------------------------------------------------------------------------
def test_completion_logprobs_are_the_models_log_softmax(srv, tables, tok, tiny_llama_dir):  # noqa: F811
    ids, table = ids_of(tok, PROMPT), tables["alpha"]
    r = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True, **IDS})
    lp = r.choices[0].logprobs
    path = [token_id(t) for t in lp.tokens]
    assert path == reference(str(tiny_llama_dir), table, ids, 6) and r.usage.completion_tokens == len(lp.tokens)
    for i, (t, value, top) in enumerate(zip(path, lp.token_logprobs, lp.top_logprobs)):
        ref = torch.log_softmax(raw_logits(tiny_llama_dir, table, ids + path[:i]), -1)
        assert abs(value - ref[t]) < 1e-4
        assert {token_id(k) for k in top} == set(torch.topk(ref, 3).indices.tolist()) | {t}
        assert all(abs(v - ref[token_id(k)]) < 1e-4 for k, v in top.items())
    # token names without return_tokens_as_token_ids: each token's own text, as vLLM; text_offset adds them up
    named = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True}).choices[0].logprobs
    assert named.tokens == [tok.decode([t]) for t in path] and named.token_logprobs == lp.token_logprobs
    assert named.text_offset == [sum(len(x) for x in named.tokens[:i]) for i in range(6)]
    # sampled at temperature 1.5: still the model's raw distribution, not the tempered one (vLLM's raw_logprobs)
    r = srv.client.completions.create(model="beta", prompt=PROMPT, max_tokens=5, temperature=1.5, seed=3, logprobs=1,
                                      extra_body={"ignore_eos": True, **IDS})
    lp, ids_b, tempered_differs = r.choices[0].logprobs, ids_of(tok, PROMPT), False
    path = [token_id(t) for t in lp.tokens]
    for i, (t, value) in enumerate(zip(path, lp.token_logprobs)):
        logits = raw_logits(tiny_llama_dir, tables["beta"], ids_b + path[:i])
        assert abs(value - torch.log_softmax(logits, -1)[t]) < 1e-4
        tempered_differs |= abs(value - torch.log_softmax(logits / 1.5, -1)[t]) > 1e-3
    assert tempered_differs
    # streamed: the same entries, spread over the chunks
    chunks = list(srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                                stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((x.tokens for x in streamed), []) == named.tokens
    assert sum((x.token_logprobs for x in streamed), []) == named.token_logprobs
    assert sum((x.text_offset for x in streamed), []) == named.text_offset


def test_chat_logprobs_and_top_logprobs(srv, tables, tok, tiny_llama_dir):  # noqa: F811
    ids = chat_ids(tok)
    r = srv.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2, extra_body={"ignore_eos": True, **IDS})
    content = r.choices[0].logprobs.content
    path = [token_id(c.token) for c in content]
    assert len(path) == 4 == r.usage.completion_tokens
    for i, c in enumerate(content):
        ref = torch.log_softmax(raw_logits(tiny_llama_dir, tables["beta"], ids + path[:i]), -1)
        assert abs(c.logprob - ref[path[i]]) < 1e-4 and c.bytes == list(c.token.encode())
        want = torch.topk(ref, 2)
        assert [token_id(t.token) for t in c.top_logprobs] == want.indices.tolist()
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(c.top_logprobs, want.values.tolist()))
    plain = srv.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=4, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None
    chunks = list(srv.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=4, temperature=0,
                                                     logprobs=True, top_logprobs=2, stream=True,
                                                     extra_body={"ignore_eos": True, **IDS}))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]


# --- sampling parameters ------------------------------------------------------------------------------------------
def test_penalties_equal_a_hand_computed_penalised_argmax(srv, tables, tok, tiny_llama_dir):  # noqa: F811
    ids = ids_of(tok, PROMPT)
    plain = reference(str(tiny_llama_dir), tables["alpha"], ids, 12)
    for kw, extra in [({"presence_penalty": 1.5, "frequency_penalty": 1.0}, {}), ({}, {"repetition_penalty": 2.0}),
                      ({"frequency_penalty": -0.5}, {"repetition_penalty": 0.7})]:
        r = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                          **kw, extra_body={"ignore_eos": True, **IDS, **extra})
        got = [token_id(t) for t in r.choices[0].logprobs.tokens]
        want = penalised_greedy(tiny_llama_dir, tables["alpha"], ids, 12, kw.get("presence_penalty", 0.0),
                                kw.get("frequency_penalty", 0.0), extra.get("repetition_penalty", 1.0))
        assert want != plain, (kw, extra)  # the penalty matters here, so ignoring it would fail
        assert got == want, (kw, extra)


def test_top_k_and_min_p(srv, tok):  # noqa: F811
    def sample(seed, **extra):
        return srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=3.0, seed=seed,
                                             logprobs=3, extra_body={"ignore_eos": True, **IDS, **extra})

    greedy = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text
    free = {sample(seed).choices[0].text for seed in range(3)}
    assert free != {greedy}  # temperature 3 samples away from greedy ...
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # ... unless only the most likely token is left
        assert srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=3.0, seed=1,
                                             extra_body={"ignore_eos": True, **extra}).choices[0].text == greedy
    for seed in range(3):
        lp = sample(seed, top_k=3).choices[0].logprobs  # every token among the model's 3 most likely
        assert all(t in top for t, top in zip(lp.tokens, lp.top_logprobs))
        lp = sample(seed, min_p=0.5).choices[0].logprobs  # p_T(token) >= 0.5 x p_T(best) at T = 3
        for value, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert math.exp((value - max(top.values())) / 3.0) >= 0.5 - 1e-4


def test_n_choices_with_a_seed_and_greedy(srv, tok):  # noqa: F811
    kw = dict(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.5, extra_body={"ignore_eos": True})
    r = srv.client.completions.create(n=3, seed=11, **kw)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.text for c in srv.client.completions.create(n=3, seed=11, **kw).choices] == texts  # reproducible
    assert [srv.client.completions.create(n=1, seed=11 + j, **kw).choices[0].text for j in range(3)] == texts
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids_of(tok, PROMPT)), 24)
    g = srv.client.chat.completions.create(model="beta", messages=CHAT, n=2, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    one = srv.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=5, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert [c.message.content for c in g.choices] == [one.choices[0].message.content] * 2
    assert [c.index for c in g.choices] == [0, 1] and g.usage.completion_tokens == 10


def test_batched_prompts_are_indexed_prompt_major(srv, tok):  # noqa: F811
    second = "Lists and tuples"
    r = srv.client.completions.create(model="beta", prompt=[PROMPT, second], n=2, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    single = [srv.client.completions.create(model="beta", prompt=p, max_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p in (PROMPT, second)]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]] and single[0] != single[1]
    n_prompt = len(ids_of(tok, PROMPT)) + len(ids_of(tok, second))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 20)
    as_ids = srv.client.completions.create(model="beta", prompt=[ids_of(tok, second), ids_of(tok, PROMPT)],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in as_ids.choices] == single[::-1] and as_ids.usage.prompt_tokens == n_prompt
    chunks = list(srv.client.completions.create(model="beta", prompt=[PROMPT, second], n=2, max_tokens=5,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))
    by_index = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)}
    assert list(by_index.values()) == [c.text for c in r.choices]
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2, 3]


def test_stop_token_ids_and_include_stop_str_in_output(srv, tables, tok, tiny_llama_dir):  # noqa: F811
    ids = ids_of(tok, PROMPT)
    want = reference(str(tiny_llama_dir), tables["alpha"], ids, 12)
    cut = next(i for i in range(1, 12) if want[i] not in want[:i]
               and continuation(tok, ids, want[:i + 1]) != continuation(tok, ids, want[:i]))

    def run(**extra):
        return srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True, **extra})

    r = run(stop_token_ids=[want[cut]])
    assert r.choices[0].text == continuation(tok, ids, want[:cut]) and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == cut + 1  # the stop token counts (as vLLM); its text is dropped
    r = run(stop_token_ids=[want[cut]], include_stop_str_in_output=True)
    assert r.choices[0].text == continuation(tok, ids, want[:cut + 1]) and r.choices[0].finish_reason == "stop"
    full = run().choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert run(stop=[stop]).choices[0].text == full[:full.find(stop)]
    assert run(stop=[stop], include_stop_str_in_output=True).choices[0].text == full[:full.find(stop) + len(stop)]


def test_usage_in_every_chunk_with_continuous_usage_stats(srv, tok):  # noqa: F811
    n_prompt = len(ids_of(tok, PROMPT))
    kw = dict(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(srv.client.completions.create(
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    assert all(c.usage is not None and c.usage.prompt_tokens == n_prompt for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] <= 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == n_prompt + 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # no prompt token ever comes from a cache
    plain = list(srv.client.completions.create(stream_options={"include_usage": True}, **kw))
    assert all(c.usage is None for c in plain if c.choices) and plain[-1].usage.completion_tokens == 6
    chat = list(srv.client.chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=3, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chat) and chat[-1].usage.completion_tokens == 3


# --- tokenizer endpoints and refusals (engine-independent: the sequential server only) ---------------------------
@pytest.mark.parametrize("srv", ["sequential"], indirect=True)
def test_tokenize_detokenize_version(srv, tok):  # noqa: F811
    url = srv.url
    status, body = call(url, "POST", "/tokenize", {"model": "alpha", "prompt": PROMPT})
    usage = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=1).usage
    assert status == 200 and body["tokens"] == ids_of(tok, PROMPT) and body["count"] == usage.prompt_tokens
    assert body["max_model_len"] == srv.engine.max_context and set(body) == {"count", "max_model_len", "tokens"}
    status, body = call(url, "POST", "/tokenize", {"prompt": PROMPT, "add_special_tokens": True,
                                                    "return_token_strs": True})
    assert body["tokens"] == tok(PROMPT, add_special_tokens=True).input_ids
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    status, body = call(url, "POST", "/tokenize", {"model": "beta", "messages": CHAT})
    chat = srv.client.chat.completions.create(model="beta", messages=CHAT, max_tokens=1)
    assert status == 200 and body["tokens"] == chat_ids(tok) and body["count"] == chat.usage.prompt_tokens
    assert call(url, "POST", "/detokenize", {"model": "alpha", "tokens": ids_of(tok, PROMPT)}) == (
        200, {"prompt": tok.decode(ids_of(tok, PROMPT))})
    status, body = call(url, "GET", "/version")
    assert status == 200 and isinstance(body["version"], str) and body["version"]
    assert_error(call(url, "POST", "/tokenize", {"model": "nope", "prompt": "x"}), 404, "nope")
    assert_error(call(url, "POST", "/detokenize", {"tokens": [10 ** 6]}), 400, "token ids")
    assert_error(call(url, "POST", "/tokenize", {"prompt": "x", "frobnicate": 1}), 400, "frobnicate")


@pytest.mark.parametrize("srv", ["sequential"], indirect=True)
def test_out_of_range_fields_are_clear_400s(srv):
    url, base = srv.url, {"model": "alpha", "prompt": "x"}
    for field, value, words in [("n", 0, "n"), ("n", 200, "n"), ("logprobs", 21, "logprobs"),
                                ("presence_penalty", 3, "presence_penalty"), ("top_k", -2, "top_k"),
                                ("repetition_penalty", 0, "repetition_penalty"), ("min_p", 1.5, "min_p"),
                                ("stop_token_ids", [10 ** 6], "stop_token_ids"), ("best_of", 2, "best_of")]:
        assert_error(call(url, "POST", "/v1/completions", {**base, field: value}), 400, words)
    assert_error(call(url, "POST", "/v1/completions", {**base, "prompt": ["x"] * 65, "n": 2}), 400, "choices")
    with pytest.raises(openai.BadRequestError, match="logprobs must be set"):
        srv.client.chat.completions.create(model="alpha", messages=CHAT, top_logprobs=2)
    assert srv.client.completions.create(model="alpha", prompt="x", max_tokens=2).choices[0].finish_reason
