"""Prometheus metrics of the server: one registry per app, engine gauges read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from quadrant.disagg.connector import TransferStats
    from quadrant.engine.request import RequestOutput
    from quadrant.engine.spec.proposer import SpecStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quadrant_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quadrant_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("quadrant_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("quadrant_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("quadrant_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("quadrant_kv_cache_usage_ratio", "Share of KV blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("quadrant_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.ttft = Histogram("quadrant_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("quadrant_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=_TPOT_BUCKETS)
        self.expert_tokens = Gauge("quadrant_moe_expert_tokens",
                                   "Tokens routed to each expert of each MoE layer since the engine started",
                                   ["layer", "expert"], registry=r)
        # Disaggregation (read from the KV connector at scrape time; totals since start).
        self.kv_transfer = Gauge("quadrant_kv_transfer", "KV transfer totals since start: bytes pulled (decode) or "
                                 "served (prefill), pulls, failed pulls, lease expiries, leases released, "
                                 "leases open now (held, or waiting for their prompt), layer ranges read while their prompt was still "
                                 "computed",
                                 ["what"], registry=r)
        self.kv_transfer_gbps = Gauge("quadrant_kv_transfer_gigabytes_per_second",
                                      "Mean rate of finished KV pulls (decode side)", registry=r)
        self.steps = Gauge("quadrant_engine_steps", "Engine steps since start: total, and overlapped (launched while "
                           "the step before still ran: --async-scheduling)", ["what"], registry=r)
        # Speculative decoding (engine/spec/; totals since start, read at scrape time).
        self.spec_tokens = Gauge("quadrant_spec_decode_tokens", "Speculative decoding totals since start: "
                                 "verifications, draft tokens, accepted tokens, back-offs, large-batch steps",
                                 ["what"], registry=r)
        self.spec_acceptance_rate = Gauge("quadrant_spec_decode_acceptance_rate",
                                          "Accepted draft tokens per drafted token", registry=r)
        self.spec_acceptance_length = Gauge("quadrant_spec_decode_acceptance_length",
                                            "Tokens a verifying request gains per step (accepted drafts + 1)",
                                            registry=r)
        self.e2e = Histogram("quadrant_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             registry=r, buckets=_LATENCY_BUCKETS)

    def observe_finished(self, prompt_tokens: int, output_tokens: int, arrival: float, first: float, end: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.ttft.observe(first - arrival)
        self.e2e.observe(end - arrival)
        if output_tokens > 1:
            self.tpot.observe((end - first) / (output_tokens - 1))

    def observe_output(self, out: RequestOutput) -> None:
        """Record a request's output once it has finished (earlier outputs carry no end time)."""
        m = out.metrics
        if "finished" in m:
            self.observe_finished(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                                  m["arrival"], m["first_token"], m["finished"])

    def set_engine_state(self, running: int, waiting: int, kv_usage: float, hit_rate: float, steps: int,
                         overlapped_steps: int) -> None:
        self.steps.labels(what="total").set(steps)
        self.steps.labels(what="overlapped").set(overlapped_steps)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.prefix_hit_rate.set(hit_rate)

    def set_expert_load(self, load: dict[str, list[int]]) -> None:
        for layer, counts in load.items():
            for expert, n in enumerate(counts):
                self.expert_tokens.labels(layer=layer, expert=str(expert)).set(n)

    def set_kv_transfer(self, stats: TransferStats) -> None:
        for what in ("bytes", "transfers", "failures", "lease_expiries", "leases_released", "active_leases",
                     "early_reads"):
            self.kv_transfer.labels(what=what).set(getattr(stats, what))
        self.kv_transfer_gbps.set(stats.gbps)

    def set_speculation(self, stats: SpecStats) -> None:
        for what in ("verifications", "tree_verifications", "draft_tokens", "accepted_tokens", "backoffs",
                     "large_batch_steps"):
            self.spec_tokens.labels(what=what).set(getattr(stats, f"num_{what}"))
        self.spec_acceptance_rate.set(stats.acceptance_rate)
        self.spec_acceptance_length.set(stats.acceptance_length)

    def render(self) -> bytes:
        return generate_latest(self.registry)
