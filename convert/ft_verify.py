"""Prove an FT export right without a GPU.

`check_files` compares the folder with what `config.ini` makes FT read (missing, short/long, extra files).
`FTModel(export_dir).logits` runs GPT-NeoX from the exported files alone, the way FT computes it: tensor-parallel
shards merged back, FT's layer-norm epsilon and rotary base, rotary at positions P+i, the prefix keys/values used as
given, the residual biases where FT adds them, FT's tanh GeLU. `verify` compares those logits with `hf_logits`: the
Hugging Face model run with the prefix table through the project's prefix attention (prefix.prefix_hidden_states,
what training computes), for no task and for every task.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..prefix.io import load_prefix
from ..prefix.tasks import task_of
from . import ft_layout as L
from .export_dir import check_files, prefix_problems, read_export

__all__ = ["TOLERANCE", "check_files", "FTModel", "hf_logits", "verify"]

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-3}  # max |FT - HF| over the logits' max |HF|


class FTModel:
    """GPT-NeoX computed from FT files, in fp32."""

    def __init__(self, export_dir):
        self.export = read_export(export_dir)
        self.dir, self.d, self.tp = self.export.path, self.export.dims, self.export.tp
        self.tasks = list(self.export.tasks)
        self.np_dtype = L.NP_DTYPES[self.export.dtype]

    def load(self, name: str, shape) -> torch.Tensor:
        a = np.fromfile(self.dir / name, dtype=self.np_dtype).astype(np.float32)
        return torch.from_numpy(a).reshape(shape)

    def ranks(self, name: str, shape, dim: int) -> torch.Tensor:
        return torch.cat([self.load(name.format(r=r), shape) for r in range(self.tp)], dim=dim)

    def prefix(self, task: str) -> tuple[torch.Tensor, int]:
        """(L, 2, H, P, D) table of a task, heads merged back from the ranks."""
        d = self.d
        length = dict(self.tasks)[task]
        t = self.ranks(f"model.prefix_prompt.{task}.weight.{{r}}.bin",
                       (d.layers, 2, d.heads // self.tp, length, d.head_dim), dim=2)
        return t, length

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """(B, T) ids without padding -> (B, T, V) logits."""
        d, tp = self.d, self.tp
        E, H, D, I, V = d.hidden, d.heads, d.head_dim, d.inter, d.vocab
        pre, P = (self.prefix(task) if task else (None, 0))
        B, T = ids.shape
        x = self.load("model.wte.bin", (V, E))[ids]  # (B, T, E)
        rd = d.rotary_dim
        inv = 1.0 / (L.FT_ROTARY_BASE ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        ang = (P + torch.arange(T, dtype=torch.float64))[:, None] * inv[None]  # real tokens at P, P+1, ...
        cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()  # (T, rd)

        def rotary(t):  # (B, H, T, D), GPT-NeoX rotate-half on the first rd dims
            r, rest = t[..., :rd], t[..., rd:]
            half = torch.cat([-r[..., rd // 2:], r[..., :rd // 2]], -1)
            return torch.cat([r * cos + half * sin, rest], -1)

        def ln(t, w, b):
            return F.layer_norm(t, (E,), w, b, eps=L.FT_LAYERNORM_EPS)

        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool), causal], 1)  # (T, P+T)
        for n in range(d.layers):
            f = f"model.layers.{n}."
            h = ln(x, self.load(f + "input_layernorm.weight.bin", (E,)), self.load(f + "input_layernorm.bias.bin", (E,)))
            w_qkv = self.ranks(f + "attention.query_key_value.weight.{r}.bin", (E, 3, H // tp * D), dim=2)
            b_qkv = self.ranks(f + "attention.query_key_value.bias.{r}.bin", (3, H // tp * D), dim=1)
            qkv = torch.einsum("bte,ecj->btcj", h, w_qkv) + b_qkv  # (B, T, 3, H*D)
            q, k, v = (qkv[:, :, i].reshape(B, T, H, D).transpose(1, 2) for i in range(3))  # (B, H, T, D)
            q, k = rotary(q), rotary(k)
            if pre is not None:
                k = torch.cat([pre[n, 0].expand(B, H, P, D), k], 2)  # used as given: no rotary on the prefix
                v = torch.cat([pre[n, 1].expand(B, H, P, D), v], 2)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            a = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
            attn = a.transpose(1, 2).reshape(B, T, H * D) @ self.ranks(f + "attention.dense.weight.{r}.bin",
                                                                       (H // tp * D, E), dim=0)
            w1 = self.ranks(f + "mlp.dense_h_to_4h.weight.{r}.bin", (E, I // tp), dim=1)
            b1 = self.ranks(f + "mlp.dense_h_to_4h.bias.{r}.bin", (I // tp,), dim=0)
            w2 = self.ranks(f + "mlp.dense_4h_to_h.weight.{r}.bin", (I // tp, E), dim=0)
            ln2 = (self.load(f + "post_attention_layernorm.weight.bin", (E,)),
                   self.load(f + "post_attention_layernorm.bias.bin", (E,)))
            if d.parallel_residual:
                mlp = F.gelu(ln(x, *ln2) @ w1 + b1, approximate="tanh") @ w2
                x = x + attn + mlp + tp * self.load(f + "mlp.attention.bias.sum.bin", (E,))  # each rank adds it
            else:
                x = x + attn + self.load(f + "attention.dense.bias.bin", (E,))
                x = x + F.gelu(ln(x, *ln2) @ w1 + b1, approximate="tanh") @ w2 + \
                    self.load(f + "mlp.dense_4h_to_h.bias.bin", (E,))
        x = ln(x, self.load("model.final_layernorm.weight.bin", (E,)), self.load("model.final_layernorm.bias.bin", (E,)))
        return x @ self.load("model.lm_head.weight.bin", (V, E)).t()


def hf_logits(model, ids: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    from ..prefix import prefix_hidden_states

    mask = torch.ones_like(ids)
    with torch.no_grad():
        if table is None:
            return model(input_ids=ids, attention_mask=mask).logits
        return model.get_output_embeddings()(prefix_hidden_states(model, ids, mask, table))


def verify(export_dir, model_dir, prefixes, seed: int = 0, batch: int = 2, length: int = 12,
           out=print, allow_other_base: bool = False) -> bool:
    """Print per-task max |FT - HF| and return True when files and logits are all right.

    Every prefix is also checked like the exporter checks it: a GPT-NeoX prefix (header architecture) trained on
    `model_dir` (header base_model, unless `allow_other_base`) with the model's shape.
    """
    from transformers import AutoModelForCausalLM

    ft = FTModel(export_dir)
    ex = ft.export
    ok = True
    problems = check_files(ex)
    for p in problems:
        out(f"FILE  {p}")
    ok &= not problems
    tol = TOLERANCE[ex.dtype]
    tables, refused = {}, False
    for path in prefixes:
        table, shape, meta = load_prefix(path)
        bad = prefix_problems(path, shape, meta, ex.dims, base=str(model_dir), allow_other_base=allow_other_base)
        for p in bad:
            out(f"FAIL  {p}")
        refused |= bool(bad)
        tables[task_of(path, meta)] = table
    live = [n for n, p in ft.tasks if p > 0 and not L.is_placeholder(n)]
    missing = [n for n in live if n not in tables]
    if missing:
        out(f"FAIL  no --prefix given for task(s) {', '.join(missing)}: every task is checked against its source")
        ok = False
    unknown = [n for n in tables if n not in live]
    if unknown:
        out(f"FAIL  --prefix task(s) {', '.join(unknown)} are not in {ex.path}")
        ok = False
    if problems or refused:
        return False
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ex.dims.vocab, (batch, length), generator=gen)
    for task in [None] + [n for n in live if n in tables]:
        ref = hf_logits(model, ids, tables.get(task))
        got = ft.logits(ids, task)
        diff = (got - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        good = rel <= tol
        ok &= good
        out(f"{'ok  ' if good else 'FAIL'}  task {task or '(none)':<20} max |FT - HF| = {diff:.3e} "
            f"({rel:.2e} of max |logit|, tolerance {tol:g})")
    return ok
