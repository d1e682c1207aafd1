"""The prefix encoder (Li & Liang 2021): a small MLP that produces the per-layer key/value table.

    Embedding(P, input_dim) -> Linear(input_dim, hidden_dim) -> Tanh -> Linear(hidden_dim, L*2*H_kv*D)   (+ anchor)

`anchor` is a fixed table added to the MLP's output. With the last Linear zeroed it makes the step-0 prefix exactly
the anchor: the base model's own key/values for a real text (`init="text"`, the default, which leaves the base
model's predictions almost untouched) or zeros (`init="zero"`). `init="random"` is the paper's plain random MLP.
After training only `encoder()` -- the projected table -- is needed for inference.
"""
from __future__ import annotations

import torch
from torch import nn

from .shapes import PrefixShape, split_table

INITS = ("text", "zero", "random")


class PrefixEncoder(nn.Module):
    def __init__(self, shape: PrefixShape, input_dim: int = 512, hidden_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.embedding = nn.Embedding(shape.prefix_len, input_dim)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden_dim, shape.width)
        )
        self.register_buffer("anchor", torch.zeros(shape.prefix_len, shape.width))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (P, input_dim)
        return self.mlp(x) + self.anchor.to(x.dtype)  # (P, L*2*H_kv*D)

    @torch.no_grad()
    def reset(self, init: str, anchor: torch.Tensor | None = None) -> None:
        """Initialise for `init`; `anchor` (P, width) is required for `"text"`."""
        if init not in INITS:
            raise ValueError(f"unknown prefix init {init!r}: expected one of {', '.join(INITS)}")
        for module in (self.embedding, *self.mlp):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.anchor.zero_()
        if init == "random":
            return
        out = self.mlp[-1]
        out.weight.zero_()
        out.bias.zero_()
        if init == "text":
            if anchor is None or tuple(anchor.shape) != (self.shape.prefix_len, self.shape.width):
                got = None if anchor is None else tuple(anchor.shape)
                raise ValueError(f"text init needs an anchor of shape {(self.shape.prefix_len, self.shape.width)}, got {got}")
            self.anchor.copy_(anchor)


@torch.no_grad()
def text_key_values(model, tokenizer, text: str, shape: PrefixShape) -> torch.Tensor:
    """The base model's own keys/values for the first P tokens of `text` (repeated if short), as a `[P, width]` table.

    They are computed at positions 0..P-1, exactly where the prefix sits, so rotary phases already match.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("--prefix_init_text is empty after tokenisation: give some words")
    ids = (ids * (shape.prefix_len // len(ids) + 1))[: shape.prefix_len]
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    cache = out.past_key_values
    layers = []
    for i in range(shape.num_layers):
        k, v = cache.layers[i].keys, cache.layers[i].values  # (1, H_kv, P, D) each
        layers.append(torch.stack([k[0], v[0]]))  # (2, H_kv, P, D)
    kv = torch.stack(layers)  # (L, 2, H_kv, P, D)
    return kv.permute(3, 0, 1, 2, 4).reshape(shape.prefix_len, shape.width).float()  # (P, L*2*H_kv*D)


def table_to_cache(table: torch.Tensor, shape: PrefixShape, batch_size: int, config, dtype=None):
    """A `DynamicCache` holding the prefix for `batch_size` rows: the fast path for generation."""
    from transformers import DynamicCache

    kv = split_table(table, shape)  # (L, 2, H, P, D)
    cache = DynamicCache(config=config)
    for i in range(shape.num_layers):
        k = kv[i, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H, P, D)
        v = kv[i, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(k.to(dtype or k.dtype).contiguous(), v.to(dtype or v.dtype).contiguous(), i)
    return cache
