"""Attention backends. `torch_attention` is the reference and the CPU path.

It gathers each sequence's K/V from its cache blocks and runs SDPA with a
causal (and sliding-window) mask offset by the cached prefix. Without a cache
(training, scoring) each sequence attends causally to its own new tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from quadrant.layers.attention import Attention, AttentionMetadata


def torch_attention(
    layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: "AttentionMetadata"
) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = meta.query_start_loc_cpu
    use_cache = layer.kv_cache is not None and meta.block_tables is not None
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        qs, qe = starts[i], starts[i + 1]
        if qe == qs:
            continue
        if use_cache:
            k_ctx, v_ctx = _gather_context(layer, meta.block_tables[i], seq_len)  # type: ignore[index]
        else:
            k_ctx, v_ctx = k[qs:qe], v[qs:qe]
        out[qs:qe] = _attend(layer, q[qs:qe], k_ctx.to(q.dtype), v_ctx.to(q.dtype))
    return out


def _gather_context(layer: "Attention", block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache, v_cache = layer.kv_cache  # type: ignore[misc]
    block_size = k_cache.shape[1]
    blocks = block_table[: (seq_len + block_size - 1) // block_size]
    k_ctx = k_cache[blocks].flatten(0, 1)[:seq_len]  # [S, Hk, D]
    v_ctx = v_cache[blocks].flatten(0, 1)[:seq_len]
    return k_ctx, v_ctx


def _attend(layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [L, Hq, D] for the last L positions of a context of S keys k/v: [S, Hk, D]."""
    num_q, num_k = q.shape[0], k.shape[0]
    mask = _mask(num_q, num_k, layer.sliding_window, q.device)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, L|S, D]
    if layer.logit_softcap is None:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=layer.scale, enable_gqa=layer.num_heads != layer.num_kv_heads
        )
    else:
        groups = layer.num_heads // layer.num_kv_heads
        kh, vh = kh.repeat_interleave(groups, 0), vh.repeat_interleave(groups, 0)
        scores = (qh.float() @ kh.float().transpose(1, 2)) * layer.scale
        scores = torch.tanh(scores / layer.logit_softcap) * layer.logit_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ vh.float()).to(q.dtype)
    return out.transpose(0, 1)


def _mask(num_q: int, num_k: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [L, S] mask (True = attend) for queries at positions S-L .. S-1; None if all-true."""
    if num_q == 1 and (window is None or num_k <= window):
        return None
    q_pos = torch.arange(num_k - num_q, num_k, device=device).unsqueeze(1)
    k_pos = torch.arange(num_k, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
