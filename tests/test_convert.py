"""FasterTransformer export, verification, task management, Triton repository, PEFT and rinna interchange."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from helpers import run

from prefixtune.convert.ft_export import ExportError, add_tasks, export, list_tasks, remove_tasks
from prefixtune.convert.ft_verify import check_files, verify
from prefixtune.prefix import prefix_shape
from prefixtune.prefix.io import load_prefix, save_prefix


def make_neox(out: Path, parallel: bool, rotary_pct: float, **overrides) -> Path:
    from transformers import GPTNeoXForCausalLM

    cfg = tiny_config("gpt_neox")
    cfg.use_parallel_residual = parallel
    cfg.rope_parameters = {**(cfg.rope_parameters or {}), "partial_rotary_factor": rotary_pct}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(7)
    model = GPTNeoXForCausalLM(cfg)
    with torch.no_grad():  # every weight and bias random, so any misplaced tensor changes the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name or "layer_norm" in name
                    else 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def make_prefix(path: Path, config, length: int, task: str, seed: int, base_model="tiny",
                architecture: str | None = None) -> Path:
    """A random prefix for `config`; its header names `base_model` and the config's architecture (or `architecture`)."""
    shape = prefix_shape(config, length)
    torch.manual_seed(seed)
    save_prefix(path, torch.randn(length, shape.width), shape, task=task, base_model=str(base_model),
                architecture=architecture or config.model_type)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def neox(request, tmp_path_factory):
    from transformers import AutoConfig

    d = tmp_path_factory.mktemp("neox")
    model = make_neox(d / "model", request.param, 0.5 if request.param else 0.25)
    cfg = AutoConfig.from_pretrained(model)
    return model, [make_prefix(d / "alpha.safetensors", cfg, 3, "alpha", 1, model),
                   make_prefix(d / "beta.safetensors", cfg, 6, "beta", 2, model)]


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_then_verify(neox, tp, dtype, tmp_path):
    model, prefixes = neox
    target = export(model, prefixes, tmp_path / "out", tp, dtype, progress=False)
    assert target == tmp_path / "out" / f"{tp}-gpu"
    assert check_files(target) == []
    lines = []
    assert verify(target, model, prefixes, out=lines.append), "\n".join(lines)
    assert len(lines) == 3  # no task, alpha, beta
    assert json.loads((target / "tasks.json").read_text()) == {"alpha": 0, "beta": 1}
    ini = (target / "config.ini").read_text()
    for line in ("num_tasks = 2", "prompt_learning_type = 2", "[task_0]", "task_name = alpha", "prompt_length = 3",
                 "[task_1]", "prompt_length = 6", f"weight_data_type = {dtype}"):
        assert line in ini


def test_layout_computed_independently(neox, tmp_path):
    """File contents against index arithmetic written out here, not the exporter's reshapes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model, prefixes = neox
    tp = 2
    target = export(model, prefixes, tmp_path / "out", tp, "fp32", progress=False)
    cfg = AutoConfig.from_pretrained(model)
    H, E = cfg.num_attention_heads, cfg.hidden_size
    D, Lyr, Hl = E // H, cfg.num_hidden_layers, H // tp
    hf = load_file(str(model / "model.safetensors"))

    def read(name, shape):
        return np.fromfile(target / name, dtype=np.float32).reshape(shape)

    # prefix: view(P, L, 2, H, D) -> permute(1, 2, 3, 0, 4) -> heads split across ranks
    table, _, _ = load_prefix(prefixes[1])
    P = table.shape[0]
    ref = table.view(P, Lyr, 2, H, D).permute(1, 2, 3, 0, 4).numpy()
    for r in range(tp):
        got = read(f"model.prefix_prompt.beta.weight.{r}.bin", (Lyr, 2, Hl, P, D))
        np.testing.assert_array_equal(got, ref[:, :, r * Hl:(r + 1) * Hl])
    # QKV: FT[e, c, hl*D + j] on rank r == HF[((r*Hl + hl)*3 + c)*D + j, e]
    w = hf["gpt_neox.layers.1.attention.query_key_value.weight"].numpy()
    b = hf["gpt_neox.layers.1.attention.query_key_value.bias"].numpy()
    for r in range(tp):
        fw = read(f"model.layers.1.attention.query_key_value.weight.{r}.bin", (E, 3, Hl * D))
        fb = read(f"model.layers.1.attention.query_key_value.bias.{r}.bin", (3, Hl * D))
        for hl in range(Hl):
            for c in range(3):
                rows = [((r * Hl + hl) * 3 + c) * D + j for j in range(D)]
                np.testing.assert_array_equal(fw[:, c, hl * D:(hl + 1) * D], w[rows].T)
                np.testing.assert_array_equal(fb[c, hl * D:(hl + 1) * D], b[rows])
    # dense [E, H*D] -> rank r holds rows r*E/tp.. of its transpose
    dw = hf["gpt_neox.layers.0.attention.dense.weight"].numpy()
    np.testing.assert_array_equal(read("model.layers.0.attention.dense.weight.1.bin", (E // tp, E)), dw.T[E // tp:])
    # residual biases
    ab = hf["gpt_neox.layers.0.attention.dense.bias"].numpy()
    mb = hf["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"].numpy()
    if cfg.use_parallel_residual:
        np.testing.assert_allclose(read("model.layers.0.mlp.attention.bias.sum.bin", (E,)), (ab + mb) / tp, rtol=1e-6)
        assert not (target / "model.layers.0.attention.dense.bias.bin").exists()
    else:  # FT adds them once after the all-reduce: whole, not divided (the stock script's bug)
        np.testing.assert_array_equal(read("model.layers.0.attention.dense.bias.bin", (E,)), ab)
        np.testing.assert_array_equal(read("model.layers.0.mlp.dense_4h_to_h.bias.bin", (E,)), mb)
    np.testing.assert_array_equal(read("model.lm_head.weight.bin", (cfg.vocab_size, E)), hf["embed_out.weight"].numpy())


def test_verify_catches_wrong_exports(neox, tmp_path):
    model, prefixes = neox
    target = export(model, prefixes, tmp_path / "out", 2, "fp32", progress=False)
    # swap the two ranks of one attention weight: sizes fine, numbers wrong
    a, b = (target / f"model.layers.1.attention.dense.weight.{r}.bin" for r in (0, 1))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    lines = []
    assert not verify(target, model, prefixes, out=lines.append)
    assert any(line.startswith("FAIL  task (none)") for line in lines)
    a.write_bytes(da)
    b.write_bytes(db)
    # a prefix stored for the wrong task
    pa, pb = (target / f"model.prefix_prompt.alpha.weight.{r}.bin" for r in (0, 1))
    saved = pa.read_bytes()
    pa.write_bytes(np.zeros(len(saved) // 4, np.float32).tobytes())
    lines = []
    assert not verify(target, model, prefixes, out=lines.append)
    assert any("FAIL  task alpha" in line for line in lines) and any("ok    task beta" in line for line in lines)
    pa.write_bytes(saved)
    # short, missing and extra files
    pb.write_bytes(pb.read_bytes()[:-4])
    (target / "model.wte.bin").unlink()
    (target / "stray.bin").write_bytes(b"x")
    problems = check_files(target)
    assert any("model.prefix_prompt.alpha.weight.1.bin has" in p for p in problems)
    assert any(p.startswith("missing model.wte.bin") for p in problems)
    assert any("extra file stray.bin" in p for p in problems)


def test_add_replace_remove_tasks_keep_ids_and_bytes(neox, tmp_path):
    from transformers import AutoConfig

    model, (alpha, beta) = neox
    cfg = AutoConfig.from_pretrained(model)
    target = export(model, [alpha], tmp_path / "out", 2, "fp16", progress=False)
    base = {k: v for k, v in snapshot(target).items() if "prefix_prompt" not in k and not k.endswith((".ini", ".json"))}
    gamma = make_prefix(tmp_path / "gamma.safetensors", cfg, 4, "gamma", 3, model)
    assert add_tasks(target, [beta, gamma]) == [(1, "beta"), (2, "gamma")]
    alpha_bytes = (target / "model.prefix_prompt.alpha.weight.0.bin").read_bytes()
    with pytest.raises(ExportError, match="already in"):
        add_tasks(target, [beta])
    beta2 = make_prefix(tmp_path / "b2" / "beta.safetensors", cfg, 5, "beta", 9, model)
    assert add_tasks(target, [beta2], replace=True) == [(1, "beta")]
    remove_tasks(target, ["alpha"])
    assert list_tasks(target) == [(1, "beta", 5), (2, "gamma", 4)]
    assert json.loads((target / "tasks.json").read_text()) == {"beta": 1, "gamma": 2}
    assert "[task_0]\ntask_name = _removed_0\nprompt_length = 0" in (target / "config.ini").read_text()
    assert not (target / "model.prefix_prompt.alpha.weight.0.bin").exists()
    after = {k: v for k, v in snapshot(target).items() if k in base}
    assert after == base  # base weights untouched
    assert alpha_bytes  # (read before removal)
    lines = []
    assert verify(target, model, [beta2, gamma], out=lines.append), "\n".join(lines)
    with pytest.raises(ExportError, match="not a task"):
        remove_tasks(target, ["alpha"])


def test_bad_inputs_leave_out_as_it_was(neox, tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    model, prefixes = neox
    out = tmp_path / "out"
    export(model, prefixes, out, 1, "fp32", progress=False)
    before = snapshot(out)
    llama_prefix = make_prefix(tmp_path / "llama.safetensors", AutoConfig.from_pretrained(tiny_llama_dir), 3, "l", 0,
                               model)
    bad_name = make_prefix(tmp_path / "bad.safetensors", AutoConfig.from_pretrained(model), 3, "../evil", 0, model)
    cases = [
        (dict(prefixes=prefixes, tp=1), "exists: pass --force"),
        (dict(prefixes=[llama_prefix], tp=2), "trained on another model shape"),
        (dict(prefixes=prefixes, tp=3), "do not split over --tp 3"),
        (dict(prefixes=[bad_name], tp=2), "task name '../evil'"),
        (dict(prefixes=[prefixes[0], prefixes[0]], tp=2), "given twice"),
        (dict(prefixes=prefixes, tp=2, model=tiny_llama_dir), "only GPT-NeoX models"),
        (dict(prefixes=prefixes, tp=2, model=make_neox(tmp_path / "rope", True, 1.0,
                                                        rope_parameters={"rope_theta": 20000.0, "rope_type": "default",
                                                                         "partial_rotary_factor": 1.0})),
         "rotary base"),
        (dict(prefixes=prefixes, tp=2, model=make_neox(tmp_path / "eps", True, 1.0, layer_norm_eps=1e-6)),
         "layer_norm_eps"),
    ]
    for kw, message in cases:
        with pytest.raises(ExportError, match=message.replace("(", r"\(")):
            export(kw.get("model", model), kw["prefixes"], out, kw["tp"], "fp32", progress=False)
        assert snapshot(out) == before, message
    # a checkpoint that lacks a tensor fails midway: no half-written folder is left
    from safetensors.torch import load_file, save_file

    broken = make_neox(tmp_path / "broken", True, 0.5)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="lacks tensors"):  # (the prefixes name the intact model folder)
        export(broken, prefixes, out, 2, "fp32", progress=False, allow_other_base=True)
    assert snapshot(out) == before


def test_sharded_bin_checkpoint_gives_the_same_files(neox, tmp_path):
    from safetensors.torch import load_file

    model, prefixes = neox
    sd = load_file(str(model / "model.safetensors"))
    binned = tmp_path / "bin"
    binned.mkdir()
    for f in ("config.json",):
        (binned / f).write_bytes((model / f).read_bytes())
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, binned / fname)
    (binned / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    a = export(model, prefixes, tmp_path / "a", 2, "fp16", progress=False)
    b = export(binned, prefixes, tmp_path / "b", 2, "fp16", progress=False, allow_other_base=True)  # same weights
    sa, sb = snapshot(a), snapshot(b)
    assert {k: v for k, v in sa.items() if k != "config.ini"} == {k: v for k, v in sb.items() if k != "config.ini"}


def test_cli_and_triton_repository(neox, tmp_path):
    model, prefixes = neox
    py = [sys.executable, "-m", "prefixtune.convert"]
    out = tmp_path / "out"
    proc = run(py + ["ft", "--model", str(model), "--prefix", *map(str, prefixes), "--out", str(out), "--tp", "2",
                     "--dtype", "fp16"])
    assert "task 0: alpha" in proc.stdout and "task 1: beta" in proc.stdout
    proc = run(py + ["verify", str(out / "2-gpu"), "--model", str(model), "--prefix", *map(str, prefixes)])
    assert proc.stdout.strip().endswith("verified")
    assert run(py + ["tasks", str(out / "2-gpu")]).stdout == "0\talpha\t3\n1\tbeta\t6\n"
    bad = run(py + ["ft", "--model", str(model), "--out", str(out), "--tp", "2"], check=False)
    assert bad.returncode == 1 and "exists: pass --force" in bad.stderr
    run(py + ["triton", str(out / "2-gpu"), "--repo", str(tmp_path / "repo")])
    pbtxt = (tmp_path / "repo" / "fastertransformer" / "config.pbtxt").read_text()
    for s in ('backend: "fastertransformer"', 'key: "tensor_para_size"', 'string_value: "2"',
              'key: "model_checkpoint_path"', str((out / "2-gpu").resolve()), 'name: "prompt_learning_task_name_ids"',
              "dynamic_batching"):
        assert s in pbtxt
    from prefixtune.convert.triton import TaskError, task_id

    assert task_id(tmp_path / "repo" / "fastertransformer" / "tasks.json", "beta") == 1
    with pytest.raises(TaskError, match="not served"):
        task_id(tmp_path / "repo" / "fastertransformer" / "tasks.json", "nope")


def test_peft_export_loads_in_peft_and_round_trips(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM
    from test_equivalence import wrapper_logits

    from prefixtune.convert.interchange import from_peft, to_peft

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    src = make_prefix(tmp_path / "t.safetensors", cfg, 5, "t", 4)
    table, _, _ = load_prefix(src)
    to_peft(src, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        ours = wrapper_logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), table, ids, mask)
    assert (theirs - ours).abs().max() < 1e-4
    back = from_peft(tmp_path / "adapter", str(tiny_llama_dir), tmp_path / "back.safetensors", task="t")
    t2, shape, meta = load_prefix(back)
    assert torch.equal(t2, table) and meta["task"] == "t" and shape.prefix_len == 5


def test_rinna_checkpoint_import(tiny_neox_dir, tmp_path):
    from transformers import AutoConfig

    from prefixtune.convert.interchange import from_rinna

    shape = prefix_shape(AutoConfig.from_pretrained(tiny_neox_dir), 10)
    table = torch.randn(10, shape.width)
    torch.save(table, tmp_path / "smileface_suffix.task0.weight")
    out = from_rinna(tmp_path / "smileface_suffix.task0.weight", str(tiny_neox_dir), tmp_path / "s.safetensors",
                     "smileface")
    got, _, meta = load_prefix(out)
    assert torch.equal(got, table) and meta["train_args"]["imported_from"] == "rinna prefix-tuning-gpt"
    with pytest.raises(ValueError, match="does not fit"):
        torch.save(torch.randn(10, shape.width + 8), tmp_path / "wide.checkpoint")
        from_rinna(tmp_path / "wide.checkpoint", str(tiny_neox_dir), tmp_path / "w.safetensors", "w")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.checkpoint")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint") as refused:
        from_rinna(tmp_path / "evil.checkpoint", str(tiny_neox_dir), tmp_path / "e.safetensors", "e")
    assert "weights_only=False" not in str(refused.value)  # never PyTorch's advice to run the file's code
