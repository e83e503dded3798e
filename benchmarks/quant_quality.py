"""Weight formats: perplexity, size and CPU decode speed against the unquantised model and llama.cpp.

    python benchmarks/quant_quality.py [--model smollm2:135m] [--moe DIR] [--find-links DIR] [--no-speed]

For each format (`quadrant quantize` into a temporary folder, then loaded back), on the
default model (its Q4_1 weights dequantised to fp32 are the unquantised reference, so the
4-bit rows quantise a second time: with groups of 32 the grid is Q4_1's own) and optionally on an upcycled MoE folder (`--moe`):
perplexity on benchmarks/data/alice_ch1-2.txt (public domain; see its README) scored in
128-token chunks through the engine, the change against the reference, the weights' size
on disk, and batch-1 decode tokens/s. llama.cpp decodes the same GGUF in the same run.
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quadrant.benchmark import run_benchmark
from quadrant.engine.engine import LLMEngine
from quadrant.evaluate import score_tokens
from quadrant.loader import store
from quadrant.quant.quantize import QUANT_FORMATS, quantize_model

TEXT = Path(__file__).parent / "data" / "alice_ch1-2.txt"
FLOORS = {"int8": 1.0, "w8a8": 1.0, "w4a16": 6.0, "w4a8": 6.0}  # allowed perplexity increase, %


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size


def perplexity(model: str, weight_format: str, tokens: int, text: Path = TEXT) -> float:
    engine = LLMEngine.from_model(model, weight_format=weight_format)
    ids = engine.require_tokenizer().encode(text.read_text())[: tokens or None]  # 0: the whole text
    ppl = score_tokens(engine, ids).perplexity
    del engine
    gc.collect()
    return ppl


def decode_speed(model: str, weight_format: str) -> float:
    r = run_benchmark(model, prompt_tokens=16, decode_tokens=64, concurrency=1,
                      engine_kwargs={"weight_format": weight_format}, progress=False)
    return r.decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--moe", default=None, help="an upcycled MoE folder (quadrant upcycle) to measure too")
    ap.add_argument("--moe-only", action="store_true", help="measure only the --moe folder")
    ap.add_argument("--formats", nargs="+", default=list(QUANT_FORMATS), choices=QUANT_FORMATS)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the text scored (0: all of it)")
    ap.add_argument("--text", type=Path, default=TEXT, help="the text scored (benchmarks/data: alice_ch1-2.txt, "
                                                            "or alice_ch5-6.txt, a second held-out sample)")
    ap.add_argument("--group-sizes", nargs="+", type=int, default=[128, 32], help="4-bit group sizes to measure")
    ap.add_argument("--smoothing", default="auto", help="SmoothQuant for w8a8/w4a8: auto, off or a strength")
    ap.add_argument("--method", default="auto", choices=["auto", "gptq", "rtn"], help="4-bit rounding")
    ap.add_argument("--rotate", default="auto", choices=["auto", "on", "off"], help="residual-stream rotation")
    ap.add_argument("--tune-steps", type=int, default=None, help="4-bit end-to-end tuning steps (0: off; default: auto)")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed runs")
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    args = ap.parse_args()

    table = Table(title=f"weight formats on {args.text.name} ({args.tokens or 'all'} tokens), {platform.machine()}, "
                        f"{torch.get_num_threads()} threads, {date.today()}")
    for col in ("model", "format", "perplexity", "vs unquantised", "floor", "weights on disk", "decode tok/s",
                "vs llama.cpp"):
        table.add_column(col, justify="right")
    peer = None
    if not args.no_speed:
        from cpu_vs_llamacpp import bench_llama_cpp, ensure_llama_cpp  # benchmarks/ is on sys.path

        gguf = store.resolve(args.model, pull_missing=True)
        peer = bench_llama_cpp(ensure_llama_cpp(args.find_links), str(gguf), torch.get_num_threads(), 16, 64, 3)["decode"]
        table.add_row(args.model, "llama.cpp (GGUF as shipped)", "-", "-", "-", f"{folder_bytes(gguf) / 2**20:.0f} MiB",
                      f"{peer:.1f}", "1.00x")
    models = [] if args.moe_only else [(args.model, store.resolve(args.model, pull_missing=True))]
    if args.moe:
        models.append((Path(args.moe).name, Path(args.moe)))
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models:
            base = perplexity(str(path), "dense", args.tokens, args.text)
            size = folder_bytes(path)
            speed = None if args.no_speed else decode_speed(str(path), "dense")
            table.add_row(label, "unquantised (fp32)", f"{base:.3f}", "-", "-", f"{size / 2**20:.0f} MiB (source)",
                          "-" if speed is None else f"{speed:.1f}",
                          "-" if speed is None or not peer else f"{speed / peer:.2f}x")
            runs = [(fmt, g) for fmt in args.formats for g in (args.group_sizes if fmt.startswith("w4") else [0])]
            for fmt, group in runs:
                out = Path(tmp) / f"{label}-{fmt}-{group}"
                quantize_model(str(path), fmt, out, allow_requantize=True, progress=False, group_size=group or 128,
                               smoothing=None if args.smoothing == "off" else
                               args.smoothing if args.smoothing == "auto" else float(args.smoothing),
                               method=args.method, rotate=args.rotate,
                               tune_steps=args.tune_steps if fmt.startswith("w4") else None)
                ppl = perplexity(str(out), fmt, args.tokens, args.text)
                change = 100 * (ppl / base - 1)
                speed = None if args.no_speed else decode_speed(str(out), fmt)
                name = f"{fmt} (g{group})" if group else fmt
                print(f"{label} {name}: perplexity {ppl:.3f} ({change:+.2f}% vs {base:.3f})", flush=True)  # as it comes
                table.add_row(label, name, f"{ppl:.3f}", f"{change:+.2f}%",
                              ("ok" if change <= FLOORS[fmt] else "OVER") + f" (<= +{FLOORS[fmt]:.0f}%)",
                              f"{folder_bytes(out) / 2**20:.0f} MiB", "-" if speed is None else f"{speed:.1f}",
                              "-" if speed is None or not peer else f"{speed / peer:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
