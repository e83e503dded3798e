"""Quality and memory of the 8-bit KV cache against the unquantised one, on a real text.

    python benchmarks/kv_quant_quality.py [--model smollm2:135m] [--groups 16 64] [--dtypes int8 fp8]

Scores benchmarks/data/alice_ch1-2.txt (public domain, see its README) through the engine's
paged cache in 128-token prefill chunks, so every chunk attends to the cached (quantised)
K/V of the ones before, as serving does; then reports perplexity, the mean and 99th
percentile KL divergence of next-token distributions against the unquantised cache, top-1
agreement, and the cache bytes per token. Weights use the default plan in every run, so
only the cache differs. On a GPU (--device cuda) fp8 runs in the Triton kernels.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quadrant.config import CacheConfig
from quadrant.engine.engine import LLMEngine
from quadrant.evaluate import Scores, kl_divergence, score_tokens

TEXT = Path(__file__).parent / "data" / "alice_ch1-2.txt"


def run(model: str, device: str, cache_dtype: str, group: int, max_tokens: int) -> tuple[Scores, LLMEngine]:
    engine = LLMEngine.from_model(model, device=device, dtype="bfloat16" if device.startswith("cuda") else "float32",
                                  cache=CacheConfig(block_size=max(16, group), cache_dtype=cache_dtype,  # type: ignore[arg-type]
                                                    quant_group=group))
    ids = engine.require_tokenizer().encode(TEXT.read_text())[:max_tokens]
    return score_tokens(engine, ids), engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    ap.add_argument("--groups", nargs="+", type=int, default=[16])
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text scored (the model's context caps it)")
    args = ap.parse_args()

    base, engine = run(args.model, args.device, "auto", 16, args.max_tokens)
    cfg, act = engine.model_config, getattr(torch, engine.config.dtype)
    base_bytes = CacheConfig().bytes_per_block(cfg, act) / 16
    bf16_bytes = CacheConfig().bytes_per_block(cfg, torch.bfloat16) / 16
    n = base.targets.numel()
    table = Table(title=f"KV cache quantisation, {args.model}, {n} scored tokens of {TEXT.name} "
                        f"({platform.machine()}, {args.device}, {date.today()})")
    for col in ("cache", "group N", "perplexity", "vs unquantised", "mean KL (nats)", "p99 KL", "top-1 agree",
                "bytes/token", "memory", "vs bf16"):
        table.add_column(col, justify="right")
    table.add_row(engine.config.dtype, "-", f"{base.perplexity:.3f}", "-", "-", "-", "-", f"{base_bytes:,.0f}", "1.00x",
                  f"{base_bytes / bf16_bytes:.2f}x")
    del engine
    for dtype in args.dtypes:
        for group in args.groups:
            scores, engine = run(args.model, args.device, dtype, group, args.max_tokens)
            kl = kl_divergence(base, scores)
            agree = (base.logprobs.argmax(-1) == scores.logprobs.argmax(-1)).float().mean()
            cc = CacheConfig(block_size=max(16, group), cache_dtype=dtype, quant_group=group)  # type: ignore[arg-type]
            per_token = cc.bytes_per_block(cfg, act) / cc.block_size
            table.add_row(dtype, str(group), f"{scores.perplexity:.3f}",
                          f"{100 * (scores.perplexity / base.perplexity - 1):+.2f}%", f"{float(kl.mean()):.5f}",
                          f"{float(kl.quantile(0.99)):.4f}", f"{100 * float(agree):.1f}%", f"{per_token:,.0f}",
                          f"{per_token / base_bytes:.2f}x", f"{per_token / bf16_bytes:.2f}x")
            del engine
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
