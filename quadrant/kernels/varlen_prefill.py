"""Causal flash attention for prefill chunks over the paged cache (varlen, chunked prefill).

The chunk's own K/V are already in the cache (written by kv_store first), so a query at
position p attends to cached positions 0..p of its sequence: the prefix from earlier
chunks or prefix-cache hits, then the chunk itself; a speculative token tree's row attends within
its span by ancestry (per-query bits). One program per (sequence, block of
queries, query head); key tiles beyond the block's last query are never read. Decode
rows (one query) of a mixed batch run here too.
"""

from __future__ import annotations

import torch
from quadrant.kernels.triton_import import require_triton, tl, triton

from quadrant.kernels.attention_tile import attend_kv_tile
from quadrant.kernels.kv_store import check_paged_attention_inputs, dot_dtype, gather_kv


def tree_allowed(bits: torch.Tensor, span_start: int | torch.Tensor, num_k: int) -> torch.Tensor:
    """Boolean [L, S] mask of token-tree queries (True = attend): keys before the span all, keys in it by
    the query's ancestor bits [L] int64 (AttentionMetadata.tree_mask). `span_start`: one row's, or each
    query's [L] (decode rows of different trees). A tree's queries lie in its span, so ancestry implies
    causality."""
    k_pos = torch.arange(num_k, device=bits.device)[None, :]
    start = span_start[:, None] if isinstance(span_start, torch.Tensor) else span_start
    shift = (k_pos - start).clamp(min=0)
    return (((bits[:, None] >> shift) & 1) != 0) | (k_pos < start)


def varlen_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    group: int = 0,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    tree_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D], the last q_len positions of each sequence; returns [T, Hq, D] in fp32 math.
    tree_start [B] / tree_mask [T]: speculative token trees (AttentionMetadata)."""
    num_heads = q.shape[1]
    num_kv, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b in range(len(starts) - 1):
        qs, qe, n = starts[b], starts[b + 1], int(seq_lens[b])
        if qe == qs:
            continue
        blocks = block_tables[b : b + 1, : -(-n // block_size)].long()
        ks = gather_kv(k_cache, k_scale, group, blocks, n, torch.float32)[0]  # [Hk, S, D]
        vs = gather_kv(v_cache, v_scale, group, blocks, n, torch.float32)[0]
        groups = num_heads // num_kv
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = q[qs:qe].float().transpose(0, 1) @ ks.transpose(1, 2) * scale  # [Hq, L, S]
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        q_pos = torch.arange(n - (qe - qs), n, device=q.device)[:, None]
        k_pos = torch.arange(n, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        if tree_start is not None and tree_mask is not None and int(tree_start[b]) < n:
            allowed &= tree_allowed(tree_mask[qs:qe], int(tree_start[b]), n)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _prefill_kernel(
    q, k_cache, v_cache, k_scale, v_scale, block_tables, query_start_loc, seq_lens, out, tree_start, tree_mask,
    sm_scale, softcap, window,
    q_st, q_sh, c_sb, c_sh, c_st, s_sb, s_sh, bt_sb, o_st, o_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, QGROUP: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT: tl.constexpr, TREE: tl.constexpr,
):
    b = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    if mb * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens + b)
        prefix = seq_len - q_len
        kh = h // GROUP
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        q_pos = prefix + m
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        qt = tl.load(q + (q_start + m)[:, None] * q_st + h * q_sh + d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        hi = tl.minimum(seq_len, prefix + (mb + 1) * BLOCK_M)  # keys past the last query are never needed
        # Branch-free: a runtime `if` may not rebind a plain-int variable in compiled Triton.
        lo = tl.where(window > 0, tl.maximum(prefix + mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
        if TREE:  # a token tree's row: keys from its span on are attended by the query's ancestor bits
            span = tl.load(tree_start + b)
            bits = tl.load(tree_mask + q_start + m, mask=m_mask, other=0)  # [BLOCK_M] int64
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < hi
            allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            allowed = allowed & ((window <= 0) | (pos[None, :] > q_pos[:, None] - window))
            if TREE:
                shift = tl.minimum(tl.maximum(pos - span, 0), 63).to(tl.int64)  # (lanes past the keys: >= 64)
                ancestor = ((bits[:, None] >> shift[None, :]) & 1) != 0
                allowed = allowed & (ancestor | (pos < span)[None, :])
            acc, m_i, l_i = attend_kv_tile(acc, m_i, l_i, qt, allowed, k_cache, v_cache, k_scale, v_scale,
                                           block_tables + b * bt_sb, kh, pos, valid, d, d_mask, sm_scale, softcap,
                                           c_sb, c_sh, c_st, s_sb, s_sh, PAGE, QUANT, QGROUP, SOFTCAP, DOT)
        result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + (q_start + m)[:, None] * o_st + h * o_sh + d[None, :], result.to(out.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])


def varlen_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    group: int = 0,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    out: torch.Tensor | None = None,
    tree_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of varlen_prefill_ref; `max_query_len` sizes the grid."""
    require_triton()
    num_tokens, num_heads, dim = q.shape
    num_kv, page = k_cache.shape[1], k_cache.shape[2]
    mode = check_paged_attention_inputs(q, k_cache, v_cache, k_scale, v_scale, group, block_tables=block_tables,
                                        query_start_loc=query_start_loc, seq_lens=seq_lens)
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    # Tiles without register spills on sm_90 at 8 warps (checked with ptxas): head_dim 64 takes
    # 128x64; 128 takes 64x64, or 128x32 when 8-bit K/V need registers to dequantise.
    quantised = mode != 0
    block_m, block_n = (128, 64) if dim <= 64 else (128, 32) if dim <= 128 and quantised else \
        (64, 64) if dim <= 128 else (32, 32)
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    scales = (k_scale, v_scale) if k_scale is not None and v_scale is not None else (k_cache, v_cache)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    tree = tree_start is not None and tree_mask is not None
    if tree_start is not None and tree_mask is not None:
        assert tree_start.shape == (num_seqs,) and tree_mask.shape == (num_tokens,) and tree_mask.dtype == torch.int64
    _prefill_kernel[grid](
        q, k_cache, v_cache, scales[0], scales[1], block_tables, query_start_loc, seq_lens, out,
        tree_start if tree else seq_lens, tree_mask if tree else seq_lens,
        scale, logit_softcap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scales[0].stride(0), scales[0].stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, QUANT=mode, QGROUP=max(group, 1),
        SOFTCAP=logit_softcap is not None, DOT=dot_dtype(q.dtype), TREE=tree,
        num_warps=8, num_stages=2,
    )
    return out
