"""Attention backends: each writes a step's K/V into the paged cache and attends over it.

`TorchBackend` is the reference and the CPU path. Decode tokens (one query each) of the
whole batch run together: their K/V blocks are gathered into one padded [B, Hk, S, D]
tensor and attended with grouped-query matmuls under a length (and sliding-window) mask;
on an fp32 CPU cache the native kernel (kernels/csrc/paged_decode.c) reads the blocks in
place instead.
Prefill chunks run one sequence at a time through SDPA, causal with the mask offset by the
cached prefix, or by ancestry within a speculative token tree. Without a cache (training,
scoring) each sequence attends causally to its own tokens. 8-bit caches are dequantised as they are gathered.

`TritonBackend` (CUDA; CPU under the interpreter) runs kernels/: split-KV paged decode for
decode-only batches, varlen flash prefill for everything else, quantise-on-write stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quadrant.kernels.kv_store import gather_kv, store_kv_ref
from quadrant.kernels.varlen_prefill import tree_allowed, varlen_prefill

if TYPE_CHECKING:
    from quadrant.layers.attention import Attention, AttentionMetadata, LayerKVCache


class TorchBackend:
    name = "torch"

    def store(self, kv: "LayerKVCache", k: torch.Tensor, v: torch.Tensor, meta: "AttentionMetadata") -> None:
        if kv.k_scale is not None:
            store_kv_ref(k, v, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale, kv.group)  # type: ignore[arg-type]
            return
        if k.dtype != kv.k.dtype:
            k, v = k.to(kv.k.dtype), v.to(kv.v.dtype)
        index = (meta.slot_block, slice(None), meta.slot_offset)
        kv.k[index] = k  # [T, Hk, D] into each token's (block, all heads, offset)
        kv.v[index] = v

    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: "AttentionMetadata") -> torch.Tensor:
        return torch_attention(layer, q, k, v, meta)


class TritonBackend:
    name = "triton"

    def store(self, kv: "LayerKVCache", k: torch.Tensor, v: torch.Tensor, meta: "AttentionMetadata") -> None:
        from quadrant.kernels.kv_store import store_kv

        store_kv(  # the kernel casts (or quantises) to the cache's dtype as it writes
            k, v, kv.k, kv.v, meta.slot_mapping, kv.k_scale, kv.v_scale, kv.group)  # type: ignore[arg-type]

    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: "AttentionMetadata") -> torch.Tensor:
        kv = layer.kv_cache
        if kv is None or meta.block_tables is None:
            return torch_attention(layer, q, k, v, meta)  # packed sequences without a cache
        window, softcap = layer.sliding_window, layer.logit_softcap
        if meta.decode_chunk is not None:
            from quadrant.kernels.paged_decode import paged_decode

            return paged_decode(q, kv.k, kv.v, meta.block_tables, meta.seq_lens, layer.scale,
                                meta.decode_num_splits, meta.decode_chunk, kv.k_scale, kv.v_scale, kv.group,
                                window, softcap, tree_start=meta.tree_start, tree_mask=meta.tree_mask)
        return varlen_prefill(q, kv.k, kv.v, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                              meta.max_query_len, layer.scale, kv.k_scale, kv.v_scale, kv.group, window, softcap,
                              tree_start=meta.tree_start, tree_mask=meta.tree_mask)


TORCH_BACKEND = TorchBackend()
TRITON_BACKEND = TritonBackend()


def torch_attention(
    layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: "AttentionMetadata"
) -> torch.Tensor:
    starts = meta.query_start_loc_cpu
    use_cache = layer.kv_cache is not None and meta.block_tables is not None
    num_seqs = meta.num_seqs
    if use_cache and meta.max_query_len == 1:  # (tree rows here: compiled CPU verification, a row per token)
        return _paged_decode(layer, q, meta.block_tables, meta.seq_lens, meta.max_seq_len,  # type: ignore[arg-type]
                             meta.padded_decode, meta.tree_start, meta.tree_mask)
    if not use_cache and num_seqs > 1 and layer.sliding_window is None and layer.logit_softcap is None:
        lengths = {b - a for a, b in zip(starts, starts[1:])}
        if len(lengths) == 1:  # equal-length sequences (training rows): one batched causal call
            return _attend_equal(layer, q, k, v, num_seqs)
    out = torch.empty_like(q)
    # Decodes first in a batch (the scheduler puts running requests first): attend them together.
    num_decodes = 0
    if use_cache:
        while num_decodes < num_seqs and starts[num_decodes + 1] - starts[num_decodes] == 1:
            num_decodes += 1
        if num_decodes > 1:
            tree_start = meta.tree_start[:num_decodes] if meta.tree_start is not None else None
            tree_mask = meta.tree_mask[:num_decodes] if meta.tree_mask is not None else None  # one token a row
            out[:num_decodes] = _paged_decode(layer, q[:num_decodes], meta.block_tables[:num_decodes],  # type: ignore[index]
                                              meta.seq_lens[:num_decodes], max(meta.seq_lens_cpu[:num_decodes]),
                                              tree_start=tree_start, tree_mask=tree_mask)
        else:
            num_decodes = 0
    spans = meta.tree_start_cpu if use_cache else None
    for i in range(num_decodes, num_seqs):
        qs, qe = starts[i], starts[i + 1]
        if qe == qs:
            continue
        seq_len = meta.seq_lens_cpu[i]
        if use_cache:
            k_ctx, v_ctx = _gather_context(layer, meta.block_tables[i], seq_len, q.dtype)  # type: ignore[index]
        else:
            k_ctx, v_ctx = k[qs:qe].transpose(0, 1).to(q.dtype), v[qs:qe].transpose(0, 1).to(q.dtype)
        tree = None
        if spans is not None and spans[i] < seq_len:
            assert meta.tree_mask is not None
            tree = tree_allowed(meta.tree_mask[qs:qe], spans[i], seq_len)
        out[qs:qe] = _attend(layer, q[qs:qe], k_ctx, v_ctx, tree)
    return out


def _attend_equal(layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Causal attention of num_seqs equal-length sequences packed back to back, in one SDPA call
    (the flash kernel on the GPU). q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq, D]."""
    num_tokens, num_heads, dim = q.shape
    seq = num_tokens // num_seqs

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(num_seqs, seq, t.shape[1], dim).transpose(1, 2).to(q.dtype)  # [B, H, L, D]

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                         scale=layer.scale, enable_gqa=layer.num_heads != layer.num_kv_heads)
    return out.transpose(1, 2).reshape(num_tokens, num_heads, dim)


def _gather_context(layer: "Attention", block_table: torch.Tensor, seq_len: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's cached K and V, each [Hk, S, D]."""
    kv = layer.kv_cache
    assert kv is not None
    blocks = block_table[None, : (seq_len + kv.block_size - 1) // kv.block_size]
    return (gather_kv(kv.k, kv.k_scale, kv.group, blocks, seq_len, dtype)[0],
            gather_kv(kv.v, kv.v_scale, kv.group, blocks, seq_len, dtype)[0])


def _paged_decode(layer: "Attention", q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  max_seq_len: int, padded: bool = False, tree_start: torch.Tensor | None = None,
                  tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D]; returns [B, Hq, D]. tree_start / tree_mask [B]: rows of
    speculative token trees attend within their tree by ancestry (AttentionMetadata)."""
    kv = layer.kv_cache
    assert kv is not None
    if kv.native_decode and q.dtype == torch.float32 and layer.logit_softcap is None and layer.sliding_window is None:
        from quadrant.kernels.cpu_native import paged_decode, paged_decode_op

        native = paged_decode_op if torch.compiler.is_compiling() else paged_decode
        return native(q, kv.k, kv.v, block_tables, seq_lens, layer.scale, tree_start, tree_mask)
    bsz, num_heads, dim = q.shape
    num_kv, block_size = kv.k.shape[1], kv.block_size
    width = (max_seq_len + block_size - 1) // block_size
    tables = block_tables[:, :width]
    # [B, Hk, S, D]; one sequence needs no padding, so slice it to its length and skip the mask.
    span = max_seq_len if bsz == 1 and not padded else width * block_size
    k = gather_kv(kv.k, kv.k_scale, kv.group, tables, span, q.dtype)
    v = gather_kv(kv.v, kv.v_scale, kv.group, tables, span, q.dtype)
    qg = q.view(bsz, num_kv, num_heads // num_kv, dim)  # [B, Hk, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(layer.scale)  # [B, Hk, G, S]
    if layer.logit_softcap is not None:
        scores = torch.tanh(scores / layer.logit_softcap) * layer.logit_softcap
    if bsz > 1 or padded or layer.sliding_window is not None or tree_start is not None:
        pos = torch.arange(span, device=q.device)
        valid = pos[None, :] < seq_lens[:, None]  # [B, S]
        if layer.sliding_window is not None:
            valid &= pos[None, :] > (seq_lens[:, None] - 1 - layer.sliding_window)
        if tree_start is not None and tree_mask is not None:
            valid &= tree_allowed(tree_mask, tree_start, span)
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, Hk, G, D]
    return out.view(bsz, num_heads, dim)


def _attend(layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            tree: torch.Tensor | None = None) -> torch.Tensor:
    """q: [L, Hq, D] for the last L positions of a context of S keys k/v: [Hk, S, D]; `tree`: a token
    tree row's [L, S] mask instead of the causal one (kernels/varlen_prefill.tree_allowed)."""
    num_q, num_k = q.shape[0], k.shape[1]
    window = layer.sliding_window
    # A whole sequence (no cached prefix) is plain causal: `is_causal` instead of an [L, S] mask.
    plain_causal = num_q == num_k > 1 and (window is None or window >= num_k) and tree is None
    mask = tree if tree is not None else None if plain_causal else _mask(num_q, num_k, window, q.device)
    qh, kh, vh = q.transpose(0, 1), k, v  # [H, L|S, D]
    if layer.logit_softcap is None:
        # 4-D: SDPA's CPU flash kernel takes only batched inputs; 3-D ones (or a mask where is_causal
        # would do) go to its math path, which made CPU prefill 1.75-2.1x slower (BENCHMARKS.md).
        out = F.scaled_dot_product_attention(
            qh[None], kh[None], vh[None], attn_mask=mask, is_causal=plain_causal, scale=layer.scale,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )[0]
    else:
        groups = layer.num_heads // layer.num_kv_heads
        kh, vh = kh.repeat_interleave(groups, 0), vh.repeat_interleave(groups, 0)
        scores = (qh.float() @ kh.float().transpose(1, 2)) * layer.scale
        scores = torch.tanh(scores / layer.logit_softcap) * layer.logit_softcap
        if plain_causal:
            mask = _mask(num_q, num_k, window, q.device)
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
