"""Stability ablation: a deep, narrow llama trained at three learning rates with pre-norm, sandwich
norm, and depth-scaled sandwich norm + TinyInit: loss spikes, grad-norm spikes, final loss, curves.

    python benchmarks/train_stability.py                  # CPU size: d=128, 32 layers, 60 steps
    python benchmarks/train_stability.py --full           # GPU size: d=256, 48 layers, 600 steps, bf16
    python benchmarks/train_stability.py --plot out.png   # loss curves (matplotlib)

Data: the Canterbury books from the brotli sdist on PyPI (benchmarks/train_corpus.py). Every run
sees the same tokens in the same order (same seed). A loss spike is a step whose loss is 10% above
its 20-step moving average, a grad spike one whose grad norm is 2x above it (the trainer's flags).
"held-out" is the mean token loss on the books' held-out 5% after training. Pre-norm and plain sandwich use N(0, 0.02) matrices and embeddings.
The peer is the pre-norm baseline in the same run (the layout of Llama, Qwen and torchtitan's models).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from quadrant.train.config import parse_config
from quadrant.train.trainer import Trainer
from train_corpus import canterbury  # type: ignore[import-not-found]

VARIANTS = {
    "pre-norm": dict(norm_placement="pre"),
    "sandwich": dict(norm_placement="sandwich"),
    "depth-scaled sandwich + TinyInit": dict(norm_placement="depth_scaled_sandwich", tiny_init=True),
}


def run(variant: dict, lr: float, args: argparse.Namespace, train: Path, held: Path, folder: Path) -> dict[str, Any]:
    d, layers = (256, 48) if args.full else (128, 32)
    raw = {
        "model": dict(architecture="llama", vocab_size=49152, hidden_size=d, intermediate_size=int(d * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=d // 32, num_key_value_heads=d // 32,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False, **variant),
        "data": {"sources": {"books": str(train)}},
        "stages": [dict(name="main", steps=args.steps, seq_len=args.seq_len, mixture={"books": 1.0})],
        "optim": dict(lr=lr, warmup_steps=max(1, args.steps // 10), schedule="cosine", grad_clip=1.0),
        "checkpoint": dict(folder=str(folder / "ckpt"), resume=False),
        "train": dict(global_batch=args.batch, dtype="bfloat16" if args.full else "float32", log_every=10**9),
    }
    trainer = Trainer(parse_config(raw), log=lambda _: None)
    records = trainer.run()
    losses = [r.loss for r in records]
    held_loss = trainer.evaluate(str(held), args.seq_len, 64)
    return dict(losses=losses, grad_norms=[r.grad_norm for r in records],
                loss_spikes=sum(r.loss_spike for r in records), grad_spikes=sum(r.grad_spike for r in records),
                final=sum(losses[-5:]) / 5, held=held_loss, diverged=not all(map(lambda x: x == x, losses)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the GPU size (d=256, 48 layers, bf16)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 4e-3, 1.6e-2])
    ap.add_argument("--plot", default=None, help="write the loss curves here (PNG, needs matplotlib)")
    ap.add_argument("--corpus", nargs=2, metavar=("TRAIN", "HELDOUT"), default=None,
                    help="prepared corpora to use instead of fetching the books (machines without a registry)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (600 if args.full else 60)
    args.batch = args.batch or (32 if args.full else 4)
    torch.manual_seed(0)
    train, held = (Path(args.corpus[0]), Path(args.corpus[1])) if args.corpus else canterbury()
    results: dict[tuple[str, float], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            for name, variant in VARIANTS.items():
                folder = Path(tmp) / f"{name}-{lr}".replace(" ", "_")
                results[(name, lr)] = run(variant, lr, args, train, held, folder)
                r = results[(name, lr)]
                print(f"lr {lr:g} {name}: final {r['final']:.3f}, held-out {r['held']:.3f}, "
                      f"spikes {r['loss_spikes']}/{r['grad_spikes']}", flush=True)
    size = "d=256, 48 layers" if args.full else "d=128, 32 layers"
    table = Table(title=f"stability ablation, {size}, {args.steps} steps x {args.batch}x{args.seq_len} tokens "
                        f"({platform.machine()}, {torch.__version__}, {date.today()})")
    for col in ("lr", "variant", "loss spikes", "grad spikes", "max grad norm", "final loss", "held-out loss",
                "vs pre-norm"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for (name, lr), r in results.items():
        base = results[("pre-norm", lr)]["held"]
        table.add_row(f"{lr:g}", name, str(r["loss_spikes"]), str(r["grad_spikes"]), f"{max(r['grad_norms']):.2f}",
                      "diverged" if r["diverged"] else f"{r['final']:.3f}", f"{r['held']:.3f}",
                      f"{r['held'] / base:.3f}")
    Console(width=160).print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, grid = plt.subplots(1, len(args.lrs), figsize=(5 * len(args.lrs), 4), sharey=True, squeeze=False)
        axes = list(grid[0])
        for ax, lr in zip(axes, args.lrs):
            for name in VARIANTS:
                ax.plot(range(1, args.steps + 1), results[(name, lr)]["losses"], label=name)
            ax.set_title(f"lr {lr:g}")
            ax.set_xlabel("step")
        axes[0].set_ylabel("training loss")
        axes[0].legend()
        fig.suptitle(f"stability ablation, {size}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
