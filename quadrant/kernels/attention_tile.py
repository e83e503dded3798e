"""The inner step both attention kernels share: one tile of cached keys and values, online softmax.

Reads the tile's K and V through the block table (dequantising 8-bit caches), scores the
query rows against it, and folds it into the running (acc, row max, row sum) with the
usual rescaling; rows with nothing allowed yet stay at zero instead of NaN.
"""

from __future__ import annotations

from quadrant.kernels.kv_store import dot_as, load_kv_tile
from quadrant.kernels.triton_import import tl, triton


@triton.jit
def attend_kv_tile(acc, m_i, l_i, qt, allowed, k_cache, v_cache, k_scale, v_scale, table_row, kh, pos, valid,
                   d, d_mask, sm_scale, softcap, c_sb, c_sh, c_st, s_sb, s_sh,
                   PAGE: tl.constexpr, QUANT: tl.constexpr, QGROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                   DOT: tl.constexpr):
    """qt [M, D] against the keys at positions `pos` [N] (`allowed` [M, N] or [1, N]) -> (acc, m_i, l_i)."""
    page = tl.load(table_row + pos // PAGE, mask=valid, other=0)
    offset = pos % PAGE
    kt = load_kv_tile(k_cache, k_scale, page, kh, offset, d, valid, d_mask, c_sb, c_sh, c_st, s_sb, s_sh,
                      QUANT, QGROUP)
    s = dot_as(qt, tl.trans(kt), DOT) * sm_scale  # [M, N]
    if SOFTCAP:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # tanh through exp: not in every tl
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    vt = load_kv_tile(v_cache, v_scale, page, kh, offset, d, valid, d_mask, c_sb, c_sh, c_st, s_sb, s_sh,
                      QUANT, QGROUP)
    acc = acc * alpha[:, None] + dot_as(p, vt, DOT)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, m_new, l_i
