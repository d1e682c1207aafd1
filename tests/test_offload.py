"""Offloaded bases (--device_map / --max_memory / --offload_dir, through transformers and accelerate): a base whose
layers accelerate brings in from disk at every forward pass computes, with a prefix, what the same base in memory
computes. Every comparison is fp32 with the same prefix, on tiny saved Llama-GQA and GPT-NeoX models whose cpu budget
is chosen so that decoder layer 0 stays in RAM and the last layer goes to disk."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from helpers import run

from prefixtune.prefix import prefix_hidden_states, prefix_shape
from prefixtune.prefix.base import load_base
from prefixtune.prefix.encoder import table_to_cache
from prefixtune.prefix.generate import Generator, Sampling
from prefixtune.prefix.offload import offload_options, parse_max_memory, plan_device_map
from prefixtune.prefix.io import save_prefix
from prefixtune.prefix.model import prefix_positions

P = 4
PROMPTS = ["The quick brown fox", "Lists", "A prefix is a short sequence of learned"]
LAYER = re.compile(r"layers\.(\d+)$")


def layer_devices(device_map: dict) -> dict[int, str]:
    """{decoder layer index: device} for the layers a device map names one by one."""
    return {int(m.group(1)): str(d) for name, d in device_map.items() if (m := LAYER.search(name))}


def split_budget(model_dir) -> int:
    """The largest cpu budget (in 2 % steps of the checkpoint's size) under which accelerate's "auto" map keeps
    decoder layer 0 in RAM and puts the last decoder layer on disk."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    total = (model_dir / "model.safetensors").stat().st_size
    for percent in range(100, 10, -2):
        budget = total * percent // 100
        layers = layer_devices(plan_device_map(config, "fp32", "auto", {"cpu": budget})[0])
        if layers.get(0) == "cpu" and layers.get(config.num_hidden_layers - 1) == "disk":
            return budget
    raise AssertionError(f"no cpu budget splits {model_dir}'s layers between cpu and disk")


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def pair(request, tiny_llama_dir, tiny_neox_dir, tmp_path_factory):
    """(model dir, in-memory base, offloaded base, tokenizer, prefix table, shape, log lines). The Llama loads with
    --offload_dir; the GPT-NeoX without one: safetensors weights are read in place from the checkpoint."""
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_neox_dir
    budget = split_budget(model_dir)
    off_dir = tmp_path_factory.mktemp("offload") / "weights" if request.param == "llama" else None
    logs: list[str] = []
    mem, tok, _ = load_base(str(model_dir))
    off, _, _ = load_base(str(model_dir), device_map="auto", max_memory={"cpu": budget}, offload_dir=off_dir,
                          log=logs.append)
    shape = prefix_shape(mem.config, P)
    torch.manual_seed(7)
    table = torch.randn(P, shape.width) * 2
    return model_dir, mem, off, tok, table, shape, logs


def test_the_load_really_offloads(pair):
    _, mem, off, _, _, _, logs = pair
    device_map = off.hf_device_map
    layers = layer_devices(device_map)
    assert "disk" in device_map.values()
    assert layers[0] == "cpu" and layers[mem.config.num_hidden_layers - 1] == "disk"
    last = max(layers)
    # the disk layer's weights are not in memory: placeholders on the meta device, brought in by accelerate's hooks
    layer_params = [p for n, p in off.named_parameters() if f"layers.{last}." in n]
    assert layer_params and all(p.device.type == "meta" for p in layer_params)
    assert all(p.device.type == "cpu" for n, p in off.named_parameters() if "layers.0." in n)
    assert len(logs) == 1 and logs[0].startswith("device map auto: cpu:") and "disk:" in logs[0]


def _batch(tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def test_prefix_as_cache_logits_match(pair):
    """The inference path: the prefix as a pre-filled KV cache, positions P.. (as Generator and the engines)."""
    _, mem, off, tok, table, shape, _ = pair
    ids, mask = _batch(tok)
    full = torch.cat([mask.new_ones(len(PROMPTS), P), mask], dim=1)
    pos = prefix_positions(mask, P)

    def logits(model, with_prefix=True):
        cache = table_to_cache(table, shape, len(PROMPTS), model.config) if with_prefix else None
        return model(input_ids=ids, attention_mask=full if with_prefix else mask, position_ids=pos,
                     past_key_values=cache).logits

    ref, got = logits(mem), logits(off)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)
    assert (logits(mem, with_prefix=False)[real] - ref[real]).abs().max() > 1e-2  # the prefix matters


@torch.no_grad()
def test_prefix_through_attention_hook_matches(pair):
    """The training path: the table travels as a keyword argument into every attention call (prefix/attention.py)."""
    _, mem, off, tok, table, _, _ = pair
    ids, mask = _batch(tok)
    ref = prefix_hidden_states(mem, ids, mask, table)
    got = prefix_hidden_states(off, ids, mask, table)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)


def _generated_ids(gen: Generator, prompts, task) -> torch.Tensor:
    """Greedy ids from Generator.generate (its model.generate output, captured)."""
    model, out = gen.model, []
    original = model.generate
    model.generate = lambda *a, **k: out.append(original(*a, **k)) or out[-1]
    try:
        gen.generate(prompts, task, Sampling(max_new_tokens=8, greedy=True))
    finally:
        del model.generate
    return out[0]


def test_generator_greedy_tokens_match(pair, tmp_path):
    model_dir, mem, off, tok, table, shape, _ = pair
    path = tmp_path / "task.safetensors"
    save_prefix(path, table, shape, task="task", base_model=str(model_dir), architecture=mem.config.model_type)
    gens = [Generator(model, tok) for model in (mem, off)]
    for gen in gens:
        gen.add_prefix(path)
    for task in ("task", None):
        ref, got = (_generated_ids(gen, PROMPTS, task) for gen in gens)
        assert torch.equal(got, ref), task
    assert not torch.equal(_generated_ids(gens[0], PROMPTS, "task"), _generated_ids(gens[0], PROMPTS, None))


@pytest.mark.parametrize("route", ["paged", "padded"])
def test_engine_routes_match(pair, route):
    """The serving engine over the offloaded base: on a CPU both routes run (the paged route is switched off only
    when the offloaded model computes on a GPU)."""
    from prefixtune.serve.engine import Engine, GenRequest

    _, mem, off, tok, table, shape, _ = pair
    reqs = [GenRequest(tok(p, add_special_tokens=False)["input_ids"], task=t, max_new_tokens=6)
            for p in PROMPTS for t in ("task", None)]
    outs = []
    for model in (mem, off):
        model.set_attn_implementation("sdpa")  # the attention-hook test above switched it to prefix_sdpa
        engine = Engine(model, tok, max_batch_size=4, route=route)
        engine.add_task("task", table, shape)
        engine.start()
        try:
            outs.append(engine.generate_many(reqs))
        finally:
            engine.shutdown()
        assert engine.route == route
    assert outs[1] == outs[0]


@torch.no_grad()
def test_embeddings_stay_in_memory_when_nothing_fits(tiny_llama_dir, tmp_path):
    """A budget too small for anything would put the whole model on disk, embeddings included; they stay on the
    main device, where prompts enter (the engines and Generator create their inputs there), and the log says so."""
    logs: list[str] = []
    mem, tok, _ = load_base(str(tiny_llama_dir))
    off, _, _ = load_base(str(tiny_llama_dir), device_map="sequential", max_memory="cpu=1KiB",
                          offload_dir=tmp_path / "off", log=logs.append)
    assert off.hf_device_map["model.embed_tokens"] == "cpu"
    assert {d for n, d in off.hf_device_map.items() if n != "model.embed_tokens"} == {"disk"}
    assert "the input embeddings (model.embed_tokens" in logs[0] and "stay on cpu" in logs[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(off(ids).logits, mem(ids).logits, rtol=0, atol=1e-5)


# --- flags ------------------------------------------------------------------------------------------------------
def test_max_memory_parser(monkeypatch):
    import prefixtune.prefix.offload as offload

    assert parse_max_memory("cpu=1.5GiB, disk=200MB") == {"cpu": int(1.5 * 2**30), "disk": 200 * 10**6}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}
    assert parse_max_memory(None) is None and parse_max_memory({"cpu": 5}) == {"cpu": 5}
    monkeypatch.setattr(offload, "_gpu_count", lambda: 2)
    assert parse_max_memory("0=14GiB,cuda:1=2kib,cpu=30GB") == {0: 14 * 2**30, 1: 2048, "cpu": 30 * 10**9}
    bad = {
        "": "expected DEVICE=SIZE pieces separated by commas, like 0=14GiB,cpu=30GiB, got an empty value",
        "cpu": "expected DEVICE=SIZE like cpu=30GiB, got 'cpu'",
        "cpu=": "expected DEVICE=SIZE like cpu=30GiB, got 'cpu='",
        "cpu=14G": "expected a size like 14GiB, 500MB or a byte count after '=' in 'cpu=14G', got '14G'",
        "cpu=-1GiB": "got '-1GiB'",
        "gpu=1GiB": "expected a device (a GPU index such as 0, or cpu, disk, mps) before '=' in 'gpu=1GiB', got 'gpu'",
        "cpu=1GiB,,disk=1GiB": "expected DEVICE=SIZE between the commas, got an empty piece",
        "cpu=1GiB,CPU=2GiB": "expected each device once, got 'CPU' twice",
        "2=1GiB": "expected a GPU of this machine in '2=1GiB', got GPU 2 (this machine has GPUs 0-1)",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            parse_max_memory(text)
        assert str(e.value).startswith("--max_memory") and "\n" not in str(e.value)
    monkeypatch.setattr(offload, "_gpu_count", lambda: 0)
    with pytest.raises(ValueError, match=re.escape("got GPU 0 (this machine has no GPU); use cpu=SIZE")):
        parse_max_memory("0=14GiB,cpu=30GiB")


def test_offload_flag_combinations(tmp_path):
    assert offload_options("none", None, None) == (None, None, None)
    assert offload_options("auto", "cpu=1MiB", None) == ("auto", {"cpu": 2**20}, None)
    with pytest.raises(ValueError, match=r"^--max_memory needs --device_map .*; add --device_map auto$"):
        offload_options(None, "cpu=1GiB", None)
    with pytest.raises(ValueError, match=r"^--offload_dir needs --device_map"):
        offload_options("none", None, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="expected a folder for the offloaded weights, got a file"):
        offload_options("auto", None, tmp_path / "file")
    with pytest.raises(ValueError, match="--device_map: expected one of auto, balanced, balanced_low_0, sequential"):
        offload_options("everywhere", None, None)


def test_gguf_disk_offload_is_refused(tmp_path):
    """transformers cannot offload a GGUF model to disk: refused before any weight is read, naming the fix."""
    from prefixtune.prefix.resolve import default_model_file

    try:
        default_model_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.raises(ValueError, match=r"puts \d+ modules on disk .*cannot offload a GGUF model to disk: give "
                                         r"--max_memory room for all of it, or save it as a Hugging Face model folder"):
        load_base(None, device_map="auto", max_memory="cpu=20MiB", offload_dir=tmp_path / "off")


# --- the command line -------------------------------------------------------------------------------------------
def cli(*args, **kw):
    return run([sys.executable, "-m", "prefixtune.inference", *map(str, args)], **kw)


def test_cli_batch_offloaded_equals_in_memory(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    shape = prefix_shape(AutoConfig.from_pretrained(tiny_llama_dir), P)
    torch.manual_seed(3)
    save_prefix(tmp_path / "alpha.safetensors", torch.randn(P, shape.width) * 2, shape, task="alpha",
                base_model=str(tiny_llama_dir), architecture="llama")
    rows = [{"prompt": p, "task": t} for p in PROMPTS for t in ("alpha", "base")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["--model", tiny_llama_dir, "--prefix", tmp_path / "alpha.safetensors", "--greedy",
              "--max_new_tokens", 5, "--input", src, "--batch_size", 4]
    plain = cli(*common, "--output", tmp_path / "plain.jsonl")
    off = cli(*common, "--output", tmp_path / "off.jsonl", "--device_map", "auto",
              "--max_memory", f"cpu={split_budget(tiny_llama_dir)}", "--offload_dir", tmp_path / "off")
    assert "device map" not in plain.stderr
    assert re.search(r"device map auto: cpu: .*layer 0.*; disk: .*layer 1", off.stderr), off.stderr
    out = [json.loads(line) for line in (tmp_path / "off.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (tmp_path / "off.jsonl").read_text(encoding="utf-8") == (tmp_path / "plain.jsonl").read_text(encoding="utf-8")
    assert len(out) == len(rows) and len({r["completion"] for r in out}) > 1


def test_cli_refuses_bad_offload_flags(tiny_llama_dir):
    proc = cli("--model", tiny_llama_dir, "--device_map", "auto", "--max_memory", "cpu=12Q", input="", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == ("error: --max_memory: expected a size like 14GiB, 500MB or a "
                                                    "byte count after '=' in 'cpu=12Q', got '12Q'")
    proc = cli("--model", tiny_llama_dir, "--offload_dir", "off", input="", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --offload_dir needs --device_map")
    help_text = cli("--help").stdout
    for flag in ("--device_map", "--max_memory", "--offload_dir"):
        assert flag in help_text


# --- the server ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_server_over_offloaded_base(tiny_llama_dir, tmp_path, engine):
    """prefix_serve --device_map auto --max_memory ... --offload_dir ...: the same greedy completion as in memory."""
    import openai
    from transformers import AutoConfig

    from prefixtune.serve.__main__ import build, build_parser
    from prefixtune.serve.server import serve_in_thread

    shape = prefix_shape(AutoConfig.from_pretrained(tiny_llama_dir), P)
    torch.manual_seed(4)
    save_prefix(tmp_path / "alpha.safetensors", torch.randn(P, shape.width) * 2, shape, task="alpha",
                base_model=str(tiny_llama_dir), architecture="llama")
    texts = []
    for extra in ([], ["--device_map", "auto", "--max_memory", f"cpu={split_budget(tiny_llama_dir)}",
                       "--offload_dir", tmp_path / "off"]):
        argv = ["--model", tiny_llama_dir, "--engine", engine, "--device", "cpu", "--dtype", "fp32",
                "--prefix", tmp_path / "alpha.safetensors", *extra]
        app, eng = build(build_parser().parse_args(list(map(str, argv))))
        if extra:
            assert "disk" in eng.model.hf_device_map.values()
        srv = serve_in_thread(app, drain_timeout=10)
        try:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            texts.append([client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                    extra_body={"ignore_eos": True}).choices[0].text
                          for m in ("alpha", str(tiny_llama_dir))])
        finally:
            srv.stop()
    assert texts[1] == texts[0] and texts[0][0] != texts[0][1]
