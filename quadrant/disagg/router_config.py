"""What `quadrant router` is asked for: worker URLs, address, timeouts, retries, balance (and its flags).

Plain data, checked at construction, with no server imports, so the CLI can build its parser fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from quadrant import envs
from quadrant.disagg.routing import normalize_url


@dataclass
class RouterConfig:
    prefill_urls: list[str] = field(default_factory=list)  # base URLs; more can be registered via /workers
    decode_urls: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    health_interval: float = 2.0  # seconds between health checks (/health, /metrics) of every worker
    request_timeout: float = 600.0  # seconds a worker may stay silent in a step (a whole non-streamed decode)
    max_retries: int = 2  # further workers a failed step is tried on
    api_key: str | None = None  # required from clients, and sent to the workers (launch them with the same)
    balance_threshold: int = 4  # the prefix holder may carry this many more requests than the least loaded
    prefix_cache_blocks: int = 65536  # 64-character prompt blocks remembered (about 4 MiB of text)
    max_body_bytes: int = 4 * 2**20
    ttft_slo: float = 2.0  # seconds: streams within both SLOs count towards goodput in /metrics
    tpot_slo: float = 0.1  # seconds per output token
    # Send the prompt to the prefill and the decode worker at once; the decode worker pulls the KV layer by
    # layer while the prefill worker computes it (else: the decode step starts when the prefill step ends).
    overlap_kv: bool = True

    def __post_init__(self) -> None:
        self.prefill_urls = [normalize_url(u) for u in self.prefill_urls]
        self.decode_urls = [normalize_url(u) for u in self.decode_urls]
        for role, urls in (("prefill", self.prefill_urls), ("decode", self.decode_urls)):
            if len(set(urls)) != len(urls):
                raise ValueError(f"a {role} worker URL is given twice")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.health_interval <= 0 or self.request_timeout <= 0:
            raise ValueError("health_interval and request_timeout must be positive (seconds)")
        if self.ttft_slo <= 0 or self.tpot_slo <= 0:
            raise ValueError("ttft_slo and tpot_slo must be positive (seconds)")
        if self.max_retries < 0 or self.balance_threshold < 0:
            raise ValueError("max_retries and balance_threshold must be >= 0")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", action="append", default=[], metavar="URL",
                        help="a prefill worker's base URL, e.g. http://127.0.0.1:8001 (repeatable)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL",
                        help="a decode worker's base URL (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' and send it to the workers (or set QUADRANT_API_KEY)")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between worker health checks")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a worker may stay silent during a request before it counts as failed")
    parser.add_argument("--max-retries", type=int, default=2, help="other workers a failed step is tried on")
    parser.add_argument("--ttft-slo", type=float, default=2.0,
                        help="seconds; streams within this TTFT and --tpot-slo count as goodput in /metrics")
    parser.add_argument("--tpot-slo", type=float, default=0.1, help="seconds per output token (see --ttft-slo)")
    parser.add_argument("--balance-threshold", type=int, default=4,
                        help="requests by which the worker holding a prompt's prefix may exceed the least loaded")
    parser.add_argument("--no-kv-overlap", dest="overlap_kv", action="store_false",
                        help="start a request's decode step only when its prefill step has ended (default: both "
                             "at once, the KV pulled layer by layer while the prompt is computed)")


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(prefill_urls=args.prefill, decode_urls=args.decode, host=args.host, port=args.port,
                        health_interval=args.health_interval, request_timeout=args.request_timeout,
                        max_retries=args.max_retries, api_key=args.api_key or envs.api_key(),
                        balance_threshold=args.balance_threshold, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo,
                        overlap_kv=args.overlap_kv)
