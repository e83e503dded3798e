"""Overlapped scheduling: streamed decoding with the next step scheduled while one runs, against the
same engine without overlap, at several batch sizes, engines taking turns within each repeat.

    python benchmarks/overlap.py                                   # CPU, the default model
    python benchmarks/overlap.py --device cuda --model llama-3-8b --load-format dummy --batch-sizes 1 8 64
    python benchmarks/overlap.py --smoke                           # tiny shapes: checks the script

Each batch is B requests submitted at once to an AsyncLLM and streamed to the end by asyncio
consumers (what a server's clients do), greedy, a fixed number of output tokens each. Reported:
output tokens/s and the mean time per engine step with overlap off and on, their ratio, and the
share of steps that were launched while another ran. Both engines live side by side and the
repeats alternate between them, so a machine whose speed drifts treats them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from datetime import date

import torch
from rich.console import Console
from rich.table import Table

from quadrant import SamplingParams
from quadrant.config import CacheConfig, SchedulerConfig
from quadrant.engine.async_engine import AsyncLLM
from quadrant.engine.engine import LLMEngine
from quadrant.loader import store


def make(args: argparse.Namespace, overlap: bool) -> AsyncLLM:
    rows = max(args.batch_sizes)
    engine = LLMEngine.from_model(
        args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
        cache=CacheConfig(kv_cache_memory=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None),
        scheduler=SchedulerConfig(max_num_seqs=rows, max_num_batched_tokens=max(512, rows * args.prompt_tokens)),
        async_scheduling=overlap)
    engine.compile_decode(sorted(set(args.batch_sizes)))  # CPU: time the compiled steps, not their compile
    return AsyncLLM(engine)


async def batch(allm: AsyncLLM, prompts: list[list[int]], params: SamplingParams) -> int:
    async def one(p: list[int]) -> int:
        n = 0
        async for out in allm.generate(p, params):
            n += len(out.outputs[0].token_ids_delta)
        return n

    return sum(await asyncio.gather(*(one(p) for p in prompts)))


def run_once(allm: AsyncLLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float, float]:
    """(output tokens/s, seconds per step, share of steps overlapped) of one batch."""
    engine = allm.engine
    steps, overlapped = engine.num_steps, engine.num_overlapped_steps
    start = time.perf_counter()
    tokens = asyncio.run(batch(allm, prompts, params))
    seconds = time.perf_counter() - start
    steps, overlapped = engine.num_steps - steps, engine.num_overlapped_steps - overlapped
    return tokens / seconds, seconds / steps, overlapped / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 4 16 (CPU), 1 8 64 (CUDA)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=float, default=None, help="GiB for the KV cache")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens: check the script")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch_sizes = args.batch_sizes or ([1, 8, 64] if cuda else [1, 4, 16])
    if args.smoke:
        args.batch_sizes, args.max_tokens, args.repeats, args.prompt_tokens = [1, 2], 4, 1, 8
    engines = {overlap: make(args, overlap) for overlap in (False, True)}
    vocab = engines[False].engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    table = Table(title=f"overlapped scheduling, {args.model} on {args.device} "
                        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), {date.today()}")
    for col in ("batch", "tok/s off", "tok/s on", "on/off", "ms/step off", "ms/step on", "overlapped"):
        table.add_column(col, justify="right")
    try:
        for bs in args.batch_sizes:
            prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(bs)]
            for allm in engines.values():
                run_once(allm, prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
            runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for overlap, allm in engines.items():
                    runs[overlap].append(run_once(allm, prompts, params))
            off, on = ([statistics.median(r[i] for r in runs[o]) for i in range(3)] for o in (False, True))
            table.add_row(str(bs), f"{off[0]:.1f}", f"{on[0]:.1f}", f"{on[0] / off[0]:.2f}x",
                          f"{off[1] * 1e3:.2f}", f"{on[1] * 1e3:.2f}", f"{on[2]:.0%}")
    finally:
        for allm in engines.values():
            allm.shutdown()
    Console().print(table)


if __name__ == "__main__":
    main()
