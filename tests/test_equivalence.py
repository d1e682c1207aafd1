"""The prefix wrapper against independent references: HF's eager attention over a hand-built cache, and PEFT."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from prefixtune.prefix import PrefixEncoder, PrefixLM, prefix_hidden_states, prefix_shape

ARCHS = ["gpt_neox", "gpt2", "llama"]
P = 5


def reference_logits(eager, table, ids, mask):
    """Prefix as a hand-built cache in front of the tokens, positions P.. from the mask; eager attention."""
    cfg = eager.config
    L = cfg.num_hidden_layers
    H = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    B = ids.shape[0]
    kv = table.reshape(P, L, 2, H, D)
    cache = DynamicCache(config=cfg)
    for layer in range(L):
        k = kv[:, layer, 0].transpose(0, 1).unsqueeze(0).repeat(B, 1, 1, 1)  # (B, H, P, D)
        v = kv[:, layer, 1].transpose(0, 1).unsqueeze(0).repeat(B, 1, 1, 1)
        cache.update(k, v, layer)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    pos = P + (mask.cumsum(-1) - 1).clamp(min=0)
    return eager(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache).logits


def wrapper_logits(model, table, ids, mask):
    return model.get_output_embeddings()(prefix_hidden_states(model, ids, mask, table))


def batch(padding: str):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, -4:] = 0
        mask[2, -2:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_cache_reference(arch, padding):
    model = tiny_model(arch, attn="sdpa")
    eager = tiny_model(arch, attn="eager")
    torch.manual_seed(2)
    table = torch.randn(P, prefix_shape(model.config, P).width)
    ids, mask = batch(padding)
    with torch.no_grad():
        ours = wrapper_logits(model, table, ids, mask)
        ref = reference_logits(eager, table, ids, mask)
        bare = eager(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (ours - ref)[keep].abs().max() < 1e-4
    assert (bare - ref)[keep].abs().max() > 1e-2  # the prefix matters: the comparison can fail


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32_reference(arch, dtype):
    model = tiny_model(arch).to(dtype)
    eager = tiny_model(arch, attn="eager")
    torch.manual_seed(2)
    table = torch.randn(P, prefix_shape(model.config, P).width)
    ids, mask = batch("left")
    with torch.no_grad():
        ours = wrapper_logits(model, table, ids, mask).float()
        ref = reference_logits(eager, table, ids, mask)
    keep = mask.bool()
    err = (ours - ref)[keep].abs().max() / ref[keep].abs().max()
    assert err < (0.05 if dtype == torch.bfloat16 else 0.01)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_peft_prefix_tuning(arch):
    from peft import PrefixTuningConfig, get_peft_model

    model = tiny_model(arch, attn="eager")
    torch.manual_seed(3)
    table = torch.randn(P, prefix_shape(model.config, P).width)
    peft = get_peft_model(copy.deepcopy(model),
                          PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=False))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(table)
    ids, mask = batch("none")
    with torch.no_grad():
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        ours = wrapper_logits(tiny_model(arch), table, ids, mask)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_gradients_same_with_gradient_checkpointing(arch):
    torch.manual_seed(4)
    model = tiny_model(arch)
    enc = PrefixEncoder(prefix_shape(model.config, P), 16, 16)
    enc.reset("random")
    lm = PrefixLM(model, enc).train()
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        lm.zero_grad()
        loss, _ = lm(ids, mask, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    loss_plain, plain = grads()
    lm.gradient_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss_ckpt, ckpt = grads()
    assert torch.allclose(loss_plain, loss_ckpt, atol=1e-6)
    for n in plain:
        assert plain[n].abs().max() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen


def test_only_encoder_trains():
    lm = PrefixLM(tiny_model("llama"), PrefixEncoder(prefix_shape(tiny_model("llama").config, P), 8, 8))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.embedding.weight", "encoder.mlp.0.weight", "encoder.mlp.0.bias",
                         "encoder.mlp.3.weight", "encoder.mlp.3.bias"}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_the_frozen_base_never_runs_dropout(checkpointing):
    """GPT-2 with dropout 0.1 everywhere: in training mode the wrapper's loss equals the eval-mode loss computed
    by an independent copy of the base in eval mode (HF eager over a hand-built cache), so training and dev losses
    come from the same model; checkpointing still recomputes (and still gives the same gradient)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=64, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)
    base = GPT2LMHeadModel(cfg).eval()
    reference = copy.deepcopy(base)
    reference.set_attn_implementation("eager")
    enc = PrefixEncoder(prefix_shape(cfg, P), 16, 16, dropout=0.0)
    enc.reset("random")
    model = PrefixLM(base, enc)
    model.gradient_checkpointing(checkpointing)
    model.train()
    assert model.encoder.training and not any(m.training for m in base.modules() if isinstance(m, torch.nn.Dropout))
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    calls = []
    # a pre-hook: recomputation calls forward() (no hooks on the layer itself) and stops early after the last
    # tensor it needs, so only what runs first in the layer is sure to be seen again
    base.transformer.h[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))
    losses = [model(ids, mask, labels)[0] for _ in range(2)]
    with torch.no_grad():
        logits = reference_logits(reference, enc(), ids, mask)[:, :-1]
    target = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100])
    torch.testing.assert_close(losses[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    losses[0].backward()
    assert enc.embedding.weight.grad is not None and enc.embedding.weight.grad.abs().sum() > 0
    assert len(calls) == (3 if checkpointing else 2)  # checkpointing recomputed the layer in backward


def test_no_dropout_in_checkpointed_layers_that_call_it_themselves():
    """OPT's decoder layer calls F.dropout(..., training=self.training) itself, and a checkpointed layer must be in
    training mode: with dropout 0.1 the training-mode loss still equals the eval-mode loss, forward after forward."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64, vocab_size=300,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1)
    base = OPTForCausalLM(cfg).eval()
    enc = PrefixEncoder(prefix_shape(cfg, P), 16, 16, dropout=0.0)
    enc.reset("random")
    model = PrefixLM(base, enc)
    model.gradient_checkpointing(True)
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    model.eval()
    with torch.no_grad():
        expected = model(ids, mask, labels)[0]
    model.train()
    for _ in range(3):
        torch.testing.assert_close(model(ids, mask, labels)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("route", ["explicit", "sdpa"])
def test_training_loss_and_gradients_match_eager_cache_reference(arch, padding, route, monkeypatch):
    """The training route (explicit attention core with its own backward, or SDPA above EXPLICIT_MAX_SCORES;
    chunked loss through the frozen head) against HF's eager attention over a hand-built cache and the plain
    full-vocabulary cross-entropy."""
    import torch.nn.functional as F

    import prefixtune.prefix.attention as attention
    import prefixtune.prefix.loss as loss_mod

    calls = []
    real_apply = attention.PrefixAttentionCore.apply
    monkeypatch.setattr(attention.PrefixAttentionCore, "apply", lambda *a: calls.append(1) or real_apply(*a))
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 300 * 4 * 4)  # 4 fp32 rows a chunk: several, a ragged last one
    if route == "sdpa":
        monkeypatch.setattr(attention, "EXPLICIT_MAX_SCORES", 0)
    torch.manual_seed(5)
    model = tiny_model(arch)
    eager = tiny_model(arch, attn="eager")
    enc = PrefixEncoder(prefix_shape(model.config, P), 16, 16)
    enc.reset("random")
    lm = PrefixLM(model, enc).train()
    ids, mask = batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :3] = -100  # a prompt that is not trained on

    loss, n = lm(ids, mask, labels)
    ours = torch.autograd.grad(loss, list(enc.parameters()))
    assert bool(calls) == (route == "explicit"), f"the {route} route did not run"

    logits = reference_logits(eager, enc(), ids, mask)[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    ref_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    ref = torch.autograd.grad(ref_loss, list(enc.parameters()))
    assert n == (targets != -100).sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(enc.named_parameters(), ours, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_core_matches_sdpa_with_gqa_and_mask(dtype):
    from prefixtune.prefix.attention import PrefixAttentionCore

    torch.manual_seed(6)
    B, Hq, Hkv, T, S, D = 2, 6, 2, 5, 9, 8
    q = torch.randn(B, Hq, T, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, S, D, dtype=dtype, requires_grad=True) for _ in range(2))
    visible = torch.rand(B, 1, T, S) > 0.3
    visible[..., 0] = True
    bias = torch.zeros(B, 1, T, S, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    out = PrefixAttentionCore.apply(q, k, v, bias, 0.3)
    # the reference: float64 SDPA with the key/value heads repeated (query head h reads key head h // 3)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qd, kd.repeat_interleave(3, 1), vd.repeat_interleave(3, 1), attn_mask=visible, scale=0.3)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    theirs = torch.autograd.grad(ref, (qd, kd, vd), g)
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    assert (out.double() - ref).abs().max() < tol
    for a, b in zip(ours, theirs):
        assert (a.double() - b).abs().max() < tol * max(1.0, b.abs().max().item())
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda q, k, v: PrefixAttentionCore.apply(q, k, v, bias, 0.3), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_frozen_head_loss_matches_cross_entropy(dtype, monkeypatch):
    """Several chunks and a ragged last one, against the plain route: the full logits, an fp32 copy, cross-entropy
    (a bf16 model's gradient is rounded to bf16 where the cast back to it passes it on, as in ours)."""
    import torch.nn.functional as F
    from torch import nn

    import prefixtune.prefix.loss as loss_mod

    row_bytes = 50 * (4 + (2 if dtype == torch.bfloat16 else 0))
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", row_bytes * 8)  # 8 rows a chunk
    torch.manual_seed(7)
    head = nn.Linear(16, 50, bias=False, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ours = loss_mod.frozen_head_loss(head, hidden, targets)
    (g_ours,) = torch.autograd.grad(ours * 1.7, hidden)
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 1.7, hidden)
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    torch.testing.assert_close(ours, ref)
    if dtype == torch.float32:
        torch.testing.assert_close(g_ours, g_ref)
    else:  # ours scales by 1.7 after the bf16 product, the reference before it: a few bf16 roundings apart
        torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-2 * g_ref.abs().max().item())


def test_lean_norm_and_mlp_backward_match_autograd():
    """lighten() swaps Llama's RMSNorm and SwiGLU MLP forwards for ones with hand-written backward passes; outputs
    stay bit-identical and gradients match autograd through the original modules. (The norm normalizes in fp32 even
    for fp64 input, as Llama's does, so it is compared with the module rather than gradcheck'ed.)"""
    from prefixtune.prefix.lean import SwiGLUFunction, lighten

    model = tiny_model("llama").double()
    original = copy.deepcopy(model)
    n_layers = model.config.num_hidden_layers
    assert lighten(model) == 3 * n_layers + 1  # two norms and an MLP a layer, the final norm
    assert lighten(tiny_model("gpt_neox")) == 0  # LayerNorm and a GELU MLP: nothing to swap
    torch.manual_seed(8)
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    for lean, ref in ((model.model.norm, original.model.norm), (model.model.layers[0].mlp, original.model.layers[0].mlp)):
        out, expected = lean(x), ref(x)
        assert torch.equal(out, expected)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0])
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, tuple(torch.randn(3, 7, dtype=torch.float64,
                                                                            requires_grad=True) for _ in range(2)))
