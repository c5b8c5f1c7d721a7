"""Prometheus metrics of a server, read from the engine and AsyncLLM at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cupaged.async_llm import AsyncLLM


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, llm: AsyncLLM | None):
        self.llm = llm
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.http_requests = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def requests_started(self, count: int) -> None:
        self.http_requests += count

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens += prompt
        self.generation_tokens += generated

    def collect(self):
        if self.llm is None:  # still loading
            return
        engine, stats = self.llm.engine, self.llm.stats
        bm = engine.block_manager
        gauges = {
            "cupaged_requests_running": ("sequences running in the engine", len(engine.scheduler.running)),
            "cupaged_requests_waiting": ("sequences waiting to be scheduled", len(engine.scheduler.waiting)),
            "cupaged_kv_blocks_free": ("free KV cache blocks", bm.num_free_blocks),
            "cupaged_kv_blocks_total": ("KV cache blocks in the pool", bm.num_blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "cupaged_requests_added": ("engine requests added", stats.added),
            "cupaged_requests_aborted_by_client": ("requests aborted because their client went away",
                                                   stats.aborted_by_caller),
            "cupaged_requests_aborted_at_shutdown": ("requests aborted at shutdown", stats.aborted_at_shutdown),
            "cupaged_engine_steps": ("engine steps", stats.steps),
            "cupaged_prompt_tokens": ("prompt tokens of finished HTTP requests", self.prompt_tokens),
            "cupaged_generation_tokens": ("tokens generated for finished HTTP requests", self.generation_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
