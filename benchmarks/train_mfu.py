"""Training MFU on one GPU: a ~1.1B-parameter llama-shape model (TinyLlama's shape: d=2048, 22 layers,
32 heads, 4 KV heads, FFN 5632, vocab 32000), bf16 autocast with fp32 master weights and AdamW,
torch.compile per layer, sequences of 2048, against transformers' LlamaForCausalLM with the same
shapes, optimizer and precision in the same run, and against the peak (MFU).

    python benchmarks/train_mfu.py                    # the H100 run (one command)
    python benchmarks/train_mfu.py --smoke --device cpu

MFU = tokens/s x FLOPs per token / peak. FLOPs per token = 6 N + 12 L h q S (PaLM appendix B; N the
non-embedding parameters, LM head included); peak: 989 TFLOP/s dense bf16 for H100/H200 SXM. The
tokens are random (no data set on the GPU machine); speed does not depend on them. Floor 40%, goal
55%; torchtitan reports 33-39% for Llama-3-8B on 8xH100, Megatron-LM 41-48%.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from quadrant.train.config import parse_config
from quadrant.train.data import write_corpus
from quadrant.train.trainer import Trainer, flops_per_token, peak_flops

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)


def transformers_peer(shape: dict, seq_len: int, batch: int, steps: int, device: torch.device,
                      compile_model: bool) -> float:
    """tokens/s of transformers' llama: bf16 autocast, fp32 weights, AdamW, same batch."""
    import transformers

    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=seq_len, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    model.train()
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq_len), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch * seq_len / (sum(times[steps // 3 :]) / len(times[steps // 3 :]))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU check of the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)
    shape = SMOKE if args.smoke else SHAPE
    seq_len = args.seq_len or (32 if args.smoke else 2048)
    batch = args.batch or (2 if args.smoke else 4)
    steps = args.steps or (4 if args.smoke else 15)
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    compile_model = not args.no_compile and device.type == "cuda"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gen = np.random.default_rng(0)
        docs = (gen.integers(0, shape["vocab_size"], seq_len * 8, dtype=np.uint32) for _ in range(batch * steps))
        corpus = write_corpus(Path(tmp) / "random", docs, shape["vocab_size"], 0)
        raw = {
            "model": dict(architecture="llama", max_position_embeddings=seq_len, tie_word_embeddings=False, **shape),
            "data": {"sources": {"random": str(corpus)}},
            "stages": [dict(name="mfu", steps=steps, seq_len=seq_len, mixture={"random": 1.0})],
            "optim": dict(lr=1e-4, warmup_steps=1),
            "parallel": dict(compile=compile_model, activation_checkpointing=args.activation_checkpointing),
            "checkpoint": dict(folder=str(Path(tmp) / "ckpt"), save_final=False, resume=False),
            "train": dict(global_batch=batch, dtype=dtype, device=args.device, log_every=1),
        }
        config = parse_config(raw)
        trainer = Trainer(config)
        records = trainer.run()
        flops = flops_per_token(config.model, seq_len, trainer.active_params)
        params = sum(p.numel() for p in trainer.model.parameters())
    steady = records[steps // 3 :]
    ours = sum(r.tokens_per_s for r in steady) / len(steady)
    peak = peak_flops(device, dtype)
    rows.append(dict(workload="quadrant train step", tokens_per_s=ours, mfu=ours * flops / peak))
    if not args.no_peer:
        peer = transformers_peer(shape, seq_len, batch, steps, device, compile_model)
        rows.append(dict(workload="transformers LlamaForCausalLM", tokens_per_s=peer, mfu=peer * flops / peak))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    table = Table(title=f"training MFU, {params / 1e9:.2f}B params, {batch}x{seq_len} tokens/step, {dtype}, "
                        f"compile={compile_model} ({name}, torch {torch.__version__}, {date.today()}); "
                        f"peak {peak / 1e12:.0f} TFLOP/s, {flops / 1e9:.2f} GFLOP/token")
    for col in ("workload", "tokens/s", "MFU", "ratio to quadrant"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in rows:
        table.add_row(r["workload"], f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                      f"{rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x")
    Console(width=160).print(table)
    return rows


if __name__ == "__main__":
    main()
