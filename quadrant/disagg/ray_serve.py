"""Elastic prefill and decode pools on Ray Serve, each autoscaled on its own signals.

Three Serve applications share Ray's HTTP proxy (a Serve application has one route prefix): the
prefill pool at /prefill and the decode pool at /decode, whose replicas are quadrant's own OpenAI app
in that role, and the router at /, whose two workers are the pools behind the proxy. Ray picks the
replica of a pool for each step; the KV then moves replica to replica over the KV transport. Each
pool scales with a custom Serve autoscaling policy (PoolPolicy): replicas report their signals from
record_autoscaling_stats, autoscale.desired_replicas turns them into a count, and Serve applies the
pool's upscale/downscale delays and bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client import Histogram
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from quadrant import envs
from quadrant.config import KVTransferConfig
from quadrant.disagg.autoscale import PoolTargets, Role, desired_replicas, pool_signals
from quadrant.disagg.router import RouterConfig, build_router_app
from quadrant.serve.app import build_app
from quadrant.serve.config import ServerConfig

__all__ = ["APP_NAMES", "PoolConfig", "PoolPolicy", "RayDisaggConfig", "build_ray_app", "deploy", "main",
           "running_replicas"]

ROLES: tuple[Role, Role] = ("prefill", "decode")
APP_NAMES = {"prefill": "quadrant-prefill", "decode": "quadrant-decode", "router": "quadrant-router"}
ROUTE_PREFIXES = {"prefill": "/prefill", "decode": "/decode", "router": "/"}


@dataclass
class PoolConfig:
    """One pool's size, scaling targets and Ray resources."""

    targets: PoolTargets  # min/max replicas and the signals' targets (autoscale.py)
    num_cpus: float = 1.0  # Ray CPUs per replica
    num_gpus: float = 0.0  # Ray GPUs per replica (1 for an engine on cuda)
    max_ongoing_requests: int = 256  # requests Ray lets into one replica at once; its engine queues them
    upscale_delay_s: float = 10.0  # a scale-up must be wanted this long before Ray starts a replica
    downscale_delay_s: float = 120.0  # longer: a replica added back costs a model load
    drain_timeout_s: float = 120.0  # a replica being removed finishes its requests for up to this long

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus per replica must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be >= 1")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.drain_timeout_s) < 0:
            raise ValueError("upscale_delay_s, downscale_delay_s and drain_timeout_s must be >= 0 (seconds)")


@dataclass
class RayDisaggConfig:
    model: str  # catalogue name, .gguf file or model folder, as for `quadrant serve`
    # LLMEngine.from_model options of both pools; kv_transfer's role and KV server address are set per replica.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    prefill: PoolConfig = field(default_factory=lambda: PoolConfig(PoolTargets.for_role("prefill", 1, 2)))
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(PoolTargets.for_role("decode", 1, 4)))
    host: str = "127.0.0.1"  # Ray's HTTP proxy; the router answers at http://host:port/
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None  # asked of clients by the router, and by the workers of the router
    kv_host: str | None = None  # address a prefill replica's KV server binds; None: the replica's node IP
    metrics_interval_s: float = 2.0  # how often a replica pushes its signals to Serve's controller
    look_back_period_s: float = 10.0  # the signals are averaged over this window
    router_num_cpus: float = 1.0
    # Seconds between the router's checks of the pool URLs: a step that fails marks the whole pool
    # down until the next check passes, so it is short here.
    router_health_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if not 0 < self.metrics_interval_s < self.look_back_period_s:
            raise ValueError("metrics_interval_s must be positive and shorter than look_back_period_s, so that "
                             "each window holds several reports")
        if self.router_num_cpus < 0 or self.router_health_interval <= 0:
            raise ValueError("router_num_cpus must be >= 0 and router_health_interval positive")

    def pool(self, role: Role) -> PoolConfig:
        return self.prefill if role == "prefill" else self.decode

    @property
    def proxy_url(self) -> str:
        """Where replicas reach the proxy: this node's own, over loopback when it listens everywhere."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"


# -- the pools' replicas --------------------------------------------------------------------------

class _RecentMean:
    """Mean of a histogram's observations over the last `window_s` seconds (0 when none), from
    snapshots of its running sum and count: the latency a replica reports for autoscaling."""

    def __init__(self, histogram: Histogram, window_s: float) -> None:
        self.histogram, self.window_s = histogram, window_s
        self.snapshots: deque[tuple[float, float, float]] = deque()  # (time, sum, count)

    def __call__(self) -> float:
        now = time.monotonic()
        samples = [s for metric in self.histogram.collect() for s in metric.samples]
        total = next(s.value for s in samples if s.name.endswith("_sum"))
        count = next(s.value for s in samples if s.name.endswith("_count"))
        self.snapshots.append((now, total, count))
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - self.window_s:
            self.snapshots.popleft()
        _, first_total, first_count = self.snapshots[0]
        return (total - first_total) / (count - first_count) if count > first_count else 0.0


@serve.ingress()
class PoolReplica:
    """A prefill or decode worker: quadrant's OpenAI app, built in the replica (its KV server binds
    here), plus the health check and the signals that Serve asks replicas for."""

    def __init__(self, role: Role, server: ServerConfig, kv_host: str | None, window_s: float) -> None:
        kv = server.engine_kwargs.get("kv_transfer") or KVTransferConfig()
        kv = dataclasses.replace(kv, role=role, kv_host=kv_host or ray.util.get_node_ip_address(), kv_port=0)
        self.role = role
        self.config = dataclasses.replace(server, engine_kwargs={**server.engine_kwargs, "kv_transfer": kv})
        self.window_s = window_s

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_app(self.config)  # its lifespan, run by Serve next, starts loading the model
        self.state = app.state.quadrant
        self.ttft = _RecentMean(self.state.metrics.ttft, self.window_s)
        self.tpot = _RecentMean(self.state.metrics.tpot, self.window_s)
        return app

    async def check_health(self) -> None:
        # Serve's first check gates the replica's start: the proxy sends it requests only once the
        # model has loaded, so a pool never answers "still loading" while it scales up.
        while self.state.llm is None and self.state.load_error is None:
            await asyncio.sleep(0.1)
        if self.state.load_error is not None:
            raise RuntimeError(f"loading {self.config.model} failed: {self.state.load_error}")
        if self.state.llm is not None and not self.state.llm.is_running:
            raise RuntimeError(f"the engine stopped: {self.state.engine_error}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's signals; Serve averages them over look_back_period_s for PoolPolicy."""
        llm = self.state.llm
        if llm is None:
            return {}
        running, waiting, usage = await llm.call(
            lambda e: (len(e.scheduler.running), len(e.scheduler.waiting) + len(e.scheduler.loading), e.kv.usage))
        return {"num_running": float(running), "num_waiting": float(waiting), "kv_usage": float(usage),
                "ttft": self.ttft(), "tpot": self.tpot()}


class PoolPolicy:
    """Serve autoscaling policy of one pool (runs in Serve's controller): the replicas' reported
    signals into autoscale.desired_replicas. Serve then applies the delays and the bounds."""

    def __init__(self, **targets: Any) -> None:
        self.targets = PoolTargets(**targets)
        self.last_wanted: int | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        signals = pool_signals(ctx.aggregated_metrics or {}, current, ctx.total_queued_requests)
        wanted = desired_replicas(current, signals, self.targets)
        if wanted != self.last_wanted:  # Serve's logger: the line lands in the controller's log
            logging.getLogger("ray.serve").info("%s wants %d replicas (%d running): %s", ctx.deployment_id, wanted,
                                                current, signals)
            self.last_wanted = wanted
        return wanted, {}


def _autoscaling_config(pool: PoolConfig, config: RayDisaggConfig) -> AutoscalingConfig:
    policy = AutoscalingPolicy(policy_function=PoolPolicy, policy_kwargs=dataclasses.asdict(pool.targets))
    # metrics_interval_s is marked deprecated, yet in Ray 2.60 it is still what sets how often a
    # replica pushes its signals (the environment variables named in the warning are not read for it).
    return AutoscalingConfig(min_replicas=pool.targets.min_replicas, max_replicas=pool.targets.max_replicas,
                             upscale_delay_s=pool.upscale_delay_s, downscale_delay_s=pool.downscale_delay_s,
                             metrics_interval_s=config.metrics_interval_s, look_back_period_s=config.look_back_period_s,
                             policy=policy)


# -- the router -----------------------------------------------------------------------------------

@serve.ingress()
class RouterReplica:
    """quadrant's router with the two pools as its workers, reached through Ray's proxy."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_router_app(self.config)


# -- the applications -----------------------------------------------------------------------------

def build_ray_app(config: RayDisaggConfig) -> list[serve.RunTarget]:
    """The three Serve applications, pools first (the router checks them as it starts)."""
    server = ServerConfig(model=config.model, served_model_name=config.served_model_name, host=config.host,
                          port=config.port, api_key=config.api_key, engine_kwargs=config.engine_kwargs)
    targets = []
    for role in ROLES:
        pool = config.pool(role)
        deployment = serve.deployment(
            name=role, autoscaling_config=_autoscaling_config(pool, config),
            max_ongoing_requests=pool.max_ongoing_requests, graceful_shutdown_timeout_s=pool.drain_timeout_s,
            max_constructor_retry_count=3,  # a model that fails to load fails the deployment soon
            ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus})(PoolReplica)
        app = deployment.bind(role, server, config.kv_host, config.look_back_period_s)
        targets.append(serve.RunTarget(app, name=APP_NAMES[role], route_prefix=ROUTE_PREFIXES[role]))
    # Each pool is one worker to the router: Ray's proxy at its route prefix picks the replica.
    router = RouterConfig(prefill_urls=[config.proxy_url + ROUTE_PREFIXES["prefill"]],
                          decode_urls=[config.proxy_url + ROUTE_PREFIXES["decode"]], host=config.host, port=config.port,
                          api_key=config.api_key, health_interval=config.router_health_interval)
    # Each client request stays open on the router for its whole decode: no small cap on them.
    deployment = serve.deployment(name="router", num_replicas=1, max_ongoing_requests=100_000,
                                  ray_actor_options={"num_cpus": config.router_num_cpus})(RouterReplica)
    targets.append(serve.RunTarget(deployment.bind(router), name=APP_NAMES["router"],
                                   route_prefix=ROUTE_PREFIXES["router"]))
    return targets


def deploy(config: RayDisaggConfig) -> None:
    """Start Serve's proxy on host:port in the connected Ray cluster and run the applications,
    returning once every replica has loaded the model."""
    serve.start(http_options={"host": config.host, "port": config.port})
    *pools, router = build_ray_app(config)
    serve.run_many(pools)  # both pools load at once
    serve.run_many([router])


def running_replicas(role: Role) -> int:
    """Replicas of a pool that are up and taking requests."""
    app = serve.status().applications.get(APP_NAMES[role])
    if app is None or role not in app.deployments:
        return 0
    return sum(n for state, n in app.deployments[role].replica_states.items() if state == "RUNNING")


# -- command line ---------------------------------------------------------------------------------

def _replica_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX replicas, e.g. 1:4") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return bounds


def _engine_kwargs(flags: list[str]) -> dict[str, Any]:
    """The engine flags of `quadrant serve` (--dtype, --kv-cache-memory, ...), parsed by its own parser."""
    from quadrant.cli import build_parser, engine_kwargs

    engine_parser = build_parser().parse_args(["serve", "MODEL"]).engine_parser
    engine_parser.prog = "engine options"
    return engine_kwargs(engine_parser.parse_args(flags))


def config_from_args(argv: list[str] | None) -> tuple[RayDisaggConfig, str | None]:
    """The config and the Ray address (None: start Ray here) from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m quadrant.disagg.ray_serve",
        description="Serve MODEL as elastic prefill and decode pools on Ray Serve, each autoscaled on its own "
                    "signals. Engine flags of `quadrant serve` (--dtype, --kv-cache-memory, ...) pass through.")
    parser.add_argument("model", help="name, .gguf file or model folder")
    parser.add_argument("--address", default=None, help="a Ray cluster to join (default: start Ray here)")
    parser.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy (default: loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (or set QUADRANT_API_KEY)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--kv-host", default=None, help="address prefill KV servers bind (default: the node's IP)")
    parser.add_argument("--prefill-replicas", type=_replica_range, default=(1, 2), metavar="MIN:MAX")
    parser.add_argument("--decode-replicas", type=_replica_range, default=(1, 4), metavar="MIN:MAX")
    parser.add_argument("--target-waiting", type=float, default=2.0, help="prefill: waiting requests per replica")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="prefill: seconds to the first token")
    parser.add_argument("--target-kv-usage", type=float, default=0.7, help="decode: share of KV blocks in use")
    parser.add_argument("--tpot-slo", type=float, default=0.1, help="decode: seconds per output token")
    parser.add_argument("--upscale-delay", type=float, default=10.0, help="seconds a scale-up must be wanted")
    parser.add_argument("--downscale-delay", type=float, default=120.0, help="seconds a scale-down must be wanted")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="default: 1 when the engine runs on cuda, else 0")
    args, engine_flags = parser.parse_known_args(argv)
    engine = _engine_kwargs(engine_flags)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else \
        float(str(engine["device"]).startswith("cuda"))

    def pool(role: Role, bounds: tuple[int, int]) -> PoolConfig:
        targets = PoolTargets.for_role(role, *bounds)
        if role == "prefill":
            targets = dataclasses.replace(targets, target_waiting=args.target_waiting, ttft_slo=args.ttft_slo)
        else:
            targets = dataclasses.replace(targets, target_kv_usage=args.target_kv_usage, tpot_slo=args.tpot_slo)
        return PoolConfig(targets, num_cpus=args.cpus_per_replica, num_gpus=gpus,
                          upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay)

    config = RayDisaggConfig(model=args.model, engine_kwargs=engine, prefill=pool("prefill", args.prefill_replicas),
                             decode=pool("decode", args.decode_replicas), host=args.host, port=args.port,
                             served_model_name=args.served_model_name, api_key=args.api_key or envs.api_key(),
                             kv_host=args.kv_host)
    return config, args.address


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        config, address = config_from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init(address=address)
    try:
        deploy(config)
        print(f"quadrant: serving {config.model} at http://{config.host}:{config.port}/v1 "
              f"(pools at {ROUTE_PREFIXES['prefill']} and {ROUTE_PREFIXES['decode']}); Ctrl-C stops", file=sys.stderr)
        last = None
        while True:  # report each change of the pools' sizes
            now = tuple(running_replicas(role) for role in ROLES)
            if now != last:
                print(f"quadrant: {now[0]} prefill + {now[1]} decode replicas running", file=sys.stderr)
                last = now
            time.sleep(2.0)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
