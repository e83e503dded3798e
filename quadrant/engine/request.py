"""Request state inside the engine, and what the engine reports back.

A Request is one sequence: its prompt, the tokens generated so far, its KV
block table and how many of its tokens are already in the cache. A user
request with n > 1 becomes n Requests of one group that share the prompt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quadrant.layers.sampler import TokenLogprob
from quadrant.sampling_params import SamplingParams

if TYPE_CHECKING:
    from quadrant.disagg.protocol import RemoteKV

__all__ = ["FinishReason", "Request", "RequestOutput", "RequestStatus", "CompletionOutput", "TokenLogprob"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted and waiting to recompute
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks allocated, the prompt's KV being pulled
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller (e.g. a client disconnect)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    group_id: str | None = None  # siblings of one n > 1 request share it
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks so far
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    num_preemptions: int = 0
    # Overlapped scheduling: tokens a step still in flight will sample (the next step is scheduled as if they
    # were known; the workers fill them in). Never in output_ids: output processing sees real tokens only.
    num_output_placeholders: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    seed: int | None = None  # this sample's seed (params.seed + its index); the worker owns the generator
    # Speculative decoding (engine/spec/): tokens proposed to follow output_ids, verified by the next step
    # (never part of output_ids, block hashes or the prefix cache until accepted); with a draft model,
    # the draft's distribution [k, V] each was drawn from, for lossless rejection sampling.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: Any = None
    draft_parents: list[int] | None = None  # a token tree's parent indices (engine/spec/tree.py); None: a chain
    shadow_draft: int | None = None  # a free proposer's unverified guess at the next token (policy evidence)
    # Disaggregation (quadrant/disagg/): a decode engine pulls the prompt's KV from `remote_kv`; a
    # prefill engine keeps it for a decode engine (`do_remote_decode`) and says where in `kv_transfer_params`.
    remote_kv: RemoteKV | None = None
    do_remote_decode: bool = False
    kv_transfer_id: str | None = None  # prefill, overlapped: the id decode engines pull it by while it is computed
    kv_transfer_params: dict[str, Any] | None = None
    # Structured outputs (engine/structured.py): the grammar matcher, advanced over output_ids (driver only).
    grammar: Any = None
    # Prompt logprobs (params.prompt_logprobs): one record per prompt token, filled as prefill chunks run.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Embeddings (params.pooling): the pooled final hidden states so far (a sum for "mean"), and of how many tokens.
    pooled: Any = None
    num_pooled: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str  # the whole text so far (stop strings removed)
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    text_delta: str = ""  # new text since the previous output of this request (streaming)
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished (perf_counter seconds)
    error: str | None = None  # set when this request failed inside the engine (others go on)
    kv_transfer_params: dict[str, Any] | None = None  # prefill engines: where a decode engine pulls the prompt's KV
    # params.prompt_logprobs: each prompt token's record (None for the first, which nothing predicts).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    embedding: list[float] | None = None  # params.pooling: the prompt's pooled (mean: L2-normalised) hidden state
