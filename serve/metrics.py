"""Prometheus metrics of one app (its own registry, so several apps in one process do not collide).

    prefixtune_num_requests_running{task}, prefixtune_num_requests_waiting{task}   gauges read from engine.stats()
    prefixtune_engine_<key>                                                          other numbers engine.stats() gives
    prefixtune_time_to_first_token_seconds{task}       histogram, from arrival to the first generated token
    prefixtune_time_per_output_token_seconds{task}     histogram, between two generated tokens
    prefixtune_e2e_request_latency_seconds{task}       histogram, from arrival to the last token
    prefixtune_prompt_tokens_total{task}, prefixtune_generation_tokens_total{task}    counters
    prefixtune_requests_total{task, status}            status: stop | length | abort | error | cancelled (client
                                                       gone) for served requests, the HTTP code for refused ones

`task` is the task name, "base" for the bare base model, "" when the request named no known model.

Beside them, vLLM's names with vLLM's meaning (what the Kubernetes inference gateway and vLLM's dashboards read):

    vllm:num_requests_running{model_name}, vllm:num_requests_waiting{model_name}    all tasks together
    vllm:kv_cache_usage_perc{model_name}     fraction (0-1) of the engine's KV positions in use: engine.stats()'s
                                             kv_cache_usage_perc when the engine reports one, else the server's
                                             estimate (positions of the requests generating: prefix + prompt + tokens
                                             so far, over max_batch_size x max_context positions)
    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}   value: the time of the scrape;
                                             the labels: --max_loras and the tasks with requests running / waiting,
                                             comma-separated
    vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds (= vllm:inter_token_latency_seconds),
    vllm:e2e_request_latency_seconds         histograms {model_name}, fed with the prefixtune_* ones
    vllm:prompt_tokens_total, vllm:generation_tokens_total   counters {model_name}

`model_name` is the base model's id (--served_model_name): every task runs on it, as vLLM labels LoRA requests.
"""
from __future__ import annotations

import logging
import re
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..prefix.tasks import BASE_TASK

log = logging.getLogger("prefixtune.serve")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _Both:
    """One observation for a prefixtune_* child and its vLLM twins."""

    def __init__(self, *children):
        self.children = children

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)

    def inc(self, amount: float = 1) -> None:
        for child in self.children:
            child.inc(amount)


class _Tee:
    """A prefixtune_* metric labelled by task whose `.labels(task)` also feeds vLLM's twins labelled by model_name."""

    def __init__(self, ours, model_name: str, *vllm):
        self.ours, self.vllm = ours, [m.labels(model_name) for m in vllm]

    def labels(self, *values) -> _Both:
        return _Both(self.ours.labels(*values), *self.vllm)

    def __getattr__(self, name):  # anything else (collect, ...) is the prefixtune_* metric's
        return getattr(self.ours, name)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class EngineCollector:
    """Gauges computed from engine.stats() at scrape time, so they are never stale."""

    def __init__(self, engine, model_name: str = "", max_loras: int | None = None, kv_usage=None):
        self.engine, self.model_name, self.max_loras, self.kv_usage = engine, model_name, max_loras, kv_usage

    def describe(self):
        return []

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - a failing stats() must not break /metrics
            log.exception("engine.stats() failed")
            return
        for key in ("running", "waiting"):
            g = GaugeMetricFamily(f"prefixtune_num_requests_{key}", f"requests {key} in the engine, per task",
                                  labels=["task"])
            for task, n in (stats.get(key) or {}).items():
                g.add_metric([str(task)], float(n))
            yield g
        yield from self.vllm_gauges(stats)
        for key, value in stats.items():
            if key in ("running", "waiting"):
                continue
            name = "prefixtune_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(name, f"engine.stats()[{key!r}]", value=float(value))
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                g = GaugeMetricFamily(name, f"engine.stats()[{key!r}]", labels=["key"])
                for k, v in value.items():
                    g.add_metric([str(k)], float(v))
                yield g


    def vllm_gauges(self, stats: dict):
        """vLLM's gauges: requests running and waiting, KV cache use, and the LoRA info gauge."""
        running, waiting = stats.get("running") or {}, stats.get("waiting") or {}
        for key, counts in (("running", running), ("waiting", waiting)):
            yield _gauge(f"vllm:num_requests_{key}", f"Number of requests {key} in the engine (every task)",
                         self.model_name, float(sum(counts.values())))
        usage = stats.get("kv_cache_usage_perc")
        if not _number(usage) and self.kv_usage is not None:
            usage = self.kv_usage()
        if _number(usage):
            yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", self.model_name,
                         min(max(float(usage), 0.0), 1.0))
        g = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                              labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        g.add_metric(["" if self.max_loras is None else str(self.max_loras),
                      ",".join(sorted(str(t) for t, n in running.items() if n and t != BASE_TASK)),
                      ",".join(sorted(str(t) for t, n in waiting.items() if n and t != BASE_TASK))], time.time())
        yield g


def _gauge(name: str, doc: str, model_name: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["model_name"])
    g.add_metric([model_name], value)
    return g


class Metrics:
    def __init__(self, engine, model_name: str = "", max_loras: int | None = None, kv_usage=None):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("prefixtune_time_to_first_token_seconds", "time from arrival to the first token",
                              ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("prefixtune_time_per_output_token_seconds", "time between two generated tokens",
                              ["task"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("prefixtune_e2e_request_latency_seconds", "time from arrival to the last token",
                             ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("prefixtune_prompt_tokens", "prompt tokens of accepted requests", ["task"],
                                     registry=r)
        self.generation_tokens = Counter("prefixtune_generation_tokens", "generated tokens", ["task"], registry=r)
        self.requests = Counter("prefixtune_requests", "finished requests by status", ["task", "status"],
                                registry=r)
        # vLLM's names, fed through the prefixtune_* ones: .labels(task) feeds both
        def twin(kind, name, doc, **kw):
            return kind(name, doc, ["model_name"], registry=r, **kw)

        self.ttft = _Tee(self.ttft, model_name, twin(Histogram, "vllm:time_to_first_token_seconds",
                                                     "Histogram of time to first token in seconds.",
                                                     buckets=LATENCY_BUCKETS))
        self.tpot = _Tee(self.tpot, model_name,
                         twin(Histogram, "vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", buckets=TOKEN_BUCKETS),
                         twin(Histogram, "vllm:inter_token_latency_seconds",
                              "Histogram of inter-token latency in seconds.", buckets=TOKEN_BUCKETS))
        self.e2e = _Tee(self.e2e, model_name, twin(Histogram, "vllm:e2e_request_latency_seconds",
                                                   "Histogram of e2e request latency in seconds.",
                                                   buckets=LATENCY_BUCKETS))
        self.prompt_tokens = _Tee(self.prompt_tokens, model_name,
                                  twin(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed."))
        self.generation_tokens = _Tee(self.generation_tokens, model_name,
                                      twin(Counter, "vllm:generation_tokens", "Number of generation tokens processed."))
        r.register(EngineCollector(engine, model_name, max_loras, kv_usage))
