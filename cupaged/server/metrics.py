"""Prometheus metrics of a server, under vLLM's names with the `cupaged:` prefix (so a dashboard or
router built for vLLM needs only the prefix changed), every series labelled model_name.

Read from the engine at scrape time: num_requests_running / num_requests_waiting (sequences, as the
scheduler holds them), kv_cache_usage_perc (0-1, the pool's used fraction), prefix_cache_queries /
prefix_cache_hits (tokens), num_preemptions, client_disconnects (requests aborted because their
client went away). Fed by AsyncLLM as requests run (`RequestObserver`): prompt_tokens /
generation_tokens, request_success{finished_reason} (one per finished choice), and histograms of
time to first token, inter-token latency, end-to-end latency and queue time, in seconds.

`log_status` is the line `cupaged serve` logs every few seconds while busy, as vLLM does.
"""
from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cupaged.async_llm import AsyncLLM
from cupaged.outputs import RequestOutput

logger = logging.getLogger(__name__)

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """The server's registry. A RequestObserver for AsyncLLM (attach) and a collector of engine state."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.llm: AsyncLLM | None = None
        self.registry = CollectorRegistry()
        label = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(f"cupaged:{name}", doc, label + list(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(f"cupaged:{name}", doc, label, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of the requests served")
        self.generation_tokens = counter("generation_tokens", "tokens generated")
        self.request_success = counter("request_success", "finished choices by finish reason", ["finished_reason"])
        self.ttft = histogram("time_to_first_token_seconds", "request sent to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "between a request's outputs", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "request sent to last output", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "queued to first step", REQUEST_BUCKETS)
        self.tokens_generated = 0  # the same count as generation_tokens, for log_status's rate
        self.registry.register(self)

    def attach(self, llm: AsyncLLM) -> None:
        self.llm = llm
        llm.observer = self

    # --- RequestObserver --------------------------------------------------------------------------
    def on_tokens(self, new_tokens: int, seconds: float, first: bool) -> None:
        self.generation_tokens.labels(self.model_name).inc(new_tokens)
        self.tokens_generated += new_tokens
        (self.ttft if first else self.itl).labels(self.model_name).observe(seconds)

    def on_finished(self, out: RequestOutput, seconds: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(len(out.prompt_token_ids))
        self.e2e.labels(self.model_name).observe(seconds)
        for o in out.outputs:
            self.request_success.labels(self.model_name, o.finish_reason or "abort").inc()

    def on_scheduled(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(seconds)

    # --- collector: engine state at scrape time ---------------------------------------------------
    def describe(self):
        return []  # the families below are read at scrape time; nothing to check at registration

    def collect(self):
        if self.llm is None:  # still loading
            return
        engine, stats = self.llm.engine, self.llm.stats
        bm, prefix = engine.block_manager, engine.prefix_cache_stats()
        gauges = {
            "num_requests_running": ("sequences running in the engine", len(engine.scheduler.running)),
            "num_requests_waiting": ("sequences waiting to be scheduled", len(engine.scheduler.waiting)),
            "kv_cache_usage_perc": ("used fraction of the KV cache pool (0-1)", 1 - bm.num_free_blocks / bm.num_blocks),
        }
        counters = {
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", prefix.queries),
            "prefix_cache_hits": ("prompt tokens found in the prefix cache", prefix.hits),
            "num_preemptions": ("sequences preempted", engine.scheduler.num_preemptions),
            "client_disconnects": ("requests aborted because their client went away", stats.aborted_by_caller),
            "requests_aborted_at_shutdown": ("requests aborted at shutdown", stats.aborted_at_shutdown),
            "engine_steps": ("engine steps", stats.steps),
        }
        for families, kind in ((gauges, GaugeMetricFamily), (counters, CounterMetricFamily)):
            for name, (doc, value) in families.items():
                family = kind(f"cupaged:{name}", doc, labels=["model_name"])
                family.add_metric([self.model_name], value)
                yield family

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def log_status(metrics: Metrics, every_s: float = 5.0) -> None:
    """Log running/waiting requests, tokens/s, KV usage and prefix hit rate every every_s while busy."""
    last_t, last_tokens = time.monotonic(), metrics.tokens_generated
    while True:
        await asyncio.sleep(every_s)
        now, tokens = time.monotonic(), metrics.tokens_generated
        llm = metrics.llm
        if llm is None:
            continue
        sched, bm = llm.engine.scheduler, llm.engine.block_manager
        if sched.running or sched.waiting or tokens != last_tokens:
            logger.info("running %d, waiting %d, generation %.1f tok/s, KV cache %.1f%% used, prefix cache hit "
                        "rate %.1f%%", len(sched.running), len(sched.waiting), (tokens - last_tokens) / (now - last_t),
                        100 * (1 - bm.num_free_blocks / bm.num_blocks), 100 * llm.engine.prefix_cache_stats().hit_rate)
        last_t, last_tokens = now, tokens
