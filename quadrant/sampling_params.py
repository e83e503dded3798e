"""SamplingParams: how one request picks its tokens and when it stops.

Validated on construction; a bad value raises ValueError naming the field and
the allowed range, which the CLI prints as one line and the server maps to a
400 with `param` set.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # same seed -> same tokens, whatever else is batched
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 or a positive integer")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}")
