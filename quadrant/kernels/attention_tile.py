"""The inner step both attention kernels share: one tile of cached keys and values, online softmax.

Reads the tile's K and V through the block table (8-bit codes with their per-token scales), scores the
query rows against it, and folds it into the running (acc, row max, row sum) with the
usual rescaling; rows with nothing allowed yet stay at zero instead of NaN.
"""

from __future__ import annotations

from quadrant.kernels.kv_store import codes_to_f16, dot_as, load_kv_scales, load_kv_tile
from quadrant.kernels.triton_import import tl, triton


@triton.jit
def attend_kv_tile(acc, m_i, l_i, qt, allowed, k_cache, v_cache, k_scale, v_scale, table_row, kh, pos, valid,
                   d, d_mask, sm_scale, softcap, c_sb, c_sh, c_st, s_sb, s_sh,
                   PAGE: tl.constexpr, QUANT: tl.constexpr, QGROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                   DOT: tl.constexpr, CONV: tl.constexpr = 0):
    """qt [M, D] against the keys at positions `pos` [N] (`allowed` [M, N] or [1, N]) -> (acc, m_i, l_i).
    CONV 2: 8-bit codes become the fp16 dot operands through codes_to_f16 (DOT must be fp16)."""
    page = tl.load(table_row + pos // PAGE, mask=valid, other=0)
    offset = pos % PAGE
    kt = load_kv_tile(k_cache, page, kh, offset, d, valid, d_mask, c_sb, c_sh, c_st)
    if CONV == 2:
        kt = codes_to_f16(kt, QUANT)
    s = dot_as(qt, tl.trans(kt), DOT)  # [M, N]
    if QUANT != 0:
        # A scale covers whole tokens, so it scales a score column (and below, a probability
        # column) instead of every element of the tile: the dots take the 8-bit codes as stored,
        # converted once, and the tile is never dequantised.
        s = s * load_kv_scales(k_scale, page, kh, offset, valid, s_sb, s_sh, QGROUP)[None, :]
    s = s * sm_scale
    if SOFTCAP:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # tanh through exp: not in every tl
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = load_kv_tile(v_cache, page, kh, offset, d, valid, d_mask, c_sb, c_sh, c_st)
    if CONV == 2:
        vt = codes_to_f16(vt, QUANT)
    if QUANT != 0:
        # Relative to the tile's largest scale: p * scale itself (an fp8 scale is amax / 448, often
        # ~1e-4) would sink into fp16's subnormals; p * (scale / max) stays in [0, 1] as plain p does.
        vs = load_kv_scales(v_scale, page, kh, offset, valid, s_sb, s_sh, QGROUP)
        top = tl.maximum(tl.max(vs, axis=0), 1e-30)
        acc = acc * alpha[:, None] + dot_as(p * (vs / top)[None, :], vt, DOT) * top
    else:
        acc = acc * alpha[:, None] + dot_as(p, vt, DOT)
    return acc, m_new, l_i
