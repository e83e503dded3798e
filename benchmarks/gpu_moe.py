"""Fused MoE on the GPU against a per-expert loop, on real MoE shapes with random weights.

    python benchmarks/gpu_moe.py            # OLMoE-1B-7B and Qwen3-30B-A3B expert shapes, bf16, int8, w4a8, fp8
    python benchmarks/gpu_moe.py --smoke    # tiny shapes: checks the script (CPU: Triton interpreter)

One layer's experts: quadrant's Triton fused MoE (tokens sorted by expert, one grouped GEMM
per projection, routing weights fused into the second) against the per-expert loop of
torch matmuls (`fused_moe_cpu`, which is what a plain PyTorch MoE does), at decode and
prefill batch sizes. Reports tokens/s, achieved TFLOP/s (2 * tokens * top_k * 3 * H * I)
and the ratio. Router choices are uniform at random (a balanced load).

Second table: the 8-bit-activation experts (W4A8: 4-bit weights on the int8 tensor cores; w8a8:
fp8 e4m3) at decode and prefill sizes. "GEMM" times the two grouped GEMMs alone (activations
already quantised, pairs already sorted), the product the seeds quote an MFU of about 0.8 for;
"layer" the whole fused_moe_q8 (quantising, sorting, act_and_mul, the k-sum included). MFU is
against the 8-bit dense tensor-core peak (1979 TOPS on H100/H200 SXM). First, a sweep of the
prefill tile picks the fastest candidate for each shape (printed), and the table uses it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from quadrant.kernels import quant_moe as qm
from quadrant.kernels.fused_moe import _align_padded, fused_moe, fused_moe_cpu


@dataclass
class Shape:
    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int


SHAPES = [Shape("OLMoE-1B-7B", 64, 8, 2048, 1024), Shape("Qwen3-30B-A3B", 128, 8, 2048, 768)]
SMOKE = [Shape("tiny", 4, 2, 64, 64)]  # W4A8 spans need inputs in multiples of 64
PEAK_8BIT = 1979e12  # dense int8/fp8 tensor-core ops/s, H100 and H200 SXM datasheets
CANDIDATES = [qm.Q8Blocks(128, 128, 128, 8, 3), qm.Q8Blocks(128, 128, 128, 8, 4), qm.Q8Blocks(64, 128, 128, 4, 4),
              qm.Q8Blocks(64, 256, 128, 8, 3), qm.Q8Blocks(128, 256, 128, 8, 3), qm.Q8Blocks(256, 128, 128, 8, 3)]


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
    ap.add_argument("--q8-only", action="store_true", help="only the 8-bit-activation table (skip bf16 vs loop)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    table = Table(title=f"fused MoE vs per-expert loop ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'})")
    for col in ("shape", "weights", "tokens", "fused tok/s", "fused TFLOP/s", "loop tok/s", "ratio"):
        table.add_column(col, justify="right")
    for shape in [] if args.q8_only else SMOKE if args.smoke else SHAPES:
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
    if not args.q8_only:
        Console(width=160).print(table)
    quantised_experts(args, dev, dtype)


def gemms(x: torch.Tensor, q13: qm.QuantWeights, q2: qm.QuantWeights, ids: torch.Tensor, weights: torch.Tensor,
          inter: int, prefill: qm.Q8Blocks):  # type: ignore[no-untyped-def]
    """The two grouped GEMMs of fused_moe_q8 on pre-quantised inputs (what the MFU counts), with
    `prefill` as the prefill tile."""
    tokens, k = ids.shape
    blocks = qm.pick_q8_blocks(tokens, k, q13.shape[0], q13, prefill)
    sorted_ids, expert_of_block, _ = _align_padded(ids, q13.shape[0], blocks.block_m)
    a13 = qm.quantize_activations(x, q13)
    a2 = qm.quantize_activations(torch.randn(tokens * k, inter, device=x.device, dtype=x.dtype), q2)
    gate_up = torch.empty(tokens * k, q13.shape[1], device=x.device, dtype=x.dtype)
    down = torch.empty(tokens * k, q2.shape[1], device=x.device, dtype=x.dtype)
    flat = weights.reshape(-1).float().contiguous()

    def run() -> None:
        qm._q8_gemm(a13, q13, gate_up, sorted_ids, expert_of_block, tokens * k, k, None, blocks)
        qm._q8_gemm(a2, q2, down, sorted_ids, expert_of_block, tokens * k, 1, flat, blocks)
    return run


def quantised_experts(args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> None:
    table = Table(title="8-bit-activation experts: W4A8 (int8 tensor cores) and w8a8 (fp8)")
    for col in ("shape", "format", "tokens", "layer tok/s", "layer TFLOP/s", "GEMM TFLOP/s", "GEMM MFU (8-bit)",
                "vs bf16 fused"):
        table.add_column(col, justify="right")
    for shape in SMOKE if args.smoke else SHAPES:
        e, k, h, i = shape.experts, shape.top_k, shape.hidden, shape.intermediate
        w13 = torch.randn(e, 2 * i, h, device=dev, dtype=dtype) * 0.02
        w2 = torch.randn(e, h, i, device=dev, dtype=dtype) * 0.02
        packed = {"w4a8 g128": (qm.pack_w4a8(w13, min(128, h)), qm.pack_w4a8(w2, min(128, i))),
                  "w8a8 fp8": (qm.pack_fp8(w13), qm.pack_fp8(w2))}
        sizes = [3, 17] if args.smoke else [1, 16, 256, 4096, 16384]
        sweep_tokens = sizes[-1]
        x = torch.randn(sweep_tokens, h, device=dev, dtype=dtype)
        ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(sweep_tokens)]).to(torch.int32)
        weights = torch.softmax(torch.randn(sweep_tokens, k, device=dev), -1)
        best: dict[str, qm.Q8Blocks] = {}
        for label, (q13, q2) in packed.items():  # the prefill tile: fastest candidate at the largest size
            times = {}
            for cand in CANDIDATES if not args.smoke else CANDIDATES[:1]:
                try:
                    times[cand] = timed(gemms(x, q13, q2, ids, weights, i, cand), dev, 1 if args.smoke else 10)
                except Exception as err:  # a tile that does not fit (shared memory) is skipped
                    print(f"  {shape.name} {label} {cand}: {type(err).__name__}: {str(err)[:120]}")
            best[label] = min(times, key=times.__getitem__)
            flops = 2 * sweep_tokens * k * 3 * h * i
            print(f"{shape.name} {label} tile sweep at {sweep_tokens} tokens: "
                  + ", ".join(f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}: {flops / t / 1e12:.0f} TFLOP/s"
                              for c, t in times.items()))
        for tokens in sizes:
            xt, it, wt = x[:tokens].contiguous(), ids[:tokens].contiguous(), weights[:tokens].contiguous()
            reps = 1 if args.smoke else (50 if tokens <= 256 else 10)
            flops = 2 * tokens * k * 3 * h * i
            dense = timed(lambda: fused_moe(xt, w13, w2, wt, it), dev, reps)
            for label, (q13, q2) in packed.items():
                layer = timed(lambda: qm.fused_moe_q8(xt, q13, q2, wt, it, prefill=best[label]), dev, reps)
                gemm = timed(gemms(xt, q13, q2, it, wt, i, best[label]), dev, reps)
                table.add_row(shape.name, label, str(tokens), f"{tokens / layer:,.0f}", f"{flops / layer / 1e12:.1f}",
                              f"{flops / gemm / 1e12:.1f}", f"{flops / gemm / PEAK_8BIT:.2f}", f"{dense / layer:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
