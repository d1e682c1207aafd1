"""The position budget: the positions a sequence takes, and the one check that every caller makes.

A sequence with a task sits behind its P prefix positions (0..P-1, the table's keys and values), its T tokens at
P..P+T-1. Generating N new tokens feeds N-1 of them back (the last is returned, never fed), so generation takes
P + T + N - 1 positions; training feeds every token, P + T. The same count holds for training, `Generator`, both
serving engines and the HTTP layer, so a request the API accepts is one the engine can run.
"""
from __future__ import annotations

_ABSOLUTE_POSITION_MODULES = ("wpe", "embed_positions", "position_embeddings")  # learned tables: GPT-2, OPT, ...


def positions_needed(prefix_len: int, tokens: int, new_tokens: int = 0) -> int:
    """Positions taken by P prefix slots, `tokens` fed tokens and `new_tokens` generated after them."""
    return prefix_len + tokens + max(new_tokens - 1, 0)


def budget_problem(prefix_len: int, tokens: int, new_tokens: int, limit: int | None, what: str) -> str | None:
    """Why the sequence does not fit `limit` positions (`what` names the limit, e.g. "llama's n_positions"), with
    the largest prompt and the most new tokens that would fit; None when it fits or there is no limit."""
    needed = positions_needed(prefix_len, tokens, new_tokens)
    if limit is None or needed <= limit:
        return None
    terms = f"prefix {prefix_len} + prompt {tokens}" + (
        f" + max_new_tokens {new_tokens} - 1 (the last new token takes none)" if new_tokens else "")
    fixes = []
    room = limit - positions_needed(prefix_len, 0, new_tokens)
    if room >= 1:
        fixes.append(f"shorten the prompt to at most {room} tokens")
    most_new = limit - prefix_len - tokens + 1
    if new_tokens and most_new >= 1:
        fixes.append(f"ask for at most {most_new} new token{'s' if most_new != 1 else ''}")
    return (f"expected at most {limit} positions ({what}), got {needed}: {terms}; "
            + (" or ".join(fixes) or "shorten the prompt and ask for fewer new tokens"))


def max_positions(config) -> tuple[int | None, str]:
    """(the model's position count, the config field it comes from); (None, '') if the config gives none."""
    from .shapes import text_config

    text = text_config(config)
    for field in ("n_positions", "max_position_embeddings"):
        value = getattr(text, field, None)
        if isinstance(value, int) and value > 0:
            return value, field
    return None, ""


def absolute_position_limit(model) -> int | None:
    """Positions a model with a learned absolute position table (GPT-2, OPT) can address; past it indexing fails.
    None for rotary/ALiBi models, whose max_position_embeddings is a training length, not a hard limit."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _ABSOLUTE_POSITION_MODULES:
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None
