"""Split-KV paged decode attention (flash-decoding): one query token per sequence.

Each program takes one (sequence, KV head, split): the whole query group of that KV head
is packed into the rows of one tile, so every K/V block is read once for the group. A
sequence's context is cut into chunks of `chunk` tokens; programs past its end exit at
once, so the grid can stay fixed (CUDA graphs) while the chunk length follows the batch.
A second kernel merges the splits by their log-sum-exp. 8-bit caches enter the dots as their
codes; their per-token scales multiply score and probability columns (attention_tile). A row may be
a node of a speculative token tree (verification replayed through the decode graphs): it then
attends to the keys of its tree's span by its ancestor bits (varlen_prefill.tree_allowed).
"""

from __future__ import annotations

import functools

import torch
from quadrant.kernels.triton_import import require_triton, tl, triton

from quadrant.kernels.attention_tile import attend_kv_tile
from quadrant.kernels.kv_store import QUANT_FP8, check_paged_attention_inputs, dot_dtype, gather_kv
from quadrant.kernels.varlen_prefill import tree_allowed

MIN_CHUNK = 128  # tokens: shorter splits cost more in the merge than they win in parallelism
MAX_SPLITS = 32


def plan_splits(seq_lens: list[int], num_kv_heads: int, num_sms: int, min_chunk: int = MIN_CHUNK,
                max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(number of splits, chunk length) for a decode batch.

    Split only to fill the GPU: about two programs per SM over all (sequence, KV head) pairs.
    One chunk length for the whole batch balances it: a long sequence gets many splits, a
    short one few, and every program reads at most `chunk` tokens.
    """
    longest = max(max(seq_lens) if seq_lens else 1, 1)
    wanted = grid_splits(len(seq_lens), num_kv_heads, num_sms, max_splits)
    chunk = max(min_chunk, -(-longest // wanted))
    chunk = -(-chunk // 16) * 16
    return -(-longest // chunk), chunk


def grid_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = MAX_SPLITS) -> int:
    """Splits per (sequence, KV head) that make about two programs per SM."""
    pairs = max(1, num_seqs * num_kv_heads)
    return max(1, min(max_splits, -(-2 * num_sms // pairs)))


# -- reference ---------------------------------------------------------------------------------
def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
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
    """q: [B, Hq, D]; caches [num_blocks, Hk, block_size, D]; returns [B, Hq, D], computed in fp32.
    tree_start [B] int32 / tree_mask [B] int64: rows of token trees (AttentionMetadata)."""
    bsz, num_heads, _ = q.shape
    num_kv, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(bsz):
        n = int(seq_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b : b + 1, : -(-n // block_size)].long()
        lo = max(0, n - sliding_window) if sliding_window else 0
        ks = gather_kv(k_cache, k_scale, group, blocks, n, torch.float32)[0, :, lo:]  # [Hk, S, D]
        vs = gather_kv(v_cache, v_scale, group, blocks, n, torch.float32)[0, :, lo:]
        qg = q[b].float().view(num_kv, num_heads // num_kv, -1)  # [Hk, G, D]
        scores = qg @ ks.transpose(1, 2) * scale  # [Hk, G, S]
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        if tree_start is not None and tree_mask is not None:
            allowed = tree_allowed(tree_mask[b : b + 1].long(), int(tree_start[b]), n)[0, lo:]  # [S]
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = (scores.softmax(-1) @ vs).reshape(num_heads, -1).to(q.dtype)
    return out


# -- Triton ------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, chunk_ptr, out, part_out, part_lse,
    tree_start, tree_mask, sm_scale, softcap, window,
    q_sb, q_sh, c_sb, c_sh, c_st, s_sb, s_sh, bt_sb, o_sb, o_sh, p_sb, p_sh, p_ss,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, QGROUP: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT: tl.constexpr, SINGLE: tl.constexpr, CONV: tl.constexpr, TREE: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    # Branch-free: a runtime `if` may not rebind a plain-int variable in compiled Triton.
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    chunk = tl.load(chunk_ptr)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    heads = kh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    qt = tl.load(q + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                 other=0.0)  # [BLOCK_G, BLOCK_D]: the query group of this KV head
    if CONV != 0:
        # fp16 dots over 8-bit codes: the query takes the softmax scale first, which keeps it far
        # inside fp16's range (and fp16 holds more of its digits than bf16 does)
        qt = (qt.to(tl.float32) * sm_scale).to(tl.float16)
        sm_scale = 1.0
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if TREE:  # a token tree's node: keys from its span on are attended by its ancestor bits
        span = tl.load(tree_start + b)
        bits = tl.load(tree_mask + b)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        allowed = valid
        if TREE:
            shift = tl.minimum(tl.maximum(pos - span, 0), 63).to(tl.int64)  # (lanes past the keys: >= 64)
            allowed = valid & ((((bits >> shift) & 1) != 0) | (pos < span))
        acc, m_i, l_i = attend_kv_tile(acc, m_i, l_i, qt, allowed[None, :], k_cache, v_cache, k_scale, v_scale,
                                       block_tables + b * bt_sb, kh, pos, valid, d, d_mask, sm_scale, softcap,
                                       c_sb, c_sh, c_st, s_sb, s_sh, PAGE, QUANT, QGROUP, SOFTCAP,
                                       tl.float16 if CONV != 0 else DOT, CONV)
    has = l_i > 0
    result = acc / tl.where(has, l_i, 1.0)[:, None]
    mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE:
        tl.store(out + b * o_sb + heads[:, None] * o_sh + d[None, :], result.to(out.dtype.element_ty), mask=mask)
    else:
        base = b * p_sb + heads * p_sh + split * p_ss
        tl.store(part_out + base[:, None] * HEAD_DIM + d[None, :], result, mask=mask)
        tl.store(part_lse + base, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=g_mask)


@triton.jit
def _merge_splits_kernel(part_out, part_lse, out, num_splits, p_sb, p_sh, o_sb, o_sh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    base = b * p_sb + h * p_sh + s
    lse = tl.load(part_lse + base, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))  # [BLOCK_S]
    parts = tl.load(part_out + base[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
    total = tl.sum(w, axis=0)
    result = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * o_sb + h * o_sh + d, result.to(out.dtype.element_ty), mask=d_mask)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    chunk: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    group: int = 0,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    out: torch.Tensor | None = None,
    tile: tuple[int, int, int] | None = None,
    convert: int | None = None,
    tree_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_decode_ref. `num_splits` and `chunk` ([1] int32 on q's device) come
    from plan_splits: the grid has `num_splits` programs per (sequence, KV head), each reading at
    most `chunk` tokens; num_splits * chunk must cover the longest context. `tile`: (tokens per
    tile, warps, pipeline stages) instead of decode_tile's choice, `convert` (CONVERSIONS) instead of
    decode_conversion's: benchmarks sweep both. `tree_start` [B] int32 / `tree_mask` [B] int64: rows
    that are token-tree nodes (AttentionMetadata); other rows' spans start at or past their length."""
    require_triton()
    bsz, num_heads, dim = q.shape
    num_kv, page = k_cache.shape[1], k_cache.shape[2]
    mode = check_paged_attention_inputs(q, k_cache, v_cache, k_scale, v_scale, group, block_tables=block_tables,
                                        seq_lens=seq_lens, chunk=chunk)
    assert num_splits >= 1
    out = torch.empty_like(q) if out is None else out
    groups = num_heads // num_kv
    block_d = triton.next_power_of_2(dim)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(bsz, num_heads, num_splits, dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(bsz, num_heads, num_splits, dtype=torch.float32, device=q.device)
    scales = (k_scale, v_scale) if k_scale is not None and v_scale is not None else (k_cache, v_cache)
    block_n, warps, stages = tile or decode_tile(page, k_cache.element_size(), q.device)
    conv = decode_conversion(mode, q.device, q.dtype) if convert is None else convert
    if conv and (mode == 0 or triton.knobs.runtime.interpret):
        raise ValueError("fp16 conversions of the codes are for 8-bit caches on the GPU")
    tree = tree_start is not None and tree_mask is not None
    if tree_start is not None and tree_mask is not None:
        assert tree_start.shape == (bsz,) and tree_mask.shape == (bsz,) and tree_mask.dtype == torch.int64
    _decode_split_kernel[(bsz, num_kv, num_splits)](
        q, k_cache, v_cache, scales[0], scales[1], block_tables, seq_lens, chunk, out, part_out, part_lse,
        tree_start if tree else seq_lens, tree_mask if tree else seq_lens, scale, logit_softcap or 0.0,
        sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scales[0].stride(0), scales[0].stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        num_heads * num_splits, num_splits, 1,
        GROUP=groups, BLOCK_G=max(16, triton.next_power_of_2(groups)), HEAD_DIM=dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=block_n, QUANT=mode, QGROUP=max(group, 1),
        SOFTCAP=logit_softcap is not None, DOT=dot_dtype(q.dtype), SINGLE=single, CONV=conv,
        TREE=tree, num_warps=warps, num_stages=stages,
    )
    if not single:
        _merge_splits_kernel[(bsz, num_heads)](
            part_out, part_lse, out, num_splits, num_heads * num_splits, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out


def decode_tile(page: int, element_size: int, device: torch.device | None = None) -> tuple[int, int, int]:
    """(tokens per tile, warps, pipeline stages) of the split kernel, from an H100 sweep (BENCHMARKS.md).
    A 16-bit cache: 64 tokens, 8 warps (no register spills at head_dim 128 on sm_90). An 8-bit cache:
    128 tokens (the same bytes in flight), 4 warps and 3 stages: 1.05-1.27x over 8 warps and 2 stages.
    Three stages of 128-token tiles need Hopper's shared memory; older GPUs take two."""
    if element_size >= 2:
        return max(16, min(64, page * 4)), 8, 2
    hopper = device is not None and device.type == "cuda" and _capability_major(device.index) >= 9
    return max(16, min(128, page * 8)), 4, 3 if hopper else 2


@functools.lru_cache(maxsize=None)
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


# How an 8-bit cache's codes become dot operands: 0, converted to the activations' dtype by Triton's
# casts; 1, to fp16 by its casts (fp8 e4m3 -> fp16 is one native instruction per pair, where -> bf16
# goes through fp32); 2, to fp16 with integer and fp16x2 instructions (kv_store.codes_to_f16).
CONVERSIONS = (0, 1, 2)


def decode_conversion(mode: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> int:
    """The conversion the split kernel uses for a cache of quantisation `mode` on `device` under `dtype`
    activations: on an H100, fp16 dots for fp8 (1.05-1.18x), the activations' dtype for int8 (fp16
    won at one of four shapes); fp32 activations keep fp32 dots."""
    if device.type != "cuda" or triton.knobs.runtime.interpret or dtype == torch.float32:
        return 0
    return 1 if mode == QUANT_FP8 else 0


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a nominal count off the GPU, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
