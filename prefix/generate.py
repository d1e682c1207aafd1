"""Generation with zero, one or many prefixes over one loaded base model.

A prefix enters generation as a pre-filled `DynamicCache` (P positions) with an attention mask of length P+T:
the prefix is computed once, real tokens sit at positions P, P+1, ... exactly as in training, and switching task
costs a dictionary lookup, not a model reload. Task names are unique and never `base` (which means no prefix);
a prompt that would run past a learned absolute position table (GPT-2's n_positions) is refused before generating.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import table_to_cache
from .io import check_compatible, load_prefix
from .positions import absolute_position_limit, budget_problem, max_positions
from .shapes import PrefixShape
from .tasks import RENAME, check_file_task, task_of


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
        self.sources: dict[str, str] = {}  # task -> the file it came from
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.absolute_limit = absolute_position_limit(model)  # hard: positions past it do not exist
        self.max_positions, self.positions_field = max_positions(model.config)

    def add_prefix(self, path, name: str | None = None, replace: bool = False, loaded=None) -> str:
        """Load and check a prefix file; returns the task name it is known by. A name already loaded is refused
        unless `replace`; `loaded` is `load_prefix(path)`'s result when the caller has read the file already."""
        table, shape, meta = loaded if loaded is not None else load_prefix(path)
        check_compatible(path, shape, meta, self.model.config)
        name = name or task_of(path, meta)
        check_file_task(path, name)
        if name in self.tasks and not replace:
            raise ValueError(f"{self.sources[name]} and {path} both carry task {name!r}; rename one with "
                             + RENAME.format(path=path))
        self.tasks[name] = (table.to(self.device), shape)
        self.sources[name] = str(path)
        return name

    def length_problem(self, prompt_tokens: int, task: str | None, max_new_tokens: int,
                       absolute_only: bool = True) -> str | None:
        """Why `prompt_tokens` + the task's prefix + `max_new_tokens` do not fit the model's positions, or None.
        `absolute_only`: check only a learned absolute position table (a hard limit); else also
        max_position_embeddings (the length a rotary model was trained for)."""
        limit, field = self.absolute_limit, self.positions_field or "position table"
        if limit is None and not absolute_only:
            limit, field = self.max_positions, self.positions_field
        if limit is None:
            return None
        prefix_len = self.tasks[task][1].prefix_len if task is not None else 0
        mt = getattr(self.model.config, "model_type", None) or "the model"
        return budget_problem(prefix_len, prompt_tokens, max_new_tokens, limit, f"{mt}'s {field}")

    @torch.no_grad()
    def generate(self, prompts: list[str], task: str | None = None, sampling: Sampling = Sampling(),
                 streamer=None) -> list[str]:
        """Complete `prompts` (one batch, left-padded) with the prefix of `task` (None = the bare base model).
        Raises ValueError when the longest prompt would run past an absolute position table."""
        if task is not None and task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; loaded: {', '.join(self.tasks) or 'none'}")
        self.tok.padding_side = "left"
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        problem = self.length_problem(ids.shape[1], task, sampling.max_new_tokens)  # left padding: T = the longest
        if problem:
            raise ValueError(problem)
        kwargs = {}
        if task is not None:
            table, shape = self.tasks[task]
            kwargs["past_key_values"] = table_to_cache(table, shape, len(prompts), self.model.config, self.dtype)
            mask = torch.cat([mask.new_ones(len(prompts), shape.prefix_len), mask], dim=1)  # (B, P+T)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
            pad_token_id=self.tok.pad_token_id, use_cache=True, **sampling.generate_kwargs(), **kwargs)
        texts = self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        # max_new_tokens can cut a character that spans several tokens (an emoji): drop the incomplete tail
        return [t.rstrip("\ufffd") for t in texts]
