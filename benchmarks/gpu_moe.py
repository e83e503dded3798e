"""Fused MoE on the GPU against a per-expert loop, on real MoE shapes with random weights.

    python benchmarks/gpu_moe.py            # OLMoE-1B-7B and Qwen3-30B-A3B expert shapes, bf16 and int8 weights
    python benchmarks/gpu_moe.py --smoke    # tiny shapes: checks the script (CPU: Triton interpreter)

One layer's experts: quadrant's Triton fused MoE (tokens sorted by expert, one grouped GEMM
per projection, routing weights fused into the second) against the per-expert loop of
torch matmuls (`fused_moe_cpu`, which is what a plain PyTorch MoE does), at decode and
prefill batch sizes. Reports tokens/s, achieved TFLOP/s (2 * tokens * top_k * 3 * H * I)
and the ratio. Router choices are uniform at random (a balanced load).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from quadrant.kernels.fused_moe import fused_moe, fused_moe_cpu


@dataclass
class Shape:
    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int


SHAPES = [Shape("OLMoE-1B-7B", 64, 8, 2048, 1024), Shape("Qwen3-30B-A3B", 128, 8, 2048, 768)]
SMOKE = [Shape("tiny", 4, 2, 64, 32)]


def timed(fn, device: torch.device, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    table = Table(title=f"fused MoE vs per-expert loop ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'})")
    for col in ("shape", "weights", "tokens", "fused tok/s", "fused TFLOP/s", "loop tok/s", "ratio"):
        table.add_column(col, justify="right")
    for shape in SMOKE if args.smoke else SHAPES:
        e, k, h, i = shape.experts, shape.top_k, shape.hidden, shape.intermediate
        w13 = torch.randn(e, 2 * i, h, device=dev, dtype=dtype) * 0.02
        w2 = torch.randn(e, h, i, device=dev, dtype=dtype) * 0.02
        q13 = (w13.float() / (w13.float().abs().amax(-1, keepdim=True) / 127)).round().to(torch.int8)
        q2 = (w2.float() / (w2.float().abs().amax(-1, keepdim=True) / 127)).round().to(torch.int8)
        s13, s2 = w13.float().abs().amax(-1) / 127, w2.float().abs().amax(-1) / 127
        for tokens in ([3, 17] if args.smoke else [1, 16, 256, 4096]):
            x = torch.randn(tokens, h, device=dev, dtype=dtype)
            ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(tokens)]).to(torch.int32)
            weights = torch.softmax(torch.randn(tokens, k, device=dev), -1)
            reps = 1 if args.smoke else (50 if tokens <= 256 else 10)
            flops = 2 * tokens * k * 3 * h * i
            for label, a, b, sa, sb in (("bf16" if dtype == torch.bfloat16 else "fp32", w13, w2, None, None),
                                        ("int8 (w8a16)", q13, q2, s13, s2)):
                fused = timed(lambda: fused_moe(x, a, b, weights, ids, w13_scale=sa, w2_scale=sb), dev, reps)
                loop = timed(lambda: fused_moe_cpu(x, a, b, weights, ids, w13_scale=sa, w2_scale=sb), dev, reps)
                table.add_row(shape.name, label, str(tokens), f"{tokens / fused:,.0f}", f"{flops / fused / 1e12:.1f}",
                              f"{tokens / loop:,.0f}", f"{loop / fused:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
