"""The scaling rule of a disaggregated pool: its own signals in, a replica count out (pure Python).

Prefill is compute-bound, so its pool follows queue depth and time to first token; decode is
memory-bound, so its pool follows KV cache usage and time per output token. Each signal proposes
ceil(current * observed / target), as Kubernetes' HPA does; the largest proposal wins, clamped to
the pool's bounds. Who measures the signals and applies the count (Ray Serve: ray_serve.py) is not here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PoolSignals", "PoolTargets", "desired_replicas", "pool_signals", "proposals"]

Role = Literal["prefill", "decode"]


@dataclass
class PoolSignals:
    """What a pool measures, averaged over its running replicas (0: nothing observed lately)."""

    num_waiting: float = 0.0  # requests waiting per replica: the engine's queue plus the one in front of it
    kv_usage: float = 0.0  # share of KV blocks in use, 0..1
    ttft: float = 0.0  # seconds, mean time to first token of the requests finished lately
    tpot: float = 0.0  # seconds, mean time per output token after the first, of the requests finished lately


@dataclass
class PoolTargets:
    """A pool's bounds and the value each signal is kept at; a target of None ignores that signal.
    `PoolTargets.for_role` gives each role its own signals (prefill: queue and TTFT; decode: KV and TPOT)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_waiting: float | None = None  # waiting requests per replica
    target_kv_usage: float | None = None  # KV usage ratio, in (0, 1]
    ttft_slo: float | None = None  # seconds
    tpot_slo: float | None = None  # seconds
    # Within this relative distance of a target a signal proposes no change: measurements wobble,
    # and a pool that flaps pays a model load for every replica it adds back.
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError("min_replicas must be >= 1: the router needs a worker behind each pool")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        for name in ("target_waiting", "target_kv_usage", "ttft_slo", "tpot_slo"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, or None to ignore that signal")
        if self.target_kv_usage is not None and self.target_kv_usage > 1:
            raise ValueError("target_kv_usage is a share of the KV blocks: give a value in (0, 1]")
        if not 0 <= self.tolerance < 1:
            raise ValueError("tolerance must be in [0, 1)")

    @classmethod
    def for_role(cls, role: Role, min_replicas: int = 1, max_replicas: int = 1) -> PoolTargets:
        """Defaults for a pool of `role`; set other fields on the result."""
        if role == "prefill":
            return cls(min_replicas, max_replicas, target_waiting=2.0, ttft_slo=2.0)
        if role == "decode":
            return cls(min_replicas, max_replicas, target_kv_usage=0.7, tpot_slo=0.1)
        raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")


def pool_signals(per_replica: Mapping[str, Mapping[Any, float]], num_replicas: int,
                 num_queued: float | None) -> PoolSignals:
    """The replicas' reports, {signal: {replica: value}}, as the pool's signals: the mean over the
    replicas that reported. Requests queued in front of the pool, given to no replica yet, count as
    waiting, shared out over its replicas."""

    def mean(name: str) -> float:
        values = list(per_replica.get(name, {}).values())
        return sum(values) / len(values) if values else 0.0

    waiting = sum(per_replica.get("num_waiting", {}).values()) + (num_queued or 0.0)
    return PoolSignals(num_waiting=waiting / max(num_replicas, 1), kv_usage=mean("kv_usage"), ttft=mean("ttft"),
                       tpot=mean("tpot"))


def proposals(current: int, signals: PoolSignals, targets: PoolTargets) -> dict[str, int]:
    """Each targeted signal's replica count, unclamped: ceil(current * observed / target), or
    `current` while observed/target is within the tolerance of 1."""
    pairs = {"num_waiting": (signals.num_waiting, targets.target_waiting),
             "kv_usage": (signals.kv_usage, targets.target_kv_usage),
             "ttft": (signals.ttft, targets.ttft_slo),
             "tpot": (signals.tpot, targets.tpot_slo)}
    out: dict[str, int] = {}
    for name, (observed, target) in pairs.items():
        if target is None:
            continue
        ratio = max(observed, 0.0) / target
        # The small slack keeps float noise (0.7 / 0.35 = 2.0000000000000004) from adding a replica.
        out[name] = current if abs(ratio - 1.0) <= targets.tolerance else math.ceil(current * ratio - 1e-9)
    return out


def desired_replicas(current: int, signals: PoolSignals, targets: PoolTargets) -> int:
    """The pool's replica count: the largest signal's proposal, within [min_replicas, max_replicas]."""
    if current < 1:  # nothing running to scale from (starting, or all replicas lost): the floor
        return targets.min_replicas
    wanted = max(proposals(current, signals, targets).values(), default=current)
    return min(max(wanted, targets.min_replicas), targets.max_replicas)
