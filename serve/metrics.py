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
"""
from __future__ import annotations

import logging
import re

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("prefixtune.serve")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class EngineCollector:
    """Gauges computed from engine.stats() at scrape time, so they are never stale."""

    def __init__(self, engine):
        self.engine = engine

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


class Metrics:
    def __init__(self, engine):
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
        r.register(EngineCollector(engine))
