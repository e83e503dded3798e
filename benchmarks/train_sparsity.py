"""Sparsity: a small MoE against a dense model with the same activated parameters and one with
several times more, trained on the same tokens.

    python benchmarks/train_sparsity.py [--steps 150] [--full]

The three models share attention, width and depth; they differ in the FFN. dense-1x: one SwiGLU
FFN of width F. MoE: 8 experts of width F/2, top-2 (the same activated FFN parameters as dense-1x,
4x the total), with aux-loss-free balancing (the expert-load column: the busiest expert's tokens over
the mean, worst layer, last step; 4.00 is total collapse). dense-4x: one FFN of width 4F (the MoE's total).
Data: the Canterbury books from the brotli sdist (benchmarks/train_corpus.py); the held-out loss is
on the books' held-out 5%. The seeds report a MoE beating a dense model of 7x its activated
parameters; here the question is where the MoE lands between dense-1x and dense-4x.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quadrant.train.config import parse_config
from quadrant.train.trainer import Trainer
from train_corpus import canterbury  # type: ignore[import-not-found]


def models(d: int, ffn: int) -> dict[str, dict]:
    return {
        "dense-1x": dict(intermediate_size=ffn),
        "MoE 8x(F/2) top-2": dict(architecture="mixtral", intermediate_size=ffn // 2, num_experts=8,
                                  num_experts_per_tok=2, router_bias=True, norm_topk_prob=True),
        "dense-4x": dict(intermediate_size=4 * ffn),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU size: d=512, 8 layers, 2000 steps, bf16")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bias-speed", type=float, default=1e-2,
                    help="aux-loss-free balancing step (DeepSeek-V3 uses 1e-3 over far longer runs)")
    ap.add_argument("--balance-loss", type=float, default=0.0, help="sequence-level balance loss weight")
    ap.add_argument("--corpus", nargs=2, metavar=("TRAIN", "HELDOUT"), default=None,
                    help="prepared corpora to use instead of fetching the books (machines without a registry)")
    args = ap.parse_args(argv)
    d, layers = (512, 8) if args.full else (128, 4)
    steps, batch = args.steps or (2000 if args.full else 150), args.batch or (32 if args.full else 8)
    ffn = 2 * d
    train, held = (Path(args.corpus[0]), Path(args.corpus[1])) if args.corpus else canterbury()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ffn_fields in models(d, ffn).items():
            raw = {
                "model": dict({"architecture": "llama"}, vocab_size=49152, hidden_size=d, num_hidden_layers=layers,
                              num_attention_heads=d // 32, num_key_value_heads=d // 32, tie_word_embeddings=True,
                              max_position_embeddings=args.seq_len, norm_placement="depth_scaled_sandwich",
                              tiny_init=True, embed_std=0.5) | ffn_fields,
                "data": {"sources": {"books": str(train)}},
                "stages": [dict(name="main", steps=steps, seq_len=args.seq_len, mixture={"books": 1.0})],
                "optim": dict(lr=args.lr, warmup_steps=steps // 10, schedule="cosine"),
                "moe": dict(bias_update_speed=args.bias_speed, balance_loss_weight=args.balance_loss),
                "checkpoint": dict(folder=str(Path(tmp) / name.split()[0] / "ckpt"), resume=False),
                "train": dict(global_batch=batch, dtype="bfloat16" if args.full else "float32", log_every=10**9),
            }
            trainer = Trainer(parse_config(raw), log=lambda _: None)
            ffn_params = sum(p.numel() for n, p in trainer.model.named_parameters() if ".mlp." in n)
            active = ffn_params * (2 / 8 if "MoE" in name else 1)
            records = trainer.run()
            held_loss = trainer.evaluate(str(held), args.seq_len, 64)
            final = sum(r.loss for r in records[-10:]) / 10
            load = records[-1].expert_load
            rows.append((name, ffn_params, active, final, held_loss, load))
            print(f"{name}: train {final:.3f}, held-out {held_loss:.3f}", flush=True)
    table = Table(title=f"sparsity, d={d}, {layers} layers, {steps} steps x {batch}x{args.seq_len} tokens, "
                        f"bias step {args.bias_speed:g}, balance loss {args.balance_loss:g} "
                        f"({platform.machine()}, torch {torch.__version__}, {date.today()})")
    for col in ("model", "FFN params", "activated FFN params", "train loss (last 10)", "held-out loss",
                "vs dense-1x", "expert load max/mean"):
        table.add_column(col, justify="left" if col == "model" else "right")
    base = rows[0][4]
    for name, total, active, final, held_loss, load in rows:
        table.add_row(name, f"{total / 1e6:.2f}M", f"{active / 1e6:.2f}M", f"{final:.3f}", f"{held_loss:.3f}",
                      f"{held_loss - base:+.3f}", "-" if load is None else f"{load:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
