"""AdamW with decay on matrices only, learning-rate schedules, and the global gradient-norm clip."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from quadrant.train.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D+ weights except embeddings (norm gains, biases and routers' bias keep theirs)."""
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "embed_tokens" not in name else keep).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    # On CUDA the fused kernel (one launch for all parameters, DTensor shards included, as torchtitan
    # runs it); elsewhere the foreach implementation.
    fused = all(p.is_cuda for p in decay + keep)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule's shape."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))
    # wsd: warm-up, stable at lr, then a linear decay over the last decay_fraction of the run.
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    t = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (low - cfg.lr) * t


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None) -> float:
    """Clip gradients to a global norm (DTensor shards included; summed over pipeline stages) and
    return the norm before clipping; max_norm 0 only measures."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        norm = torch.zeros(())
    else:
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()  # a DTensor norm (FSDP2, TP): reduced over its mesh
    if pp_group is not None:
        squared = norm.float() ** 2
        dist.all_reduce(squared, group=pp_group)  # each stage holds different layers
        norm = squared.sqrt()
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
    return float(norm)
