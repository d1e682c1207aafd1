"""A quantized frozen base (--quantize, prefix/quantize.py): inference and training with a prefix over torchao int8/int4
weights on CPU, against references built from the same quantized weights dequantized into a plain fp32 model."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import metrics, run, train
from test_equivalence import reference_logits, wrapper_logits

from prefixtune.prefix import PrefixEncoder, PrefixLM, prefix_shape
from prefixtune.prefix.base import load_base
from prefixtune.prefix.quantize import (hidden_from_deepspeed, is_quantized_tensor, quantization_config,
                                        quantized_count, weight_bytes)

pytest.importorskip("torchao")

P = 5
TINY = ["--max_seq_len", 32, "--prefix_seq_len", 4, "--prefix_input_dim", 16, "--prefix_hidden_dim", 16,
        "--dev_data_size", 6, "--batch_size", 2, "--log_every", 1, "--max_lr", 1e-2, "--n_warmup_steps", 2]


def dequantized_copy(quantized, model_dir, attn="eager"):
    """A plain fp32 model (no tensor subclass anywhere) holding the quantized model's weights, dequantized: the
    independent reference. Eager attention, so neither SDPA nor the prefix attention hook is shared with ours."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    n = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, torch.nn.Linear) and is_quantized_tensor(module.weight):
                plain.get_submodule(name).weight.copy_(module.weight.dequantize())
                n += 1
    assert n > 0 and not any(is_quantized_tensor(p) for p in plain.parameters())
    return plain


def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_weights_are_really_quantized(tiny_llama_dir, kind):
    full, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu")
    base, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu", quantize=kind)
    w = base.model.layers[0].mlp.down_proj.weight
    assert type(w).__name__ == {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}[kind]
    assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
    if kind == "int4":  # 4-bit values kept one per int8 byte
        assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7
    done, linears = quantized_count(base)
    assert done == linears - 1  # every decoder Linear; the output layer stays in full precision
    assert not is_quantized_tensor(base.get_output_embeddings().weight)
    assert weight_bytes(base) < 0.6 * weight_bytes(full)
    assert all(not p.requires_grad for p in base.parameters()) and not base.training


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prefix_logits_match_dequantized_reference(tiny_llama_dir, kind):
    """Ours: the quantized model through the prefix attention hook (SDPA). Reference: the dequantized weights in a
    plain fp32 eager model, the prefix as a hand-built KV cache. Both compute the same product, x @ (q * s)^T
    (torchao's int8 kernel scales after the matmul, ours before), so they differ by fp32 rounding alone: 1e-4 on
    logits of size ~5, as the full-precision equivalence test allows. Quantization itself moves logits ~100x more,
    so the check tells the quantized weights from the original ones."""
    base, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu", quantize=kind)
    full, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu")
    ref_model = dequantized_copy(base, tiny_llama_dir)
    torch.manual_seed(2)
    table = torch.randn(P, prefix_shape(base.config, P).width)
    ids, mask = batch()
    with torch.no_grad():
        ours = wrapper_logits(base, table, ids, mask)
        ref = reference_logits(ref_model, table, ids, mask)
        unquantized = wrapper_logits(full, table, ids, mask)
        bare = ref_model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (ours - ref)[keep].abs().max() < 1e-4
    assert (unquantized - ref)[keep].abs().max() > 1e-2  # the reference holds the quantized weights
    assert (bare - ref)[keep].abs().max() > 1e-2  # and the prefix matters


def test_prefix_gradient_matches_dequantized_reference(tiny_llama_dir):
    """Backward through torchao's int8 linear on CPU (gradients w.r.t. activations; the weights stay frozen): the
    encoder's gradient equals the dequantized model's within fp32 rounding."""
    base, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu", quantize="int8")
    ref_base = dequantized_copy(base, tiny_llama_dir, attn="sdpa")
    shape = prefix_shape(base.config, 4)
    torch.manual_seed(0)
    enc = PrefixEncoder(shape, 16, 16, 0.0)
    enc.reset("random", None)
    ours, ref = PrefixLM(base, enc).train(), PrefixLM(ref_base, copy.deepcopy(enc)).train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    loss, _ = ours(ids, mask, labels)
    loss.backward()
    ref_loss, _ = ref(ids, mask, labels)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for (name, p), (_, q) in zip(ours.encoder.named_parameters(), ref.encoder.named_parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, q.grad.abs().max().item()), name
    assert ours.encoder.mlp[-1].weight.grad.abs().max() > 0
    assert all(p.grad is None for p in base.parameters())


def test_deepspeed_never_sees_the_quantized_weights(tiny_llama_dir):
    base, _, _ = load_base(str(tiny_llama_dir), "fp32", "cpu", quantize="int8")
    model = PrefixLM(base, PrefixEncoder(prefix_shape(base.config, 4), 16, 16, 0.0))
    with hidden_from_deepspeed(model):
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in model.encoder.named_parameters(prefix="encoder")]
    assert model.base is base


def test_train_over_int8_base(tiny_llama_dir, text_jsonl, tmp_path):
    """python -m train --quantize int8 under DeepSpeed ZeRO-2 (the training precision left to the machine: bf16 on
    CPUs with AVX512-BF16, else fp32): the loss goes down, the prefix records the quantization."""
    from prefixtune.prefix.io import load_prefix

    train("--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 8, "--eval_every", 4,
          "--quantize", "int8", "--zero_stage", 2, "--save_dir", tmp_path)
    rows = metrics(tmp_path / "prefix.metrics.jsonl")
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert len(dev) == 3 and dev[-1] < dev[0]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    table, _, meta = load_prefix(tmp_path / "prefix.safetensors")
    assert torch.isfinite(table).all() and meta["train_args"]["quantize"] == "int8"


def test_train_refuses_zero3_with_a_quantized_base(tiny_llama_dir, text_jsonl, tmp_path):
    proc = train("--model", tiny_llama_dir, "--data", text_jsonl, *TINY, "--max_steps", 1, "--quantize", "int8",
                 "--zero_stage", 3, "--save_dir", tmp_path, check=False)
    assert proc.returncode != 0
    assert "error: --quantize int8: expected --zero_stage 0, 1 or 2, got 3" in proc.stderr
    assert not (tmp_path / "prefix.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
@pytest.mark.parametrize("kind", ["bnb-8bit", "bnb-4bit", "gptq"])
def test_gpu_only_kinds_refused_on_cpu(kind):
    with pytest.raises(ValueError) as e:
        quantization_config(kind, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"--quantize {kind}: expected a CUDA GPU" in msg
    assert "got device cpu" in msg and "use --quantize int8 or int4" in msg


def test_quantization_config_kinds():
    from transformers import TorchAoConfig

    assert quantization_config("none", "cpu") is None
    assert isinstance(quantization_config("int8", "cpu"), TorchAoConfig)
    with pytest.raises(ValueError, match="expected one of none, int8, int4.*got 'int2'"):
        quantization_config("int2", "cpu")


def test_inference_cli_refuses_bnb_on_cpu_and_runs_int8(tiny_llama_dir, tmp_path):
    import json
    import sys

    if not torch.cuda.is_available():
        proc = run([sys.executable, "-m", "prefixtune.inference", "--model", str(tiny_llama_dir),
                    "--quantize", "bnb-4bit", "--device", "cpu"], input="hello\n", check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: --quantize bnb-4bit: expected a CUDA GPU") and len(lines) == 1
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The quick brown fox"}) + "\n", encoding="utf-8")
    proc = run([sys.executable, "-m", "prefixtune.inference", "--model", str(tiny_llama_dir), "--quantize",
                "int8", "--device", "cpu", "--greedy", "--max_new_tokens", "4", "--input", str(prompts)])
    assert "quantize int8: 14 of 15 Linear weights quantized" in proc.stderr
    assert "completion" in json.loads(proc.stdout.splitlines()[0])


def test_serve_engine_over_int8_base_matches_dequantized_greedy(tiny_llama_dir, tmp_path):
    """prefix_serve's build() with --quantize int8: the batched engine's greedy tokens for a task equal greedy
    decoding of the dequantized reference with the prefix as a KV cache."""
    from prefixtune.prefix.io import save_prefix
    from prefixtune.serve.__main__ import build, build_parser
    from prefixtune.serve.engine import GenRequest

    base, tok, _ = load_base(str(tiny_llama_dir), "fp32", "cpu", quantize="int8")
    shape = prefix_shape(base.config, P)
    torch.manual_seed(3)
    table = torch.randn(P, shape.width)
    save_prefix(tmp_path / "alpha.safetensors", table, shape, task="alpha", base_model=str(tiny_llama_dir),
                architecture="llama")
    args = build_parser().parse_args(["--model", str(tiny_llama_dir), "--prefix", str(tmp_path / "alpha.safetensors"),
                                      "--quantize", "int8", "--device", "cpu"])
    _, engine = build(args)
    served = engine.model if hasattr(engine, "model") else None
    if served is not None:
        assert type(served.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    out, ends = [], []
    engine.submit(GenRequest(ids, task="alpha", max_new_tokens=6, temperature=0.0),
                  lambda token, reason: out.append(token) if token is not None else ends.append(reason))
    engine.start()
    engine.shutdown(drain=True)
    ref_model = dequantized_copy(base, tiny_llama_dir)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            x = torch.tensor([seq])
            seq.append(int(reference_logits(ref_model, table, x, torch.ones_like(x))[0, -1].argmax()))
    assert out == seq[len(ids):], ends


def test_resume_checks_quantize_and_accepts_states_from_before_the_flag():
    from prefixtune.train.args import TrainArgs, resume_mismatches

    saved = {k: v for k, v in vars(TrainArgs()).items() if k != "quantize"}  # a state written before --quantize
    assert resume_mismatches(saved, TrainArgs(), 1, 1) == []
    assert resume_mismatches(saved, TrainArgs(quantize="int8"), 1, 1) == [
        "--quantize: the state has 'none', this run 'int8'"]


def test_refused_without_linear_layers_and_with_device_map(tiny_llama_dir, tmp_path):
    from conftest import tiny_model

    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"^--quantize int8: expected Linear layers to quantize, got none of 1 .*gpt2"):
        load_base(str(tmp_path / "gpt2"), "fp32", "cpu", quantize="int8")
    with pytest.raises(ValueError, match=r"^--quantize int4: expected --device_map none, got --device_map auto"):
        load_base(str(tiny_llama_dir), "fp32", "cpu", quantize="int4", device_map="auto")
