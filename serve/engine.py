"""The serving engine: one process holds the frozen base model and many task prefixes; requests of different tasks
(different tables, different prefix lengths P) and requests with no prefix decode in the same forward pass. A request
that arrives while others decode joins at the next step (iteration-level scheduling); a finished one leaves.

    engine = Engine(model, tokenizer, max_batch_size=16)
    engine.add_task("smileface", table, shape)           # table [P, L*2*H_kv*D] fp32, from prefix.io.load_prefix
    engine.start()
    rid = engine.submit(GenRequest(prompt_ids, task="smileface", max_new_tokens=64), on_token)
    ...
    engine.shutdown()

Whatever the route, a request's real tokens sit at positions P, P+1, ... behind its task's P prefix keys/values, as in
training and in `prefix.generate.Generator`; a request with no task is the bare base model (positions 0, 1, ...).

Two routes compute the same tokens (greedy outputs are token-equal to `Generator` run on each request alone, fp32):

1. "paged": transformers' own continuous batching (`transformers.generation.continuous_batching`, tested on
   transformers 5.23.x only; the route switches itself off on other versions, see `PAGED_TESTED`). Classes used:

   - `_PrefixManager(ContinuousBatchingManager)`: the stock manager and its generation thread (made a daemon); it
     overrides `_create_batch_processor` to hook the two things below into the processor it builds, and refuses
     one that would run under CUDA graphs or compile.
   - `PrefixScheduler(FIFOScheduler)`, registered in `SCHEDULER_MAPPING` as "prefixtune" and chosen through
     `ContinuousBatchingConfig.scheduler_type`. When the scheduler reaches a request as a candidate (its
     `_infer_request_tokens`, status PENDING, `position_offset == 0`: after the running requests got their blocks),
     it allocates the blocks for positions 0..P-1 through `PagedAttentionCache.can_store_request_tokens(state, P)`,
     writes the task's keys/values into them through the full-attention allocator's own `update()` (write indices
     from `get_write_indices(request, 0, P)`) and sets `state.position_offset = P`. From there the stock code does
     the rest: position ids are `range(position_offset, ...)`, the prompt's cache is written after the prefix (also
     when a long prompt's prefill is split over several steps), and every step reads `0 .. offset+q` from the block
     table, prefix included. It is the mechanism of stock prefix sharing (cache blocks the request did not compute,
     offset advanced), with the blocks filled from the table.
         task kv (device, model dtype):  (L, 2, P, H_kv, D)    one layer's keys: (P, H_kv, D) = the allocator's rows
         paged cache rows:               (tokens, H_kv, D) per layer and key/value, addressed through the block table
     A request that is not scheduled in the end (no room for its prompt, token budget spent) gives its prefix
     blocks back when `schedule_batch` returns, so a waiting request never holds cache that running requests starve
     for (holding it stopped the stock loop with "No requests can be scheduled and no requests can be offloaded":
     only running requests are evicted); it is written again next time. A request whose prefix does not fit gets,
     for that round, an offset no cache budget covers, which makes the stock loop skip it without allocating
     anything (else it could start without its prefix).
   - `model_runner._sample` is replaced on the processor's runner by the engine's sampler: row i of the scores is
     the i-th request of `inputs_and_outputs.requests_in_batch` that gets a token (the order the stock update reads
     them); greedy, or temperature/top-k/top-p sampling drawn from that request's own `torch.Generator`.
         scores: (1, N, V) fp32, N = requests in the batch; rows past those that get a token are unused (split prefills)
   - If continuous batching's thread dies (an exception in a step), its requests end with "error: ..." and the
     engine starts it again.

   Hazards handled:
   (1) block sharing (prefix caching) hashes token ids from index 0, blind to the prefix: a no-prefix request reused a
       task's blocks and produced wrong tokens. `allow_block_sharing=False`: every request owns its blocks.
   (2) CPU offloading compares `position_offset` with the request's token count, off by P:
       `cpu_offload_space=0` keeps it off. The other eviction path, soft reset (a starved request is re-queued as a
       new PENDING request with its generated tokens appended to its prompt, offset 0), works: the scheduler sees
       offset 0 again and re-writes the prefix before the re-prefill (tested with a deliberately small cache).
   (3) the last P mod page_size prefix slots share a page with the request's own first tokens: the prefix is copied
       into blocks private to each request (no sharing across requests of the same task; a prefix costs P cache
       slots per request).
   (4) sliding-window / hybrid caches: refused (`check_base_supported` at construction; the paged route also checks
       that the cache has one full-attention allocator and nothing else).
   Also: async double-buffering, CUDA graphs and compile are off (the prefix write and the per-request sampler run
   eagerly between forwards). Attention: sdpa as loaded; flash attention is switched to only for fp16/bf16 models;
   an eager model takes the padded route under "auto", because continuous batching switches it to `paged|eager`,
   which no other caller of the model can use until the engine shuts down (route="paged" accepts that). On a CPU
   the cache defaults to max_batch_size x min(context, 2048) tokens, at most 1 GiB (`cache_tokens=`), and 512 tokens
   per step (`max_batch_tokens=`); on a GPU continuous batching sizes both from free memory.

2. "padded": a scheduler of ours over one batched `DynamicCache`, used when the paged route cannot serve (another
   transformers version, an attention implementation continuous batching refuses, or its construction fails) or
   when asked for. Per step: one decode forward for every running row, then one prefill forward for the requests that
   join (at most `max_batch_tokens`, default 4096, padded tokens, the first always), whose cache is merged into the
   batch; rows that finish are dropped and the all-padding columns on the left are cut (compaction). A step that
   fails fails only its own requests: a failed prefill leaves the running rows decoding. Prefixes of different P are left-padded, the mask is 0 on padding, position ids come from
   the mask's cumsum, so real tokens sit at P_i + index:
         prefill cache (J joiners):  (J, H_kv, Pmax, D) per layer; row i = [zeros(Pmax-P_i) | prefix_i]
         prefill mask:               (J, Pmax+Tmax) = [0.. | 1 x P_i | 0.. | 1 x T_i]
         batch cache:                (B, H_kv, S, D) per layer, mask (B, S), next position (B,), next token (B,)
   Cache entries under mask 0 are zeroed after each prefill, so padding can never feed NaN into a real row.

Sampling: `serve/sampling.py`, shared with the sequential engine, on both routes: penalties (presence, frequency,
repetition), then temperature 0 = greedy (argmax of the fp32 logits, as `Generator` with --greedy); otherwise
logits / temperature, min-p, top-k, top-p, softmax, and one `torch.multinomial` draw from the request's generator
(seeded by `GenRequest.seed`, else randomly): the draws of a seeded request never depend on its batch companions. Its
logits may differ from one batch to another in the last float bits, so a draw landing within ~1e-6 of a token
boundary could in principle pick a neighbour; the tests see identical tokens. The model's generation_config
(repetition penalty etc.) is not applied: the engine samples as vLLM does, from the request's own parameters. With
`GenRequest.logprobs` set, each token goes to on_token with its `TokenLogprob` (log-softmax of the raw logits); on the
paged route the sampler runs in continuous batching's thread and queues it on the request's sampler, and the engine
thread takes it with the token.

Stop tokens: a token in `stop_token_ids` ends the request with finish reason "stop" and is NOT emitted (not passed to
on_token, not in generate_many's output), unless `emit_stop_token` (the HTTP layer sets it: the token counts in usage
and has logprobs, as in vLLM, and its text is dropped unless include_stop_str_in_output).
"""
from __future__ import annotations

import inspect
import itertools
import logging
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..prefix.errors import one_line
from ..prefix.positions import budget_problem
from ..prefix.shapes import PrefixShape, base_dims, split_table
from ..prefix.support import check_base_supported
from ..prefix.tasks import BASE_TASK
from .contract import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStopped,
    GenRequest,
    QueueFull,
    UnknownTask,
    check_request,
    check_task,
    max_context,
)
from .sampling import RequestSampler, sample

__all__ = ["Engine", "EngineStopped", "GenRequest", "QueueFull", "UnknownTask", "pick_tokens"]
logger = logging.getLogger("prefixtune.serve")

PAGED_TESTED = ((5, 23), (5, 24))  # [low, high): transformers versions the paged route was verified on
SCHEDULER_NAME = "prefixtune"
ROUTES = ("auto", "paged", "padded")


@dataclass(eq=False)
class _Task:
    name: str
    table: torch.Tensor  # (P, width) fp32, as given
    shape: PrefixShape
    kv: torch.Tensor  # device, model dtype; layout per route (paged: (L, 2, P, H, D); padded: (L, 2, H, P, D))
    removing: bool = False


class _Live:
    """One request inside the engine."""

    __slots__ = ("id", "rid", "req", "task", "on_token", "stop", "sampler", "n_out", "n_seen", "done", "prefix_len")

    def __init__(self, id_: int, req: GenRequest, task: _Task | None, on_token, sampler: RequestSampler):
        self.id, self.rid, self.req, self.task, self.on_token = id_, f"r{id_}", req, task, on_token
        self.sampler = sampler
        self.stop = frozenset(int(t) for t in req.stop_token_ids)
        self.n_out = 0  # tokens emitted
        self.n_seen = 0  # tokens received from the paged route (emitted + a final stop token)
        self.done = False
        self.prefix_len = task.shape.prefix_len if task is not None else 0

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else BASE_TASK


# ------------------------------------------------------------------------------------------------------- sampling

def pick_tokens(logits: torch.Tensor, lives: list[_Live | None]) -> list[int]:
    """Next token per row: logits (N, V), one request per row (None: greedy). serve/sampling.py does the work."""
    return sample(logits, [live.sampler if live is not None else None for live in lives])


# ------------------------------------------------------------------------------------------------ the paged route

def _transformers_version() -> tuple[int, int]:
    import transformers

    parts = transformers.__version__.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def _scheduler_class():
    """PrefixScheduler, defined on first use (importing continuous batching is not free) and registered by name."""
    from transformers.generation.continuous_batching.requests import RequestStatus
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler

    if SCHEDULER_NAME in SCHEDULER_MAPPING:
        return SCHEDULER_MAPPING[SCHEDULER_NAME]

    class PrefixScheduler(FIFOScheduler):
        """FIFO scheduling; a request enters the batch with its task's prefix already in its first cache blocks and
        `position_offset = P`. `prefix_of(request_id)` (set by the engine) gives the task kv (L, 2, P, H, D) or None.

        The prefix is written when the scheduler reaches the request as a candidate (`_infer_request_tokens`, after
        the running requests got their blocks). A request that is not scheduled in the end gives its prefix blocks
        back (`schedule_batch`), so a waiting request never holds cache that running requests starve for; it is
        written again next time. When the prefix does not fit, the request is made unschedulable for this round by a
        position offset no cache budget covers (the scheduler then skips it without allocating anything)."""

        prefix_of: Callable[[str], torch.Tensor | None] | None = None
        _BLOCKED = 1 << 40  # an offset no budget covers: "skip me this round"

        def reset(self) -> None:
            super().reset()
            self._prefixed: dict[str, bool] = {}  # request id -> prefix written (True) or blocked (False), this round

        def _infer_request_tokens(self, state, request_ids_to_remove_from_waiting):
            # Offset 0 and PENDING: never scheduled, or soft reset (re-queued from scratch): write the prefix first.
            if state.status == RequestStatus.PENDING and state.position_offset == 0 and not state.is_cpu_offloaded:
                kv = self.prefix_of(state.request_id) if self.prefix_of is not None else None
                if kv is not None:
                    written = self._write_prefix(state, kv)
                    self._prefixed[state.request_id] = written
                    if not written:
                        state.position_offset = self._BLOCKED
            return super()._infer_request_tokens(state, request_ids_to_remove_from_waiting)

        def schedule_batch(self, token_budget: int, cache_budget: int):
            try:
                return super().schedule_batch(token_budget, cache_budget)
            finally:  # requests still waiting give their prefix blocks back (or lose the block)
                for rid, written in self._prefixed.items():
                    state = self.waiting_requests.get(rid)
                    if state is not None and state.status == RequestStatus.PENDING:
                        if written:
                            self.cache.free_blocks(rid)
                        state.position_offset = 0
                self._prefixed = {}

        def _write_prefix(self, state, kv: torch.Tensor) -> bool:
            prefix_len = kv.shape[2]
            if not self.cache.can_store_request_tokens(state, prefix_len):  # allocates blocks for positions 0..P-1
                return False
            (allocator,) = self.cache.cache_allocators.values()  # one full-attention group (checked at start)
            write = torch.tensor(allocator.get_write_indices(state.request_id, 0, prefix_len), dtype=torch.long,
                                 device=kv.device)  # (P,)
            no_read = write[:0]
            for layer in allocator.layer_indices:
                allocator.update(kv[layer, 0], kv[layer, 1], layer, no_read, write)  # (P, H, D) each
            state.position_offset = prefix_len
            return True

    SCHEDULER_MAPPING[SCHEDULER_NAME] = PrefixScheduler
    return PrefixScheduler


class _PagedRoute:
    name = "paged"

    def __init__(self, engine: Engine, page_size: int, cache_tokens: int | None, max_batch_tokens: int | None):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import ContinuousBatchingManager
        from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

        self.e = engine
        model = engine.model
        groups = group_layers_by_attn_type(model.config.get_text_config())
        if list(groups) != ["full_attention"]:
            raise ValueError(f"expected full attention in every layer, got {', '.join(groups)}")
        scheduler_cls = _scheduler_class()
        on_cpu = engine.device.type == "cpu"
        if cache_tokens is None and on_cpu:
            # the sdpa path also holds a (max_batch_tokens, cache + max_batch_tokens) mask: keep the CPU cache modest
            per_request = min(engine.max_context or 2048, 2048)
            bytes_per_token = engine.num_layers * 2 * engine.num_kv_heads * engine.head_dim * engine.dtype.itemsize
            cache_tokens = min(engine.max_batch_size * per_request, max(per_request, (1 << 30) // bytes_per_token))
        if max_batch_tokens is None and on_cpu:
            max_batch_tokens = 512
        num_blocks = None if cache_tokens is None else max(2, math.ceil(cache_tokens / page_size))
        half = engine.dtype in (torch.float16, torch.bfloat16)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=engine.max_batch_size, allow_block_sharing=False, use_async_batching=False,
            use_cuda_graph=False, scheduler_type=SCHEDULER_NAME, cpu_offload_space=0.0, auto_switch_to_flash=half,
            default_compile_level=0, per_request_processors=False)
        gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=1)
        route = self

        class _PrefixManager(ContinuousBatchingManager):
            def start(self) -> None:  # the stock start, with a daemon thread: a forgotten engine never blocks exit
                if self.is_running():
                    return
                self.background_thread_status.clear()
                self._generation_thread = threading.Thread(target=self._run_generation_loop, daemon=True,
                                                           name="prefixtune-continuous-batching")
                self._generation_thread.start()

            def _create_batch_processor(self):
                processor = super()._create_batch_processor()
                if not isinstance(processor.scheduler, scheduler_cls):
                    raise RuntimeError(f"continuous batching built a {type(processor.scheduler).__name__}, expected "
                                       "the prefix scheduler")
                runner = processor.model_runner
                if runner.pad_inputs or runner._compiled_varlen is not None or runner._compiled_decode is not None:
                    raise RuntimeError("continuous batching chose CUDA graphs or compile, which the per-request "
                                       "sampler cannot run under")
                processor.scheduler.prefix_of = route.prefix_of
                runner._sample = route.sampler(processor)
                return processor

        self.original_attn = model.config._attn_implementation
        try:
            self.mgr = _PrefixManager(model, gen_config, cb_config)  # may switch the attention implementation
            self.mgr.batch_processor = self.mgr._create_batch_processor()  # build the cache now: errors surface here
            if self.mgr.batch_processor.use_async_batching:
                raise RuntimeError("async batching could not be turned off")
        except BaseException:
            self._restore_attention()
            raise
        self.mgr.output_router.output_queue = engine._events  # outputs wake the engine thread like any event
        (allocator,) = self.mgr.batch_processor.cache.cache_allocators.values()
        self.capacity = allocator.num_blocks * allocator.tokens_per_page  # cache slots one request may use
        self.attn_implementation = model.config._attn_implementation

    def _restore_attention(self) -> None:
        mgr = getattr(self, "mgr", None)
        if mgr is not None:
            mgr._original_attn_impl = None
        if self.e.model.config._attn_implementation != self.original_attn:
            self.e.model.set_attn_implementation(self.original_attn)

    def prepare_kv(self, kv: torch.Tensor) -> torch.Tensor:  # (L, 2, H, P, D) -> (L, 2, P, H, D), device, dtype
        return kv.transpose(2, 3).to(self.e.device, self.e.dtype).contiguous()

    def prefix_of(self, rid: str) -> torch.Tensor | None:
        live = self.e._by_rid.get(rid)
        return live.task.kv if live is not None and live.task is not None else None

    def sampler(self, processor):
        engine = self.e

        def _sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:  # scores (1, N, V) fp32
            # Row i is the i-th request of the batch that gets a token (the stock update reads them in that order);
            # N counts every request of the batch, so rows past those (split prefills) are unused: 0 is written.
            rows = [fs.state.request_id for fs in processor.inputs_and_outputs.requests_in_batch if fs.has_new_token]
            if len(rows) > scores.shape[1]:
                raise RuntimeError(f"{scores.shape[1]} logit rows for {len(rows)} requests")
            tokens = pick_tokens(scores[0, :len(rows)], [engine._by_rid.get(rid) for rid in rows])
            tokens += [0] * (scores.shape[1] - len(rows))
            output_ids[0, :len(tokens)].copy_(torch.tensor(tokens, dtype=output_ids.dtype))

        return _sample

    def start(self) -> None:
        self.mgr.start()

    def admit(self, live: _Live) -> bool:
        stop = sorted(live.stop)
        rid = self.mgr.add_request(list(live.req.prompt_ids), request_id=live.rid, streaming=True,
                                   max_new_tokens=live.req.max_new_tokens, eos_token_id=stop or -1)
        return rid is not None

    def cancel(self, live: _Live) -> None:
        self.mgr.cancel_request(live.rid)

    def ready(self) -> bool:
        """Whether continuous batching takes requests now (not while its thread is dead or stopping)."""
        return self.mgr.is_running() and self.mgr.background_thread_status.can_accept_new_requests() is None

    def _handle(self, item) -> None:
        from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

        e = self.e
        if not isinstance(item, GenerationOutput):
            e._handle_event(item)
            return
        live = e._by_rid.get(item.request_id)
        if live is None or live.done:
            return
        if item.status == RequestStatus.FAILED:
            e._finish(live, f"error: {item.error or 'generation failed'}")
            return
        for token in item.generated_tokens[live.n_seen:]:  # streaming: all tokens so far (soft resets included)
            live.n_seen += 1
            if e._accept(live, token):
                return
        if item.status == RequestStatus.FINISHED:
            e._finish(live, FINISH_LENGTH)

    def run(self) -> None:
        """The engine thread: hand waiting requests over, turn outputs into callbacks, until stopped and drained."""
        e = self.e
        while True:
            if self.ready():
                e._admit()
            try:
                self._handle(e._events.get(timeout=0.2))
            except queue.Empty:
                pass
            if not self.mgr.is_running() and e._started and e._fatal is None:
                self._restart()
            if e._stopping and e._idle():
                return

    def _restart(self) -> None:
        """Continuous batching's thread died (it fails its requests first, which end here as "error: ..."): fail
        what it still held and start it again, so that one bad step does not take the server down."""
        e = self.e
        while True:  # its last outputs first: they carry the error
            try:
                self._handle(e._events.get_nowait())
            except queue.Empty:
                break
        fatal = self.mgr.background_thread_status.fatal_error
        reason = f"error: the generation loop stopped ({type(fatal).__name__ if fatal else 'no error'}: {fatal})"
        logger.error("continuous batching stopped: %s; restarting it", fatal)
        with e._lock:
            lost = list(e._running.values())
        for live in lost:
            e._finish(live, reason)
        try:
            self.mgr.start()
        except Exception as exc:  # noqa: BLE001
            e._fail_all(f"error: continuous batching could not restart ({type(exc).__name__}: {exc})")

    def stop(self, hard: bool) -> None:
        if self.mgr.is_running():
            self.mgr.stop(block=True, hard_stop=hard)
        self._restore_attention()


# ----------------------------------------------------------------------------------------------- the padded route

class _PaddedRoute:
    name = "padded"

    def __init__(self, engine: Engine, max_prefill_tokens: int = 4096):
        self.e = engine
        self.capacity = None
        self.rows: list[_Live] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: keys, values (B, H, S, D)
        self.mask = self.pos = self.next_token = None  # (B, S), (B,), (B,)
        model = engine.model
        self.keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        pad = getattr(engine.tokenizer, "pad_token_id", None) if engine.tokenizer is not None else None
        self.pad_id = int(pad) if pad is not None else 0
        self.attn_implementation = model.config._attn_implementation
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens one prefill step may hold (the first always)

    def prepare_kv(self, kv: torch.Tensor) -> torch.Tensor:  # (L, 2, H, P, D) on the device, model dtype
        return kv.to(self.e.device, self.e.dtype).contiguous()

    def start(self) -> None:
        pass

    def stop(self, hard: bool) -> None:
        self.rows, self.layers, self.mask = [], [], None

    def _cache(self, layers):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.e.model.config)
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache

    def _forward(self, ids, mask, positions, layers):
        kwargs = {"logits_to_keep": 1} if self.keep_arg else {}
        out = self.e.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           past_key_values=self._cache(layers), use_cache=True, **kwargs)
        cache = out.past_key_values
        new_layers = [(layer.keys, layer.values) for layer in cache.layers]
        return out.logits[:, -1], new_layers

    @torch.no_grad()
    def _decode(self) -> None:
        e = self.e
        b = len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)  # (B, S+1)
        logits, self.layers = self._forward(self.next_token[:, None], self.mask, self.pos[:, None], self.layers)
        self.pos += 1
        tokens = pick_tokens(logits, self.rows)
        e.steps += 1
        for i, (live, token) in enumerate(zip(self.rows, tokens)):
            if not live.done and not e._accept(live, token):
                self.next_token[i] = token

    @torch.no_grad()
    def _prefill(self, joiners: list[_Live]) -> None:
        e, dev = self.e, self.e.device
        n = len(joiners)
        plens = [live.prefix_len for live in joiners]
        tlens = [len(live.req.prompt_ids) for live in joiners]
        pm, tm = max(plens), max(tlens)
        ids = torch.full((n, tm), self.pad_id, dtype=torch.long, device=dev)  # (J, Tmax), left-padded
        mask = torch.zeros(n, pm + tm, dtype=torch.long, device=dev)  # (J, Pmax+Tmax)
        for i, (live, p, t) in enumerate(zip(joiners, plens, tlens)):
            ids[i, tm - t:] = torch.tensor(live.req.prompt_ids, dtype=torch.long, device=dev)
            mask[i, pm - p:pm] = 1
            mask[i, pm + tm - t:] = 1
        layers = []
        if pm:
            for layer in range(e.num_layers):
                kv = torch.zeros(2, n, e.num_kv_heads, pm, e.head_dim, dtype=e.dtype, device=dev)  # (2, J, H, Pmax, D)
                for i, live in enumerate(joiners):
                    if live.prefix_len:
                        kv[:, i, :, pm - live.prefix_len:] = live.task.kv[layer]  # (2, H, P_i, D)
                layers.append((kv[0], kv[1]))
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, pm:]  # (J, Tmax): P_i + index on real tokens
        logits, new_layers = self._forward(ids, mask, positions, layers)
        keep = mask.bool()[:, None, :, None]  # (J, 1, S, 1): padding never carries NaN into the batch
        new_layers = [(torch.where(keep, k, 0), torch.where(keep, v, 0)) for k, v in new_layers]
        pos = torch.tensor([p + t for p, t in zip(plens, tlens)], dtype=torch.long, device=dev)
        tokens = pick_tokens(logits, joiners)
        e.steps += 1
        next_token = torch.tensor(tokens, dtype=torch.long, device=dev)
        self._merge(joiners, new_layers, mask, pos, next_token)
        for live, token in zip(joiners, tokens):
            e._accept(live, token)

    def _merge(self, joiners, layers, mask, pos, next_token) -> None:
        if not self.rows:
            self.rows, self.layers, self.mask, self.pos, self.next_token = list(joiners), layers, mask, pos, next_token
            return
        s_old, s_new = self.mask.shape[1], mask.shape[1]
        s = max(s_old, s_new)

        def left_pad(x, width, dim):  # zeros on the left of dimension `dim` up to `width`
            if x.shape[dim] == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - x.shape[dim]
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        # everything is built before anything is assigned: a failure here (out of memory) leaves the batch whole
        merged = [(torch.cat([left_pad(k0, s, 2), left_pad(k1, s, 2)]), torch.cat([left_pad(v0, s, 2), left_pad(v1, s, 2)]))
                  for (k0, v0), (k1, v1) in zip(self.layers, layers)]
        merged_mask = torch.cat([left_pad(self.mask, s, 1), left_pad(mask, s, 1)])
        merged_pos, merged_next = torch.cat([self.pos, pos]), torch.cat([self.next_token, next_token])
        self.layers, self.mask, self.pos, self.next_token = merged, merged_mask, merged_pos, merged_next
        self.rows = self.rows + list(joiners)

    def _compact(self) -> None:
        """Drop finished rows, then the columns that are padding in every remaining row."""
        keep = [i for i, live in enumerate(self.rows) if not live.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.layers, self.mask = [], [], None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).nonzero()[0])
        self.rows = [self.rows[i] for i in keep]
        self.mask = mask[:, start:]
        self.layers = [(k[idx, :, start:], v[idx, :, start:]) for k, v in self.layers]
        self.pos, self.next_token = self.pos[idx], self.next_token[idx]

    def cancel(self, live: _Live) -> None:
        pass  # the row is dropped at the next compaction (the engine thread finishes the request)

    def _step(self, step, lives: list[_Live], reset: bool) -> None:
        """Run one decode or prefill step; if it fails, only its own requests fail. A failed decode leaves the batch
        state unusable (reset); a failed prefill never touched it (_merge assigns only once everything is built),
        so the running rows go on."""
        try:
            step()
            self._compact()
        except Exception as exc:  # noqa: BLE001 - one failed step fails its requests, not the engine
            logger.exception("padded route: a %s step failed", "decode" if reset else "prefill")
            for live in lives:
                if not live.done:
                    self.e._finish(live, f"error: {type(exc).__name__}: {one_line(exc)}")
            if reset:
                self.rows, self.layers, self.mask = [], [], None

    def ready(self) -> bool:
        return True

    def run(self) -> None:
        e = self.e
        while True:
            while True:  # control events first: cancellations leave before the next step
                try:
                    e._handle_event(e._events.get_nowait())
                except queue.Empty:
                    break
            self._compact()
            joiners = e._take(e.max_batch_size - len(self.rows), self.max_prefill_tokens)
            if self.rows:
                self._step(self._decode, self.rows, reset=True)
            if joiners:
                self._step(lambda: self._prefill(joiners), joiners, reset=False)
            if not self.rows and not joiners:
                if e._stopping and e._idle():
                    return
                try:
                    e._handle_event(e._events.get(timeout=0.2))
                except queue.Empty:
                    pass


# ------------------------------------------------------------------------------------------------------ the engine

class Engine:
    """Many task prefixes over one frozen model; requests of any task decode together. Thread-safe submission;
    callbacks run on the engine thread. See the module docstring for the two routes."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 256, route: str = "auto",
                 page_size: int = 256, cache_tokens: int | None = None, max_batch_tokens: int | None = None):
        if route not in ROUTES:
            raise ValueError(f"expected route in {ROUTES}, got {route!r}")
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"expected max_batch_size >= 1 and max_queue >= 1, got {max_batch_size}, {max_queue}")
        check_base_supported(model.config)
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.num_layers, self.num_kv_heads, self.head_dim = base_dims(model.config)
        head = model.get_output_embeddings()
        text_config = model.config.get_text_config()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(text_config.vocab_size)
        # max_context: the model's positions (max_position_embeddings / n_positions), for the API to refuse
        # prefix + prompt + max_tokens past it. The engine itself refuses only what cannot run: past a learned
        # absolute position table (GPT-2) or past the paged cache.
        self.max_context, self.hard_limit, self.positions_field = max_context(model)  # the route's cache may cap it

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._tasks: dict[str, _Task] = {}
        self._inflight: Counter = Counter()  # task name -> requests waiting or running (all versions)
        self._waiting: deque[_Live] = deque()
        self._running: dict[int, _Live] = {}
        self._by_id: dict[int, _Live] = {}
        self._by_rid: dict[str, _Live] = {}
        self._ids = itertools.count(1)
        self._events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._started = self._stopping = self._stopped = False
        self._fatal: str | None = None
        self.steps = 0
        self.finished: Counter = Counter()  # finish reason (error collapsed) -> count
        self.route_note = ""
        self._route = self._make_route(route, page_size, cache_tokens, max_batch_tokens)
        self.max_context = max_context(model, self._route.capacity)[0]

    # ---------------------------------------------------------------------------------------------- construction

    def _make_route(self, route, page_size, cache_tokens, max_batch_tokens):
        if route == "padded":
            return _PaddedRoute(self, max_batch_tokens or 4096)
        why = self._paged_blocker(route)
        if why and route == "paged":
            raise ValueError(f"the paged route cannot serve this model: {why}")
        if not why:
            try:
                return _PagedRoute(self, page_size, cache_tokens, max_batch_tokens)
            except Exception as exc:  # noqa: BLE001 - any failure to build it means: use the plain route
                if route == "paged":
                    raise
                why = f"continuous batching could not start ({type(exc).__name__}: {one_line(exc)})"
        self.route_note = why
        logger.info("serving engine: padded route, because %s", why)
        return _PaddedRoute(self, max_batch_tokens or 4096)

    def _paged_blocker(self, route: str) -> str | None:
        low, high = PAGED_TESTED
        version = _transformers_version()
        if not low <= version < high:
            import transformers

            return (f"it was verified on transformers {low[0]}.{low[1]}.x only, this is {transformers.__version__}")
        impl = self.model.config._attn_implementation or "eager"
        if not (impl in ("sdpa", "eager", "paged|eager") or "flash" in impl):
            return f"continuous batching does not support attention {impl!r}"
        if hasattr(self.model, "hf_device_map") and self.device.type != "cpu":  # accelerate-offloaded (--device_map)
            return ("the weights are offloaded (--device_map), and continuous batching would take the free GPU memory "
                    "the offloaded layers are copied into at every step for its cache")
        if impl == "eager" and route == "auto":
            return ("the model uses eager attention, which continuous batching replaces by paged|eager, unusable by "
                    "any other caller of the model while the engine runs (load it with sdpa, or pass route='paged')")
        return None

    @property
    def route(self) -> str:
        return self._route.name

    @property
    def errored(self) -> str | None:
        return self._fatal

    # --------------------------------------------------------------------------------------------------- tasks

    def add_task(self, name: str, table: torch.Tensor, shape: PrefixShape, replace: bool = False) -> None:
        """Load a task's prefix table [P, L*2*H_kv*D]; takes effect for requests submitted after it returns."""
        table = check_task(name, table, shape, (self.num_layers, self.num_kv_heads, self.head_dim))
        kv = self._route.prepare_kv(split_table(table, shape))  # (L, 2, H, P, D) -> the route's layout
        with self._lock:
            old = self._tasks.get(name)
            if old is not None and old.removing:
                raise ValueError(f"task {name!r} is being removed; add it again once remove_task has returned")
            if old is not None and not replace:
                raise ValueError(f"task {name!r} is already loaded; pass replace=True to replace it")
            self._tasks[name] = _Task(name, table, shape, kv)

    def remove_task(self, name: str, timeout: float | None = None) -> bool:
        """Refuse new requests for `name` at once; return True when its in-flight requests have finished, False if
        `timeout` seconds passed first (the task stays refused and goes when its last request ends)."""
        with self._cond:
            task = self._tasks.get(name)
            if task is None or task.removing:
                raise UnknownTask(f"task {name!r} is not loaded")
            task.removing = True
            self._drop_if_unused(name)
            return self._cond.wait_for(lambda: self._tasks.get(name) is not task, timeout)

    def _drop_if_unused(self, name: str) -> None:  # under the lock
        task = self._tasks.get(name)
        if task is not None and task.removing and self._inflight[name] == 0:
            del self._tasks[name]
            self._cond.notify_all()

    def tasks(self) -> dict[str, PrefixShape]:
        with self._lock:
            return {n: t.shape for n, t in self._tasks.items() if not t.removing}

    # ------------------------------------------------------------------------------------------------ requests

    def length_problem(self, prompt_tokens: int, prefix_len: int, max_new_tokens: int) -> str | None:
        """Why a request cannot run: past an absolute position table or the paged cache; None if it can."""
        for limit, what in ((self.hard_limit, f"the model's {self.positions_field or 'position table'}"),
                            (self._route.capacity, "the paged cache (Engine(cache_tokens=...))")):
            problem = budget_problem(prefix_len, prompt_tokens, max_new_tokens, limit, what)
            if problem:
                return problem
        return None

    def submit(self, req: GenRequest, on_token: Callable[[int | None, str | None], None]) -> int:
        """Queue a request; returns its id. Raises QueueFull, UnknownTask, or ValueError for a malformed request.
        on_token(token_id, None) per generated token (on_token(token_id, None, TokenLogprob) when req.logprobs is
        set), then on_token(None, reason) once: "stop", "length", "cancelled" or "error: ...". Called from the engine
        thread."""
        check_request(req, self.vocab_size)
        with self._lock:
            if self._stopping or self._stopped:
                raise EngineStopped("the engine is shutting down")
            if self._fatal is not None:
                raise EngineStopped(f"the engine has stopped: {self._fatal}")
            task = None
            if req.task is not None:
                task = self._tasks.get(req.task)
                if task is None or task.removing:
                    raise UnknownTask(f"task {req.task!r} is not loaded; loaded: {', '.join(self.tasks()) or 'none'}")
            problem = self.length_problem(len(req.prompt_ids), task.shape.prefix_len if task else 0,
                                          req.max_new_tokens)
            if problem:
                raise ValueError(problem)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue {self.max_queue})")
            live = _Live(next(self._ids), req, task, on_token, RequestSampler(req, self.device))
            self._waiting.append(live)
            self._by_id[live.id] = live
            self._by_rid[live.rid] = live
            self._inflight[live.task_name] += 1
        self._events.put(("wake",))
        return live.id

    def cancel(self, request_id: int) -> None:
        """End a request: on_token(None, "cancelled") follows from the engine thread (no-op if already over)."""
        with self._lock:
            live = self._by_id.get(request_id)
            if live is None or live.done:
                return
            if live in self._waiting:  # never admitted from now on
                self._waiting.remove(live)
                self._cond.notify_all()
        self._events.put(("cancel", live))

    # ----------------------------------------------------------------------------------------- engine thread

    def _handle_event(self, item) -> None:
        kind = item[0]
        if kind == "cancel":
            live = item[1]
            if not live.done:
                with self._lock:
                    was_running = live.id in self._running
                if was_running:
                    self._route.cancel(live)
                self._finish(live, FINISH_CANCELLED)

    def _take(self, n: int, max_tokens: int | None = None) -> list[_Live]:
        """Move up to n waiting requests to running. With max_tokens, stop before the padded batch of the taken
        requests ((max P + max prompt) x count) passes it; the first request is always taken."""
        out = []
        longest_prefix = longest_prompt = 0
        with self._lock:
            while self._waiting and len(out) < n:
                head = self._waiting[0]
                if max_tokens is not None and out:
                    p = max(longest_prefix, head.prefix_len)
                    t = max(longest_prompt, len(head.req.prompt_ids))
                    if (p + t) * (len(out) + 1) > max_tokens:
                        break
                live = self._waiting.popleft()
                longest_prefix = max(longest_prefix, live.prefix_len)
                longest_prompt = max(longest_prompt, len(live.req.prompt_ids))
                self._running[live.id] = live
                out.append(live)
            if out:
                self._cond.notify_all()
        return out

    def _admit(self) -> None:
        """Paged route: hand waiting requests to continuous batching while fewer than max_batch_size run."""
        for live in self._take(self.max_batch_size - len(self._running)):
            if not self._route.admit(live):
                self._finish(live, "error: continuous batching refused the request (stopping)")

    def _accept(self, live: _Live, token: int) -> bool:
        """A generated token: emit it or end the request. True if the request is over."""
        stop = token in live.stop
        if stop and not live.req.emit_stop_token:
            self._finish(live, FINISH_STOP)
            return True
        live.n_out += 1
        logprob = live.sampler.take(token)
        try:
            if logprob is None:
                live.on_token(token, None)
            else:
                live.on_token(token, None, logprob)
        except Exception:  # noqa: BLE001 - a broken consumer ends its request, not the engine
            logger.exception("on_token raised: request %d cancelled", live.id)
            self._route.cancel(live)
            self._finish(live, FINISH_CANCELLED, call=False)
            return True
        if stop:
            self._finish(live, FINISH_STOP)
            return True
        if live.n_out >= live.req.max_new_tokens:
            self._finish(live, FINISH_LENGTH)
            return True
        return False

    def _finish(self, live: _Live, reason: str, call: bool = True) -> None:
        with self._cond:
            if live.done:
                return
            live.done = True
            self._running.pop(live.id, None)
            if live in self._waiting:
                self._waiting.remove(live)
            self._by_id.pop(live.id, None)
            self._by_rid.pop(live.rid, None)
            self._inflight[live.task_name] -= 1
            if self._inflight[live.task_name] <= 0:
                del self._inflight[live.task_name]
            self._drop_if_unused(live.task_name)
            self.finished["error" if reason.startswith("error") else reason] += 1
            self._cond.notify_all()
        if call:
            try:
                live.on_token(None, reason)
            except Exception:  # noqa: BLE001
                logger.exception("on_token raised on the end of request %d", live.id)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._fatal = self._fatal or reason
            lives = list(self._by_id.values())
        for live in lives:
            self._finish(live, reason)

    def _idle(self) -> bool:
        with self._lock:
            return not self._by_id  # every request submitted has ended

    def _run(self) -> None:
        try:
            self._route.run()
        except BaseException as exc:  # noqa: BLE001
            logger.exception("serving engine thread crashed")
            self._fail_all(f"error: engine thread crashed ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the engine thread (and continuous batching's own thread on the paged route)."""
        with self._lock:
            if self._started:
                return
            if self._stopped:
                raise RuntimeError("the engine has been shut down; build a new one")
            self._started = True
        self._route.start()
        self._thread = threading.Thread(target=self._run, name="prefixtune-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish the queued and running ones (up to `timeout` seconds, then
        cancel what is left), else cancel them now. Returns when the engine thread has ended. A never-started engine
        cancels its queued requests (on the calling thread)."""
        with self._lock:
            if self._stopped:
                return
            self._stopping = True
            started = self._thread is not None
        if not drain or not started:
            self._cancel_all()
        if not started:
            while True:
                try:
                    self._handle_event(self._events.get_nowait())
                except queue.Empty:
                    break
        else:
            self._events.put(("wake",))
            self._thread.join(timeout)
            if self._thread.is_alive():  # drain timed out: cancel the rest, which ends at the next step
                self._cancel_all()
                self._thread.join()
        self._route.stop(hard=not drain)
        with self._lock:
            self._stopped = True

    def _cancel_all(self) -> None:
        with self._lock:
            lives = list(self._by_id.values())
            self._waiting.clear()
        for live in lives:
            self._events.put(("cancel", live))

    def stats(self) -> dict:
        with self._lock:
            running = Counter(live.task_name for live in self._running.values())
            waiting = Counter(live.task_name for live in self._waiting)
            return {"running": dict(running), "waiting": dict(waiting), "queue_size": len(self._waiting),
                    "route": self.route,
                    "route_note": self.route_note, "tasks": sorted(n for n, t in self._tasks.items() if not t.removing),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    "max_context": self.max_context, "finished": dict(self.finished),
                    "attn_implementation": self._route.attn_implementation,
                    "steps": self.steps if self.route == "padded" else getattr(self._route.mgr, "current_batch", 0)}

    def generate_many(self, reqs: list[GenRequest]) -> list[list[int]]:
        """Submit all (waiting for room in the queue), wait, return the generated ids per request (stop tokens not
        included). Starts the engine if needed. Raises RuntimeError if a request ends in an error."""
        outs: list[list[int]] = [[] for _ in reqs]
        reasons: list[str | None] = [None] * len(reqs)
        done = threading.Condition()

        def collector(i):
            def on_token(token, reason):
                if token is not None:
                    outs[i].append(token)
                else:
                    with done:
                        reasons[i] = reason
                        done.notify_all()
            return on_token

        self.start()
        for i, req in enumerate(reqs):
            while True:
                try:
                    self.submit(req, collector(i))
                    break
                except QueueFull:
                    with self._cond:
                        self._cond.wait_for(lambda: len(self._waiting) < self.max_queue or self._fatal, 1.0)
        with done:
            done.wait_for(lambda: all(r is not None for r in reasons))
        errors = [(i, r) for i, r in enumerate(reasons) if r.startswith("error")]
        if errors:
            raise RuntimeError(f"request {errors[0][0]}: {errors[0][1]}")
        return outs
