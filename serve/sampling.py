"""The one sampler of both engines: penalties, temperature, min-p, top-k, top-p, a seeded draw, and logprobs.

Both `serve/engine.py` (each route) and `serve/sequential.py` build one `RequestSampler` per request and call
`sample(logits, samplers)` on the fp32 logits of the last position, one row per request:

    raw logits (V,) --log_softmax--> logprobs (what the API returns: the model's own distribution, prefix included)
       |
       +- repetition_penalty  over prompt + generated ids: logit > 0 -> logit / r, else logit * r      (HF, vLLM)
       +- frequency_penalty   minus f x count of the id among the generated tokens                       (OpenAI)
       +- presence_penalty    minus p if the id was generated at least once                              (OpenAI)
       |
       +- temperature 0: argmax (greedy; penalties do apply, as in vLLM)
       +- else: / temperature, min_p (drop ids whose probability < min_p x the top one), top_k, top_p (the smallest
          head whose mass reaches top_p), softmax, one torch.multinomial draw from the request's own generator

The order is vLLM's (penalties, temperature, min-p, top-k/top-p). Logprobs are vLLM's default "raw_logprobs": a
log-softmax of the logits as the model gave them, before penalties, temperature and truncation, so the logprob of a
token sampled at temperature 1.3 is the model's, not the sampling distribution's. A seeded request's draws depend
only on its own logits and generator, never on its batch companions.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import torch

from .contract import GenRequest

LOGPROB_FLOOR = -9999.0  # what -inf becomes in JSON (as vLLM)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and the `k` most likely alternatives, best first (raw model distribution)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestSampler:
    """One request's sampling state: its parameters, its generator, the ids it has seen (for penalties) and the
    logprobs of sampled tokens not yet handed out (`take`)."""

    __slots__ = ("req", "gen", "penalized", "greedy_only", "generated", "seen", "pending")

    def __init__(self, req: GenRequest, device):
        self.req = req
        self.gen = None
        if req.temperature > 0:
            self.gen = torch.Generator(device=device)
            if req.seed is None:
                self.gen.seed()
            else:
                self.gen.manual_seed(int(req.seed))
        self.penalized = (req.repetition_penalty != 1.0 or req.presence_penalty != 0.0
                          or req.frequency_penalty != 0.0)
        self.greedy_only = req.temperature <= 0 and not self.penalized and req.logprobs is None
        self.generated: Counter = Counter()                       # generated id -> count
        self.seen: set[int] = set(req.prompt_ids) if req.repetition_penalty != 1.0 else set()
        self.pending: deque[TokenLogprob] = deque()               # filled by sample(), emptied by take()

    def _penalize(self, x: torch.Tensor) -> torch.Tensor:
        req, vocab = self.req, x.shape[-1]
        if req.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor([t for t in self.seen if 0 <= t < vocab], dtype=torch.long, device=x.device)
            vals = x[ids]
            x[ids] = torch.where(vals > 0, vals / req.repetition_penalty, vals * req.repetition_penalty)
        if (req.frequency_penalty or req.presence_penalty) and self.generated:
            items = [(t, c) for t, c in self.generated.items() if 0 <= t < vocab]
            ids = torch.tensor([t for t, _ in items], dtype=torch.long, device=x.device)
            counts = torch.tensor([c for _, c in items], dtype=x.dtype, device=x.device)
            x[ids] -= req.frequency_penalty * counts + req.presence_penalty
        return x

    def _draw(self, x: torch.Tensor) -> int:
        req = self.req
        x = x / req.temperature
        if req.min_p > 0:
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < req.min_p * probs.max(), float("-inf"))
        if 0 < req.top_k < x.shape[-1]:
            kth = torch.topk(x, req.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if req.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = probs.cumsum(-1) - probs >= req.top_p  # past the smallest head whose mass reaches top_p; 1st stays
            x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
        return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=self.gen))

    def next_token(self, raw: torch.Tensor) -> int:
        """The next token from one row of fp32 logits (V,); records it (penalties) and its logprobs (take)."""
        req = self.req
        x = self._penalize(raw.clone()) if self.penalized else raw
        token = int(x.argmax()) if req.temperature <= 0 else self._draw(x)
        if req.logprobs is not None:
            lp = torch.log_softmax(raw, dim=-1)
            top = ()
            if req.logprobs > 0:
                values, ids = torch.topk(lp, min(req.logprobs, lp.shape[-1]))
                top = tuple(zip(ids.tolist(), values.tolist()))
            self.pending.append(TokenLogprob(token, float(lp[token]), top))
        self.record(token)
        return token

    def record(self, token: int) -> None:
        if self.penalized:
            self.generated[token] += 1
            if self.req.repetition_penalty != 1.0:
                self.seen.add(token)

    def take(self, token: int) -> TokenLogprob | None:
        """The logprobs of `token`, sampled earlier (None when the request asked for none). Tokens are taken in the
        order they were sampled; entries of tokens that were never delivered are skipped."""
        if self.req.logprobs is None:
            return None
        while self.pending:
            entry = self.pending.popleft()
            if entry.token == token:
                return entry
        return None


def sample(logits: torch.Tensor, samplers: list[RequestSampler | None]) -> list[int]:
    """Next token per row: logits (N, V), one sampler per row (None: greedy, nothing recorded)."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for i, s in enumerate(samplers):
        if s is None:
            continue
        if s.greedy_only:
            s.record(out[i])
        else:
            out[i] = s.next_token(logits[i])
    return out
