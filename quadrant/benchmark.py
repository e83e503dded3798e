"""Measure an engine the way `quadrant bench` and benchmarks/ report it.

Workloads: load to first token, prompt processing (one long prompt), decode
tokens/s at batch 1 and aggregate at N concurrent requests, time to first
token, peak resident memory. Prompts are synthetic token ids (fixed seed), so
the same workload runs on any model and on the llama.cpp peer.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from quadrant.config import SchedulerConfig
from quadrant.engine.engine import LLMEngine
from quadrant.sampling_params import SamplingParams


@dataclass
class BenchResult:
    load_to_first_token_s: float
    prompt_tokens_per_s: float
    ttft_s: float  # for the long prompt
    decode_tokens_per_s: float  # batch 1
    concurrent_tokens_per_s: float  # aggregate over `concurrency` requests
    concurrency: int
    peak_rss_gib: float
    speculation: dict[str, float] | None = None  # acceptance counters, with --speculative-method


def synthetic_prompt(num_tokens: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Ids drawn from the common part of the vocabulary (skipping the first 1,000 special/byte ids)."""
    rng = random.Random(seed)
    top = min(vocab_size, 30_000)
    return [rng.randrange(1000, top) for _ in range(num_tokens)]


def peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float, int]:
    """Run prompts to completion: (seconds to the first token of the first request, total seconds, tokens out)."""
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    first = None
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            first = first or time.perf_counter()
            generated += sum(len(o.token_ids_delta) for o in out.outputs)
    return (first or time.perf_counter()) - start, time.perf_counter() - start, generated


def run_benchmark(
    model: str,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    concurrency: int = 16,
    engine_kwargs: dict | None = None,
    progress: bool = True,
) -> BenchResult:
    kwargs = {"scheduler": SchedulerConfig(max_num_batched_tokens=max(prompt_tokens, 512)), **(engine_kwargs or {})}
    start = time.perf_counter()
    engine = LLMEngine.from_model(model, **kwargs)  # before the bar: a load error stays one clean line
    bar = tqdm(total=4, desc="bench", disable=not progress, leave=False)
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    _run(engine, [synthetic_prompt(8, vocab, seed=99)], greedy)
    load_to_first = time.perf_counter() - start
    # Decode steps run compiled graphs on CPU once they are built (in the background otherwise):
    # build the two batch sizes measured before timing them.
    engine.compile_decode([1, concurrency])
    bar.update(1)

    # Prompt processing: one long prompt, one output token (prefix cache cannot help: fresh ids).
    long_ttft, _, _ = _run(engine, [synthetic_prompt(prompt_tokens, vocab, seed=1)], greedy)
    bar.update(1)

    # Decode at batch 1: time between the first and the last token.
    decode = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    first, total, n = _run(engine, [synthetic_prompt(16, vocab, seed=2)], decode)
    decode_tps = (n - 1) / (total - first)
    bar.update(1)

    # Aggregate decode throughput with `concurrency` requests in flight together.
    prompts = [synthetic_prompt(16, vocab, seed=10 + i) for i in range(concurrency)]
    first, total, n = _run(engine, prompts, decode)
    concurrent_tps = (n - concurrency) / (total - first)
    bar.update(1)
    bar.close()
    return BenchResult(
        load_to_first_token_s=load_to_first,
        prompt_tokens_per_s=prompt_tokens / long_ttft,
        ttft_s=long_ttft,
        decode_tokens_per_s=decode_tps,
        concurrent_tokens_per_s=concurrent_tps,
        concurrency=concurrency,
        peak_rss_gib=peak_rss_gib(),
        speculation=engine.spec_stats.as_dict() if engine.proposer is not None else None,
    )
