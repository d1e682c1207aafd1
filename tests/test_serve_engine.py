"""The serving engine (serve/engine.py): requests of several tasks (prefixes of different P) and bare-model requests,
arriving while others decode, give exactly what each gives alone through prefix.generate.Generator; on both routes
(transformers' continuous batching with a prefix scheduler, and the padded plain route). Also task removal, a full
queue, cancellation, stop tokens, refusals and seeded sampling."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, save_tiny

from prefixtune.prefix import prefix_shape
from prefixtune.prefix.base import load_tokenizer
from prefixtune.prefix.generate import Generator, Sampling
from prefixtune.prefix.io import save_prefix
from prefixtune.serve.engine import PAGED_TESTED, Engine, EngineStopped, GenRequest, QueueFull, UnknownTask

ROUTES = ["paged", "padded"]
TASKS = {"short": 3, "mid": 8, "long": 21}  # P; page_size 8 below: one partial page, one full, several
PROMPTS = [CORPUS[0], "Lists", CORPUS[2][:40], "Python is", CORPUS[1], "A prefix", CORPUS[4][:25], "The quick"]


def _paged_supported() -> bool:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return PAGED_TESTED[0] <= (major, minor) < PAGED_TESTED[1]


def route_param(route):
    marks = [pytest.mark.skipif(not _paged_supported(), reason="paged route verified on another transformers")]
    return pytest.param(route, marks=marks if route == "paged" else [])


class _Ids(list):
    def rstrip(self, *_):  # Generator strips a cut character from its texts: ids have none
        return self


class _IdsTokenizer:
    """The tokenizer, except that batch_decode returns token ids: Generator's output as ids."""

    def __init__(self, tok):
        object.__setattr__(self, "tok", tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __setattr__(self, name, value):
        setattr(self.tok, name, value)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def batch_decode(self, seqs, **_):
        return [_Ids(s.tolist()) for s in seqs]


class Setup:
    """A tiny saved model, its tokenizer, random prefixes (torch.randn(P, width) * 2) and Generator references."""

    def __init__(self, model_dir: Path, prefix_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # sdpa, fp32
        self.model.generation_config.eos_token_id = None  # equivalence runs to max_new_tokens; stops tested apart
        self.tok = load_tokenizer(str(model_dir))
        self.tables = {}
        self.gen = Generator(self.model, _IdsTokenizer(self.tok))
        for i, (name, p) in enumerate(TASKS.items()):
            shape = prefix_shape(self.model.config, p)
            torch.manual_seed(100 + i)
            table = torch.randn(p, shape.width) * 2
            path = prefix_dir / f"{name}.safetensors"
            save_prefix(path, table, shape, task=name, base_model=str(model_dir), architecture="test")
            self.gen.add_prefix(path)
            self.tables[name] = (table, shape)
        self._refs = {}

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def reference(self, text: str, task: str | None, n: int) -> list[int]:
        """Greedy ids for one request alone through Generator (a pre-filled DynamicCache of P positions)."""
        key = (text, task, n)
        if key not in self._refs:
            self._refs[key] = list(self.gen.generate([text], task, Sampling(max_new_tokens=n, greedy=True))[0])
        return self._refs[key]

    def engine(self, route: str, **kw) -> Engine:
        engine = Engine(self.model, self.tok, route=route, page_size=kw.pop("page_size", 8), **kw)
        assert engine.route == route
        for name, (table, shape) in self.tables.items():
            engine.add_task(name, table, shape)
        return engine


@pytest.fixture(scope="module")
def tiny_gpt2_dir(sp_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny("gpt2", sp_tokenizer_dir, tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def setups(tiny_llama_dir, tiny_neox_dir, tiny_gpt2_dir, tmp_path_factory):
    dirs = {"llama": tiny_llama_dir, "gpt_neox": tiny_neox_dir, "gpt2": tiny_gpt2_dir}
    cache = {}

    def get(arch: str) -> Setup:
        if arch not in cache:
            cache[arch] = Setup(dirs[arch], tmp_path_factory.mktemp(f"prefixes_{arch}"))
        return cache[arch]
    return get


class Collector:
    """on_token callbacks that record tokens, finish reasons and the global order of first tokens and ends."""

    def __init__(self):
        self.tokens, self.reasons, self.order = {}, {}, []
        self.lock = threading.Lock()
        self.all_done = threading.Condition(self.lock)
        self.watch: dict[int, tuple[int, threading.Event]] = {}  # key -> (after n tokens, event)

    def __call__(self, key):
        self.tokens[key] = []

        def on_token(token, reason):
            with self.lock:
                if token is not None:
                    if not self.tokens[key]:
                        self.order.append(("first", key))
                    self.tokens[key].append(token)
                    n, event = self.watch.get(key, (None, None))
                    if n is not None and len(self.tokens[key]) >= n:
                        event.set()
                else:
                    self.order.append(("end", key))
                    self.reasons[key] = reason
                    self.all_done.notify_all()
        return on_token

    def wait(self, keys, timeout=60.0):
        with self.all_done:
            assert self.all_done.wait_for(lambda: all(k in self.reasons for k in keys), timeout), self.reasons


def mixed_requests():
    """(text, task, max_new_tokens): tasks of three prefix lengths and the bare model, prompts of many lengths."""
    tasks = [None, "short", "mid", "long"]
    return [(PROMPTS[i % len(PROMPTS)], tasks[i % 4], [1, 4, 7, 2, 9, 5][i % 6]) for i in range(12)]


# ---------------------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("route", [route_param(r) for r in ROUTES])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_mixed_staggered_batch_equals_each_request_alone(setups, arch, route):
    s = setups(arch)
    reqs = mixed_requests()
    anchor = (CORPUS[3], "long", 40)  # a long one that is still decoding when the second wave arrives
    wave1, wave2 = [anchor, *reqs[:5]], reqs[5:]
    refs = [s.reference(text, task, n) for text, task, n in [*wave1, *wave2]]
    by_task = {tuple(s.reference(PROMPTS[0], task, 6)) for task in [None, *TASKS]}
    assert len(by_task) == 1 + len(TASKS), "each prefix should change the output"

    engine = s.engine(route, max_batch_size=4)  # 6 in the first wave: some wait and join when others finish
    c = Collector()
    started = threading.Event()
    c.watch[0] = (3, started)
    engine.start()
    try:
        for key, (text, task, n) in enumerate(wave1):
            engine.submit(GenRequest(s.ids(text), task=task, max_new_tokens=n), c(key))
        assert started.wait(30)  # a few steps have run
        for key, (text, task, n) in enumerate(wave2, start=len(wave1)):
            engine.submit(GenRequest(s.ids(text), task=task, max_new_tokens=n), c(key))
        keys = range(len(wave1) + len(wave2))
        c.wait(keys)
        stats = engine.stats()
    finally:
        engine.shutdown()
    for key, ref in zip(keys, refs):
        assert c.tokens[key] == ref, (key, [*wave1, *wave2][key])
        assert c.reasons[key] == "length"
    # the second wave joined while the anchor was still decoding
    assert c.order.index(("first", len(wave1))) < c.order.index(("end", 0))
    assert stats["route"] == route and stats["running"] == {} and stats["waiting"] == {}


@pytest.mark.skipif(not _paged_supported(), reason="paged route verified on another transformers")
def test_paged_soft_reset_and_split_prefill_keep_the_prefix(setups, monkeypatch):
    """A cache too small for every running request makes continuous batching soft-reset some (re-queued from
    scratch with their tokens so far): the prefix is written again and the output stays exact. A token budget of
    16 per step splits the longer prompts' prefill over several steps."""
    from transformers.generation.continuous_batching.requests import RequestState

    resets = []
    original = RequestState.create_equivalent_initial_request
    monkeypatch.setattr(RequestState, "create_equivalent_initial_request",
                        lambda self: resets.append(self.request_id) or original(self))
    s = setups("llama")
    reqs = [(PROMPTS[i % 5], [None, "short", "mid", "long"][i % 4], 24) for i in range(8)]
    assert max(len(s.ids(text)) for text, _, _ in reqs) > 16
    engine = s.engine("paged", max_batch_size=6, cache_tokens=96, max_batch_tokens=16)
    outs = engine.generate_many([GenRequest(s.ids(t), task=k, max_new_tokens=n) for t, k, n in reqs])
    engine.shutdown()
    assert resets, "expected the small cache to force soft resets"
    for (text, task, n), out in zip(reqs, outs):
        assert out == s.reference(text, task, n)


def test_auto_route(setups, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    import prefixtune.serve.engine as engine_module

    s = setups("llama")
    engine = Engine(s.model, s.tok)
    assert engine.route == ("paged" if _paged_supported() else "padded")
    assert engine.max_context == 256
    engine.shutdown()
    monkeypatch.setattr(engine_module, "PAGED_TESTED", ((9, 0), (9, 1)))  # another transformers: the plain route
    engine = Engine(s.model, s.tok)
    assert engine.route == "padded" and "verified on transformers 9.0.x" in engine.route_note
    with pytest.raises(ValueError, match="verified on transformers 9.0.x"):
        Engine(s.model, s.tok, route="paged")
    monkeypatch.undo()
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    engine = Engine(eager, s.tok)
    assert engine.route == "padded" and "eager" in engine.route_note
    assert eager.config._attn_implementation == "eager"  # left untouched
    engine.shutdown()


# ----------------------------------------------------------------------------------------------- sampling, stops

def test_seeded_sampling_does_not_depend_on_companions(setups):
    s = setups("gpt_neox")
    routes = [r for r in ROUTES if r == "padded" or _paged_supported()]
    target = GenRequest(s.ids(CORPUS[1]), task="mid", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    companions = [GenRequest(s.ids(PROMPTS[i]), task=[None, "long", "short", "mid"][i % 4], max_new_tokens=4 + i,
                             temperature=[0.0, 0.7, 1.3][i % 3], top_k=[0, 5][i % 2], seed=i) for i in range(6)]
    results = []
    for route in routes:
        engine = s.engine(route, max_batch_size=4)
        results.append(engine.generate_many([target])[0])
        batch = engine.generate_many([*companions[:3], target, *companions[3:]])
        results.append(batch[3])
        other = engine.generate_many([GenRequest(**{**target.__dict__, "seed": 99})])[0]
        engine.shutdown()
    assert len(results[0]) == 12 and all(r == results[0] for r in results), results
    assert other != results[0]


@pytest.mark.parametrize("route", [route_param(r) for r in ROUTES])
def test_stop_token_ends_the_request_and_is_not_emitted(setups, route):
    s = setups("llama")
    text = PROMPTS[2]
    ref = s.reference(text, "mid", 8)
    cut = next(i for i in range(1, 8) if ref[i] not in ref[:i])
    engine = s.engine(route)
    c = Collector()
    engine.start()
    engine.submit(GenRequest(s.ids(text), task="mid", max_new_tokens=8, stop_token_ids=(ref[cut], 9999)), c(0))
    c.wait([0])
    engine.shutdown()
    assert c.tokens[0] == ref[:cut] and c.reasons[0] == "stop"


# -------------------------------------------------------------------------------------------------- control flow

@pytest.mark.parametrize("route", [route_param(r) for r in ROUTES])
def test_cancel_running_and_queued(setups, route):
    s = setups("llama")
    engine = s.engine(route, max_batch_size=1)
    c = Collector()
    ids = {}

    def cancel_after_three(key):
        inner = c(key)

        def on_token(token, reason):
            inner(token, reason)
            if token is not None and len(c.tokens[key]) == 3:
                engine.cancel(ids[key])  # from the engine thread itself
        return on_token

    ids[0] = engine.submit(GenRequest(s.ids(PROMPTS[0]), task="long", max_new_tokens=100), cancel_after_three(0))
    ids[1] = engine.submit(GenRequest(s.ids(PROMPTS[1]), task="short", max_new_tokens=5), c(1))
    ids[2] = engine.submit(GenRequest(s.ids(PROMPTS[2]), max_new_tokens=5), c(2))
    engine.cancel(ids[2])  # still queued (max_batch_size 1, not started)
    engine.start()
    c.wait([0, 1, 2])
    engine.cancel(ids[1])  # over: no effect
    engine.shutdown()
    assert c.reasons == {0: "cancelled", 1: "length", 2: "cancelled"}
    assert 3 <= len(c.tokens[0]) < 100 and c.tokens[0] == s.reference(PROMPTS[0], "long", 100)[:len(c.tokens[0])]
    assert c.tokens[1] == s.reference(PROMPTS[1], "short", 5) and c.tokens[2] == []


def test_remove_task_waits_for_in_flight_requests_then_refuses(setups):
    s = setups("llama")
    engine = s.engine("paged" if _paged_supported() else "padded")
    c = Collector()
    release, started = threading.Event(), threading.Event()
    inner = c(0)

    def slow(token, reason):  # holds the engine thread on the first token until the main thread lets it go
        inner(token, reason)
        if token is not None and len(c.tokens[0]) == 1:
            started.set()
            release.wait(30)

    engine.start()
    engine.submit(GenRequest(s.ids(PROMPTS[0]), task="mid", max_new_tokens=6), slow)
    assert started.wait(30)
    returned = []
    remover = threading.Thread(target=lambda: returned.append(engine.remove_task("mid")))
    remover.start()
    remover.join(0.3)
    assert remover.is_alive(), "remove_task returned while a request of the task was in flight"
    assert "mid" not in engine.tasks()
    with pytest.raises(UnknownTask):  # refused at once
        engine.submit(GenRequest(s.ids(PROMPTS[1]), task="mid"), c(1))
    release.set()
    remover.join(30)
    assert returned == [True] and c.reasons[0] == "length"  # it finished before remove_task returned
    assert c.tokens[0] == s.reference(PROMPTS[0], "mid", 6)
    with pytest.raises(UnknownTask):
        engine.submit(GenRequest(s.ids(PROMPTS[1]), task="mid"), c(2))
    with pytest.raises(UnknownTask):
        engine.remove_task("mid")
    table, shape = s.tables["mid"]
    engine.add_task("mid", table, shape)  # it can come back
    assert engine.generate_many([GenRequest(s.ids(PROMPTS[0]), task="mid", max_new_tokens=6)])[0] == c.tokens[0]
    engine.shutdown()


def test_queue_full_and_refusals(setups):
    s = setups("gpt2")
    engine = s.engine("padded", max_queue=2)
    c = Collector()
    engine.submit(GenRequest(s.ids(PROMPTS[0]), max_new_tokens=2), c(0))
    engine.submit(GenRequest(s.ids(PROMPTS[1]), task="short", max_new_tokens=2), c(1))
    with pytest.raises(QueueFull):  # not started: both still wait
        engine.submit(GenRequest(s.ids(PROMPTS[2])), c(2))
    assert engine.stats()["waiting"] == {"base": 1, "short": 1}
    with pytest.raises(UnknownTask):
        engine.submit(GenRequest(s.ids(PROMPTS[2]), task="nope"), c(3))
    prompt = [5] * 200  # GPT-2's 256 positions: prefix 21 + 200 + 36 - 1 = 256 fits, one more token does not
    with pytest.raises(ValueError, match="256"):
        engine.submit(GenRequest(prompt, task="long", max_new_tokens=37), c(4))
    for bad in (GenRequest([]), GenRequest([5], max_new_tokens=0), GenRequest([10**6]), GenRequest([5], top_p=0)):
        with pytest.raises(ValueError):
            engine.submit(bad, c(5))
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_task("short", *s.tables["short"])
    with pytest.raises(ValueError, match="shape"):
        engine.add_task("other", s.tables["short"][0][:2], s.tables["short"][1])
    engine.shutdown()  # never started: the waiting requests are cancelled
    assert c.reasons == {0: "cancelled", 1: "cancelled"}
    with pytest.raises(EngineStopped):
        engine.submit(GenRequest(s.ids(PROMPTS[0])), c(6))


@pytest.mark.parametrize("route", [route_param(r) for r in ROUTES])
def test_a_failing_step_fails_its_requests_not_the_engine(setups, route, monkeypatch):
    import prefixtune.serve.engine as engine_module

    s = setups("llama")
    engine = s.engine(route)
    real, calls = engine_module.pick_tokens, []

    def broken_once(logits, lives):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(logits, lives)

    monkeypatch.setattr(engine_module, "pick_tokens", broken_once)
    c = Collector()
    engine.start()
    engine.submit(GenRequest(s.ids(PROMPTS[0]), task="mid", max_new_tokens=5), c(0))
    c.wait([0])
    assert c.reasons[0].startswith("error") and "boom" in c.reasons[0]
    engine.submit(GenRequest(s.ids(PROMPTS[1]), task="short", max_new_tokens=5), c(1))
    c.wait([1])
    engine.shutdown()
    assert c.reasons[1] == "length" and c.tokens[1] == s.reference(PROMPTS[1], "short", 5)


def test_a_failed_prefill_spares_the_rows_already_decoding(setups, monkeypatch):
    """Padded route: a joiner whose prefill fails gets the error; the request already decoding finishes exactly."""
    s = setups("llama")
    engine = s.engine("padded")
    route = engine._route
    real = route._prefill

    def prefill(joiners):
        if any(live.req.max_new_tokens == 3 for live in joiners):
            raise RuntimeError("prefill exploded")
        return real(joiners)

    monkeypatch.setattr(route, "_prefill", prefill)
    c = Collector()
    started = threading.Event()
    c.watch[0] = (2, started)
    engine.start()
    engine.submit(GenRequest(s.ids(PROMPTS[0]), task="mid", max_new_tokens=9), c(0))
    assert started.wait(30)
    engine.submit(GenRequest(s.ids(PROMPTS[1]), task="short", max_new_tokens=3), c(1))
    c.wait([0, 1])
    engine.shutdown()
    assert c.reasons[1].startswith("error") and "prefill exploded" in c.reasons[1]
    assert c.reasons[0] == "length" and c.tokens[0] == s.reference(PROMPTS[0], "mid", 9)


def test_padded_prefill_takes_joiners_within_the_token_budget(setups):
    """The padded batch of one prefill (max P + max prompt) x joiners stays within max_batch_tokens; the first
    request is taken even when it alone is over; the rest wait for the next step and still come out right."""
    s = setups("llama")
    engine = s.engine("padded", max_batch_tokens=40)
    lives = []
    for i, task in enumerate(["long", "short", "mid", None]):  # P 21, 3, 8, 0
        req = GenRequest(s.ids(PROMPTS[i]), task=task, max_new_tokens=2)
        engine.submit(req, lambda *_: None)
    with engine._lock:
        lives = list(engine._waiting)
    taken = engine._take(16, 40)
    width = max(lv.prefix_len for lv in taken) + max(len(lv.req.prompt_ids) for lv in taken)
    assert len(taken) == 1 or width * len(taken) <= 40
    assert taken == lives[:len(taken)] and len(taken) < 4
    assert len(engine._take(16, 1)) == 1  # over the budget alone, taken anyway

    engine = s.engine("padded", max_batch_tokens=40)  # end to end: joiners spread over steps, outputs unchanged
    c = Collector()
    reqs = [(PROMPTS[i], task) for i, task in enumerate(["long", "short", "mid", None])]
    for k, (text, task) in enumerate(reqs):
        engine.submit(GenRequest(s.ids(text), task=task, max_new_tokens=4), c(k))
    engine.start()
    c.wait(range(len(reqs)))
    engine.shutdown()
    for k, (text, task) in enumerate(reqs):
        assert c.tokens[k] == s.reference(text, task, 4), (text, task)


def test_in_passing_thread_returns_and_raises_in_the_caller():
    import threading

    from prefixtune.serve.threads import in_passing_thread

    names = []
    assert in_passing_thread(lambda x, y=0: (names.append(threading.current_thread().name), x + y)[1], 2, y=3) == 5
    assert names == ["prefixtune-setup"] and threading.current_thread().name != names[0]
    with pytest.raises(ValueError, match="bad prefix"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad prefix")))
    assert not [t for t in threading.enumerate() if t.name == "prefixtune-setup"]  # the thread is gone
