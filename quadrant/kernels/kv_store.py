"""Writing K/V into the paged cache, quantising on write: one scale per N tokens per sequence per head.

Cache layout: [num_blocks, kv_heads, block_size, head_dim] in the model dtype, or int8 (CPU) /
fp8 e4m3 (GPU) codes with fp32 scales [num_blocks, kv_heads, block_size // N]. N divides the
block size, so a scale group is N consecutive positions of one sequence inside one block.
Tokens arrive a few at a time (a prefill chunk, then one per decode step), so a write
re-derives its group's scale from the tokens already there plus the new ones and requantises
the group. `load_kv_tile` and `load_kv_scales` are the matching reads inside the attention
kernels.
"""

from __future__ import annotations

import torch
from quadrant.kernels.triton_import import require_triton, tl, triton

QUANT_NONE, QUANT_INT8, QUANT_FP8 = 0, 1, 2
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_MIN_SCALE_AMAX = 1e-6  # an all-zero group still gets a finite, non-zero scale


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of the attention kernels' tl.dot: the activations' own type on the GPU.

    Triton's CPU interpreter multiplies bf16/fp16 tiles wrongly, so there it is fp32.
    """
    if triton.knobs.runtime.interpret or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


@triton.jit
def dot_as(a, b, DOT: tl.constexpr):
    """a @ b with both operands cast to DOT, fp32 accumulation. fp32 operands multiply in full
    fp32 ("ieee"): Triton's default for them is tf32 on the GPU (10-bit mantissas, ~1e-3
    relative), which an fp32 model does not ask for (torch's own fp32 matmuls are not tf32)."""
    if DOT == tl.float32:
        out = tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee")
    else:
        out = tl.dot(a.to(DOT), b.to(DOT))
    return out


def quant_mode(cache_dtype: torch.dtype) -> int:
    if cache_dtype == torch.int8:
        return QUANT_INT8
    if cache_dtype == torch.float8_e4m3fn:
        return QUANT_FP8
    return QUANT_NONE


def check_paged_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, group: int,
                                 **int32_tensors: torch.Tensor) -> int:
    """The attention launchers' shared checks; returns the cache's quantisation mode."""
    num_heads, dim = q.shape[1], q.shape[2]
    if q.stride(-1) != 1 or num_heads % k_cache.shape[1] or k_cache.shape[3] != dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous and of one shape")
    wrong = [name for name, t in int32_tensors.items() if t.dtype != torch.int32]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} must be int32")
    mode = quant_mode(k_cache.dtype)
    if mode and (k_scale is None or v_scale is None or group < 1):
        raise ValueError("a quantised cache needs k_scale, v_scale and its group size")
    return mode


# -- reference ---------------------------------------------------------------------------------
def quantize_ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x already divided by its scale (|x| <= qmax) -> codes: int8 rounds half away from zero, fp8 RNE."""
    if dtype == torch.int8:
        return (x.abs() + 0.5).floor().copysign(x).clamp(-127, 127).to(torch.int8)
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """codes [..., S, D] with scale [..., S // group] -> fp32 values."""
    return codes.float() * scale.repeat_interleave(group, dim=-1).unsqueeze(-1)


def gather_kv(cache: torch.Tensor, scale: torch.Tensor | None, group: int, tables: torch.Tensor, span: int,
              dtype: torch.dtype) -> torch.Tensor:
    """The first `span` cached positions of each row's blocks, dequantised, in `dtype`.
    tables: [B, W] block ids -> [B, Hk, span, D]. The torch backend's read and the kernels' reference."""
    bsz, width = tables.shape
    _, num_kv, block_size, dim = cache.shape
    blocks = cache[tables].transpose(1, 2)  # [B, Hk, W, block_size, D]
    if scale is not None:
        blocks = dequantize_ref(blocks.flatten(2, 3), scale[tables].transpose(1, 2).flatten(2, 3), group)
    return blocks.reshape(bsz, num_kv, width * block_size, dim)[:, :, :span].to(dtype)


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    group: int = 0,
) -> None:
    """k, v: [T, Hk, D] into the slots of slot_mapping [T] (negative slot: padding, skipped)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if k.shape[0] == 0:
        return
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scale is None:
            cache[blocks, :, offsets] = src.to(cache.dtype)
        else:
            _store_group_ref(src, cache, scale, slot_mapping, group)


def _store_group_ref(src: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor,
                     group: int) -> None:
    block_size = cache.shape[2]
    group_ids = slots // group  # a sequence's tokens are consecutive, so each group's writes are too
    firsts = torch.ones_like(group_ids, dtype=torch.bool)
    firsts[1:] = group_ids[1:] != group_ids[:-1]
    first_idx = firsts.nonzero().squeeze(1)  # [G]
    member = torch.cumsum(firsts.long(), 0) - 1  # [T]: which touched group each token writes
    starts = group_ids[first_idx] * group  # first slot of each touched group
    blocks, base = starts // block_size, starts % block_size
    rows = base[:, None] + torch.arange(group, device=slots.device)  # [G, N]
    old = dequantize_ref(cache[blocks[:, None], :, rows].transpose(1, 2),  # [G, Hk, N, D]
                         scale[blocks, :, base // group].unsqueeze(-1), group)
    first_new = (slots[first_idx] % group)[:, None, None, None]
    earlier = torch.arange(group, device=slots.device)[None, None, :, None] < first_new
    vals = torch.where(earlier, old, 0.0)  # rows from this token on are rewritten (or not yet used)
    vals[member, :, slots % group] = src.float()
    amax = vals.abs().amax(dim=(2, 3)).clamp_min(_MIN_SCALE_AMAX)  # [G, Hk]
    # A true division, as the kernel's: CUDA torch turns `tensor / python_float` into a multiply by
    # the reciprocal, one ulp off at times, which flipped a few codes at .5 ties on an H200.
    new_scale = amax / torch.full_like(amax, QMAX[cache.dtype])
    codes = quantize_ref(vals / new_scale[:, :, None, None], cache.dtype)
    cache[blocks[:, None], :, rows] = codes.transpose(1, 2)
    scale[blocks, :, base // group] = new_scale


# -- Triton ------------------------------------------------------------------------------------
@triton.jit
def round_to_e4m3(x):
    """Round fp32 to e4m3's 3 mantissa bits (nearest-even) so the fp8 cast itself is exact.

    Rounding in integer arithmetic keeps the codes identical under Triton's CPU interpreter,
    whose own fp8 cast drops the carry when the mantissa rounds up.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    y = bits.to(tl.float32, bitcast=True)
    return tl.minimum(tl.maximum(y, -448.0), 448.0)


@triton.jit
def load_kv_tile(cache, page, head, offset, d, valid, d_mask, c_sb, c_sh, c_st):
    """Stored values of positions (page, offset) [BLOCK_N] of one head, [BLOCK_N, BLOCK_D]: an 8-bit
    cache's codes as they are (their scales come from load_kv_scales)."""
    page = page.to(tl.int64)  # block tables are int32; a big cache's element offsets are not
    ptrs = cache + page[:, None] * c_sb + head * c_sh + offset[:, None] * c_st + d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def load_kv_scales(scale, page, head, offset, valid, s_sb, s_sh, GROUP: tl.constexpr):
    """The fp32 scale of each position (page, offset) [BLOCK_N] of an 8-bit cache: one per GROUP tokens."""
    page = page.to(tl.int64)
    return tl.load(scale + page * s_sb + head * s_sh + offset // GROUP, mask=valid, other=0.0)


@triton.jit
def codes_to_f16(x, QUANT: tl.constexpr):
    """8-bit cache codes -> fp16 with integer and fp16x2 instructions, four codes per 32-bit register
    (GPU only: inline PTX). The GPU's own conversions (I2F, F2F) issue at a fraction of the ALU rate,
    and an 8-bit decode kernel converts every byte it reads. Both are exact:
    int8: (code ^ 0x80) set under the exponent of fp16's 1024, minus 1152;
    fp8 e4m3 (never NaN here: codes are clamped to +-448): the sign kept, exponent and mantissa moved
    down one bit into fp16's fields, times 2^8 (the biases' difference), subnormals included."""
    # The asm text is a literal in each call: a jit function cannot hold a str in a variable.
    if QUANT == 1:
        y = tl.inline_asm_elementwise(
            """{ .reg .b32 t, z, c;
            xor.b32 t, $2, 0x80808080; mov.b32 z, 0x64646464; mov.b32 c, 0x64806480;
            prmt.b32 $0, t, z, 0x4140; prmt.b32 $1, t, z, 0x4342;
            sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; }""",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        y = tl.inline_asm_elementwise(
            """{ .reg .b32 a, b, s, z, m;
            mov.b32 z, 0; mov.b32 m, 0x5C005C00;
            prmt.b32 a, $2, z, 0x1404; prmt.b32 b, $2, z, 0x3424;
            shr.b32 s, a, 1; and.b32 a, a, 0x80008000; and.b32 s, s, 0x3F803F80; or.b32 a, a, s;
            mul.f16x2 $0, a, m;
            shr.b32 s, b, 1; and.b32 b, b, 0x80008000; and.b32 s, s, 0x3F803F80; or.b32 b, b, s;
            mul.f16x2 $1, b, m; }""",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    return y


@triton.jit
def _store_one(src, cache, scale, slots, t, h, num_tokens, s_st, s_sh, c_sb, c_sh, c_st, sc_sb, sc_sh,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
               GROUP: tl.constexpr, QMAX: tl.constexpr):
    slot = tl.load(slots + t)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    if QUANT == 0:
        if slot >= 0:
            x = tl.load(src + t * s_st + h * s_sh + d, mask=d_mask)
            dst = cache + (slot // PAGE) * c_sb + h * c_sh + (slot % PAGE) * c_st + d
            tl.store(dst, x.to(cache.dtype.element_ty), mask=d_mask)
    else:
        prev = tl.load(slots + t - 1, mask=t > 0, other=-1)
        gid = slot // GROUP
        leads = (slot >= 0) & ((prev < 0) | (prev // GROUP != gid))
        if leads:  # the first of this step's tokens in its group rewrites the whole group
            block = slot // PAGE
            first = slot % GROUP  # rows before it hold earlier steps' tokens
            r = tl.arange(0, GROUP)
            idx = t + r - first
            new = (r >= first) & (idx < num_tokens)
            new_slots = tl.load(slots + idx, mask=new, other=-1)
            new = new & (new_slots >= 0) & (new_slots // GROUP == gid)
            old = r < first
            rows = slot % PAGE - first + r
            base = cache + block * c_sb + h * c_sh
            old_codes = tl.load(base + rows[:, None] * c_st + d[None, :], mask=old[:, None] & d_mask[None, :],
                                other=0.0)
            group_scale = scale + block * sc_sb + h * sc_sh + (slot % PAGE) // GROUP
            old_vals = old_codes.to(tl.float32) * tl.load(group_scale)
            new_vals = tl.load(src + idx[:, None] * s_st + h * s_sh + d[None, :], mask=new[:, None] & d_mask[None, :],
                               other=0.0).to(tl.float32)
            vals = tl.where(old[:, None], old_vals, new_vals)  # [GROUP, BLOCK_D]; later rows 0
            amax = tl.max(tl.max(tl.abs(vals), axis=1), axis=0)
            # IEEE divisions, as the reference's: a GPU's fast `/` (div.full, 2 ulp) moved int8 codes at .5 ties.
            s = tl.div_rn(tl.maximum(amax, 1e-6), QMAX)
            x = tl.div_rn(vals, s)
            if QUANT == 1:
                codes = tl.minimum(tl.maximum(tl.floor(tl.abs(x) + 0.5), 0.0), 127.0)
                codes = tl.where(x < 0, -codes, codes)
            else:
                codes = round_to_e4m3(x)
            tl.store(base + rows[:, None] * c_st + d[None, :], codes.to(cache.dtype.element_ty),
                     mask=(old | new)[:, None] & d_mask[None, :])
            tl.store(group_scale, s)


@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, k_scale, v_scale, slots, num_tokens,
                     k_st, k_sh, v_st, v_sh, c_sb, c_sh, c_st, sc_sb, sc_sh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
                     GROUP: tl.constexpr, QMAX: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    _store_one(k, k_cache, k_scale, slots, t, h, num_tokens, k_st, k_sh, c_sb, c_sh, c_st, sc_sb, sc_sh,
               HEAD_DIM, BLOCK_D, PAGE, QUANT, GROUP, QMAX)
    _store_one(v, v_cache, v_scale, slots, t, h, num_tokens, v_st, v_sh, c_sb, c_sh, c_st, sc_sb, sc_sh,
               HEAD_DIM, BLOCK_D, PAGE, QUANT, GROUP, QMAX)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    group: int = 0,
) -> None:
    """Triton version of store_kv_ref. k, v: [T, Hk, D] (any row strides); caches as in the module doc."""
    require_triton()
    num_tokens, num_kv, dim = k.shape
    if v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v must share a shape and have a unit last stride, got {k.shape}/{v.shape}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or not k_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous and of one shape")
    if k_cache.shape[1] != num_kv or k_cache.shape[3] != dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not hold [T, {num_kv}, {dim}] K/V")
    mode = quant_mode(k_cache.dtype)
    if mode != QUANT_NONE:
        if k_scale is None or v_scale is None or group < 1 or k_cache.shape[2] % group:
            raise ValueError("a quantised cache needs k_scale, v_scale and a group dividing the block size")
        if k_scale.shape != (k_cache.shape[0], num_kv, k_cache.shape[2] // group) or not k_scale.is_contiguous():
            raise ValueError(f"scale shape {tuple(k_scale.shape)} does not match the cache")
    if num_tokens == 0:
        return
    scale_k = k_scale if k_scale is not None else k_cache
    scale_v = v_scale if v_scale is not None else v_cache
    _store_kv_kernel[(num_tokens, num_kv)](
        k, v, k_cache, v_cache, scale_k, scale_v, slot_mapping, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale_k.stride(0), scale_k.stride(1),
        HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), PAGE=k_cache.shape[2], QUANT=mode,
        GROUP=max(group, 1), QMAX=QMAX.get(k_cache.dtype, 1.0),
    )
