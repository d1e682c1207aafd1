"""Generation with zero, one or many prefixes over one loaded base model.

A prefix enters generation as a pre-filled `DynamicCache` (P positions) with an attention mask of length P+T:
the prefix is computed once, real tokens sit at positions P, P+1, ... exactly as in training, and switching task
costs a dictionary lookup, not a model reload.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import table_to_cache
from .io import check_compatible, load_prefix
from .shapes import PrefixShape


@dataclass
class Sampling:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0 = off

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None}


class Generator:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.tasks: dict[str, tuple[torch.Tensor, PrefixShape]] = {}
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def add_prefix(self, path, name: str | None = None) -> str:
        """Load and check a prefix file; returns the task name it is known by."""
        table, shape, meta = load_prefix(path)
        check_compatible(path, shape, meta, self.model.config)
        name = name or meta.get("task") or str(path)
        self.tasks[name] = (table.to(self.device), shape)
        return name

    @torch.no_grad()
    def generate(self, prompts: list[str], task: str | None = None, sampling: Sampling = Sampling(),
                 streamer=None) -> list[str]:
        """Complete `prompts` (one batch, left-padded) with the prefix of `task` (None = the bare base model)."""
        if task is not None and task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; loaded: {', '.join(self.tasks) or 'none'}")
        self.tok.padding_side = "left"
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        kwargs = {}
        if task is not None:
            table, shape = self.tasks[task]
            kwargs["past_key_values"] = table_to_cache(table, shape, len(prompts), self.model.config, self.dtype)
            mask = torch.cat([mask.new_ones(len(prompts), shape.prefix_len), mask], dim=1)  # (B, P+T)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
            pad_token_id=self.tok.pad_token_id, use_cache=True, **sampling.generate_kwargs(), **kwargs)
        return self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
