"""Every engine through the one contract (serve/contract.py EngineClient): the sequential engine and both routes of
the batched one take the same calls, refuse the same things with the same words, keep the same position budget, and
give the tokens `prefix.generate.Generator` gives each request alone (the independent reference)."""
from __future__ import annotations

import threading

import pytest
import torch
from test_serve_engine import PROMPTS, Setup, route_param, tiny_gpt2_dir  # noqa: F401

from prefixtune.prefix import prefix_shape
from prefixtune.serve.contract import EngineClient, GenRequest, UnknownTask
from prefixtune.serve.sequential import SequentialEngine

ENGINES = ["sequential", route_param("paged"), route_param("padded")]


def build(setup: Setup, kind: str, **kw) -> EngineClient:
    if kind == "sequential":
        engine = SequentialEngine(setup.model, setup.tok, **kw)
        for name, (table, shape) in setup.tables.items():
            engine.add_task(name, table, shape)
        return engine
    return setup.engine(kind, **kw)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    return Setup(tiny_llama_dir, tmp_path_factory.mktemp("contract_llama"))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir, tmp_path_factory):  # noqa: F811
    return Setup(tiny_gpt2_dir, tmp_path_factory.mktemp("contract_gpt2"))


def run(engine: EngineClient, reqs: list[GenRequest]) -> list[tuple[list[int], str]]:
    """Submit every request through the contract, wait for each one's end: (tokens, finish reason) per request."""
    outs, ends, done = [[] for _ in reqs], [None] * len(reqs), threading.Event()

    def collector(i):
        def on_token(token, reason, logprob=None):
            if token is not None:
                outs[i].append(token)
            else:
                ends[i] = reason
                if all(e is not None for e in ends):
                    done.set()
        return on_token

    for i, req in enumerate(reqs):
        engine.submit(req, collector(i))
    assert done.wait(120), ends
    return list(zip(outs, ends))


@pytest.mark.parametrize("kind", ENGINES)
def test_every_engine_gives_each_request_what_it_gives_alone(llama, kind):
    engine = build(llama, kind)
    assert isinstance(engine, EngineClient)
    assert engine.errored is None and set(engine.tasks()) == {"short", "mid", "long"}
    engine.start()
    try:
        tasks = [None, "short", "mid", "long"]
        reqs = [GenRequest(llama.ids(p), task=tasks[i % 4], max_new_tokens=5) for i, p in enumerate(PROMPTS[:6])]
        got = run(engine, reqs)
        for (tokens, end), req, prompt in zip(got, reqs, PROMPTS):
            assert end == "length" and tokens == llama.reference(prompt, req.task, 5), (kind, req.task)
        stats = engine.stats()
        assert {"running", "waiting", "queue_size", "max_queue"} <= set(stats)
        # run-time task changes, through the contract
        assert engine.remove_task("mid", timeout=10) is True
        assert "mid" not in engine.tasks()
        with pytest.raises(UnknownTask):
            engine.submit(GenRequest(llama.ids("x"), task="mid"), lambda *a: None)
        table, shape = llama.tables["mid"]
        engine.add_task("mid2", table, shape)
        (tokens, _), = run(engine, [GenRequest(llama.ids(PROMPTS[0]), task="mid2", max_new_tokens=4)])
        assert tokens == llama.reference(PROMPTS[0], "mid", 4)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ENGINES)
def test_every_engine_refuses_the_same_things_in_the_same_words(llama, kind):
    engine = build(llama, kind)
    vocab = llama.model.get_output_embeddings().weight.shape[0]
    bad_requests = [
        (GenRequest([]), "expected prompt_ids to be a non-empty list of token ids"),
        (GenRequest([vocab]), f"expected prompt token ids in [0, {vocab})"),
        (GenRequest([5], max_new_tokens=0), "expected max_new_tokens >= 1, got 0"),
        (GenRequest([5], temperature=-1.0), "expected a finite temperature >= 0, got -1.0"),
        (GenRequest([5], top_p=0.0), "expected 0 < top_p <= 1, got 0.0"),
    ]
    for req, words in bad_requests:
        with pytest.raises(ValueError) as e:
            engine.submit(req, lambda *a: None)
        assert str(e.value) == words, kind
    table, shape = llama.tables["short"]
    for name, words in [("base", "task name 'base' is reserved"), ("../x", "task name '../x': expected 1-64")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(".", r"\.")):
            engine.add_task(name, table, shape)
    other = prefix_shape(llama.model.config, 3)
    wrong = type(other)(num_layers=other.num_layers + 1, num_kv_heads=other.num_kv_heads,
                        head_dim=other.head_dim, prefix_len=3)
    with pytest.raises(ValueError, match="does not fit the model's"):
        engine.add_task("wrong", torch.zeros(3, wrong.width), wrong)
    with pytest.raises(ValueError, match="NaN or infinity"):
        engine.add_task("nan", torch.full((3, shape.width), float("nan")), other)
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_task("short", table, shape)
    engine.shutdown()


@pytest.mark.parametrize("kind", ENGINES)
def test_the_position_budget_is_one_rule(gpt2, kind):
    """GPT-2's learned table ends at 256 positions: P + T + N - 1 = 256 runs on every engine, 257 is refused by
    every engine (the sequential one used to run it into an index error) and by the HTTP layer's count."""
    from prefixtune.prefix.positions import positions_needed

    engine = build(gpt2, kind)
    assert engine.max_context == 256
    P = gpt2.tables["long"][1].prefix_len  # 21
    prompt = [5] * 200
    fits = 256 - P - len(prompt) + 1  # 36
    assert positions_needed(P, len(prompt), fits) == 256
    with pytest.raises(ValueError, match=r"expected at most 256 positions .*got 257"):
        engine.submit(GenRequest(prompt, task="long", max_new_tokens=fits + 1), lambda *a: None)
    engine.start()
    try:
        (tokens, end), = run(engine, [GenRequest(prompt, task="long", max_new_tokens=fits)])
        assert end == "length" and len(tokens) == fits
    finally:
        engine.shutdown()
