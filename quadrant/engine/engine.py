"""LLMEngine: a loaded model, its tokenizer and paged KV cache, and token generation.

`stream()` runs one request: the prompt in chunks of at most
max_num_batched_tokens, then one decode step per token, each step one
flattened forward pass through the runner. Blocks are taken from the pool as
the sequence grows and returned when it ends, however it ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quadrant.config import CacheConfig
from quadrant.engine.kv_cache import BlockPool
from quadrant.engine.runner import ModelRunner, ScheduledSeq
from quadrant.errors import QuadrantError
from quadrant.layers.sampler import sample
from quadrant.loader import store
from quadrant.loader.source import open_model
from quadrant.sampling_params import SamplingParams


class PromptTooLongError(QuadrantError):
    """The prompt does not fit the model's context."""


@dataclass
class GenerationStep:
    token_id: int
    finish_reason: str | None  # None while running; "stop" (eos / stop token) or "length"


class LLMEngine:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        device: str = "cpu",
        cache_config: CacheConfig | None = None,
        max_num_batched_tokens: int = 512,
    ) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        start = time.perf_counter()
        self.source = open_model(store.resolve(model, pull_missing=True))
        self.model_config = self.source.config
        # A weights-only folder (tests, dummy loads) has no tokenizer; ids still work.
        self.tokenizer = self.source.tokenizer() if self.source.has_tokenizer() else None
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        torch_dtype = getattr(torch, dtype)
        self.model = self.source.load_model(torch_dtype, device)
        self.cache_config = cache_config or CacheConfig()
        num_blocks = self.cache_config.blocks_for(self.model_config, torch_dtype)
        self.pool = BlockPool(num_blocks)
        self.runner = ModelRunner(self.model, self.model_config, self.cache_config, num_blocks, torch_dtype, device)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.load_seconds = time.perf_counter() - start

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) the model's context and the KV pool can hold."""
        return min(self.model_config.max_position_embeddings, self.pool.num_blocks * self.cache_config.block_size)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationStep]:
        if not prompt_ids:
            raise QuadrantError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            where = "the model's context" if self.max_model_len == self.model_config.max_position_embeddings else "the KV cache"
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; {where} holds {self.max_model_len}"
            )
        eos = set() if params.ignore_eos else set(self.eos_token_ids)
        stop_ids = eos | set(params.stop_token_ids)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = ScheduledSeq(token_ids=list(prompt_ids), num_computed=0, num_new=0, block_table=[])
        bs = self.cache_config.block_size
        try:
            for num_generated in range(1, params.max_tokens + 1):
                while True:  # prefill in chunks; the last chunk (or a decode) yields logits we sample
                    remaining = len(seq.token_ids) - seq.num_computed
                    seq.num_new = min(remaining, self.max_num_batched_tokens)
                    needed = -(-(seq.num_computed + seq.num_new) // bs) - len(seq.block_table)
                    if needed > 0:
                        seq.block_table += self.pool.allocate(needed)
                    logits = self.runner.execute([seq])
                    seq.num_computed += seq.num_new
                    if seq.num_computed == len(seq.token_ids):
                        break
                token = sample(logits, [params], [generator])[0]
                seq.token_ids.append(token)
                if token in stop_ids:
                    yield GenerationStep(token, "stop")
                    return
                full = len(seq.token_ids) >= self.max_model_len
                yield GenerationStep(token, "length" if num_generated == params.max_tokens or full else None)
                if full:
                    return
        finally:
            self.pool.free(seq.block_table)
