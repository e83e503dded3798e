"""SamplingParams: how one request picks its tokens and when it stops.

Validated on construction; a bad value raises ValueError naming the field and
the allowed range, which the CLI prints as one line and the server maps to a
400 with `param` set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StructuredKind = Literal["json_schema", "regex", "choice", "grammar", "lark"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's text, enforced token by token (engine/structured.py).

    json_schema: `spec` is the schema as JSON text ('{"type": "object"}' for any object);
    regex: a regular expression the whole output matches; choice: a JSON list of strings,
    one of which is the output; grammar: a GBNF (llama.cpp) or Lark grammar; lark: Lark only.
    """

    kind: StructuredKind
    spec: str


@dataclass
class SamplingParams:
    n: int = 1  # independent samples of the same prompt (they share its KV blocks)
    max_tokens: int = 256  # new tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # same seed -> same tokens, whatever else is batched
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence among generated tokens
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # also each prompt token's logprob (the first is None) and top alternatives
    structured: StructuredOutput | None = None  # the output follows this schema, regex or grammar
    # Embeddings: the prompt's final hidden states pooled ("mean", normalised; or the "last" token's)
    # into RequestOutput.embedding; with max_tokens 0, nothing is generated.
    pooling: Literal["mean", "last"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value == value, name, "must be a number")
        for name in ("max_tokens", "top_k", "n"):
            _check(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name, "must be an integer")
        # 0 only scores the prompt (prompt_logprobs): lm-eval's loglikelihood requests.
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens", "must be an integer >= 0")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 or a positive integer")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop), "stop",
               "must be non-empty strings of at most 256 characters")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        _check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "must be an integer in [1, 128]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _check(all(isinstance(k, int) and k >= 0 and -100 <= v <= 100 for k, v in self.logit_bias.items()),
               "logit_bias", "must map token ids to values in [-100, 100]")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", "must be an integer in [0, 20]")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
               "prompt_logprobs", "must be an integer in [0, 20]")
        _check(self.structured is None or isinstance(self.structured, StructuredOutput), "structured",
               "must be a StructuredOutput")
        _check(self.pooling in (None, "mean", "last"), "pooling", "must be None, 'mean' or 'last'")

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the scaled logits overflow: such a temperature means greedy anyway.
        return self.temperature < 1e-5


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}")
