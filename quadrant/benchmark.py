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
from quadrant.errors import QuadrantError
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


@dataclass
class SweepPoint:
    """One concurrency level of `quadrant bench --plot`: aggregate throughput and each request's latencies."""

    concurrency: int
    tokens_per_s: float
    ttft_s: list[float]  # per request: arrival to first token
    tpot_s: list[float]  # per request: mean time per output token after the first


def _run_requests(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> SweepPoint:
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = (now, len(out.outputs[0].token_ids))
    end = time.perf_counter()
    ttft = [first[i] - start for i in ids]
    tpot = [(done[i][0] - first[i]) / max(done[i][1] - 1, 1) for i in ids]
    return SweepPoint(len(prompts), sum(n for _, n in done.values()) / (end - start), ttft, tpot)


def concurrency_sweep(model: str, levels: list[int], decode_tokens: int = 64, prompt_tokens: int = 128,
                      engine_kwargs: dict | None = None, progress: bool = True) -> list[SweepPoint]:
    """Aggregate tokens/s and per-request TTFT/TPOT at each concurrency level: all requests arrive at
    once, with prompts of a quarter to all of `prompt_tokens` and answers of half to all of
    `decode_tokens` (seeded), so the latencies spread as a real mix's do."""
    engine = LLMEngine.from_model(model, **(engine_kwargs or {}))
    engine.compile_decode(sorted({min(n, 16) for n in levels}))
    vocab = engine.model_config.vocab_size
    _run_requests(engine, [synthetic_prompt(8, vocab, seed=99)], [SamplingParams(max_tokens=2, temperature=0.0)])
    rng = random.Random(7)
    points = []
    for n in tqdm(levels, desc="sweep", disable=not progress, leave=False):
        prompts = [synthetic_prompt(rng.randint(max(prompt_tokens // 4, 1), prompt_tokens), vocab, seed=1000 * n + i)
                   for i in range(n)]
        params = [SamplingParams(max_tokens=rng.randint(max(decode_tokens // 2, 2), decode_tokens), temperature=0.0,
                                 ignore_eos=True) for _ in range(n)]
        points.append(_run_requests(engine, prompts, params))
    return points


def plot_sweep(points: list[SweepPoint], folder: str, title: str) -> list[str]:
    """Two PNG charts beside the tables: throughput against concurrency, and TTFT/TPOT distributions."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuadrantError("--plot needs matplotlib: pip install matplotlib") from None
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    levels = [p.concurrency for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [p.tokens_per_s for p in points], marker="o")
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s (aggregate)", title=title)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.grid(alpha=0.3)
    throughput = out / "throughput.png"
    fig.tight_layout()
    fig.savefig(throughput, dpi=120)
    plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot([[t * 1000 for t in p.ttft_s] for p in points], tick_labels=[str(n) for n in levels])
    left.set(xlabel="concurrent requests", ylabel="time to first token, ms", title="TTFT")
    right.boxplot([[t * 1000 for t in p.tpot_s] for p in points], tick_labels=[str(n) for n in levels])
    right.set(xlabel="concurrent requests", ylabel="time per output token, ms", title="TPOT")
    fig.suptitle(title)
    fig.tight_layout()
    latency = out / "latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)
    return [str(throughput), str(latency)]


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
