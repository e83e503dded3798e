"""8-bit-activation grouped GEMMs on the GPU: W4A8 and fp8 W8A8, for MoE experts and plain linears.

W4A8 (the seeds' expert format): weights as 4-bit codes c in 0..15 with a scale s and a min lo
per group of g inputs and output channel, w = c s + lo (`quadrant quantize`'s asymmetric grid).
Activations are int8 per token, x = xq * xs. Within one group the product runs on the int8
tensor cores and the group's float terms are applied to its int32 partial sum:

    x . w = xs * sum_groups (s * sum_k xq c  +  lo * sum_k xq)

The second sum is one number per (token, group), computed with the activation quantisation.
The K step is a span of max(g, 64) inputs. Each byte holds the codes of inputs j and j + span/2 of
its span (low and high nibble), so one AND and one shift on 32-bit words unpack eight codes into
two int8 tiles, each multiplied by its own contiguous half of the activation tile: no interleaving,
no sign fix-up (codes stay unsigned; their offset is in lo). Groups of 32 are the two halves of a
span (the int8 tensor cores take K >= 32 per product). On the GPU the unpacking is inline PTX; the
interpreter runs the same arithmetic per byte.

FP8 (w8a8 on the GPU): weights e4m3 per output channel, activations e4m3 per token, each K
step's tensor-core sum promoted into an fp32 accumulator, both scales applied once at the end.

The MoE layout is fused_moe's: (token, slot) pairs sorted by expert, each expert's run padded
to block_m. A linear is the same kernel with one expert and every row in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quadrant.kernels.fused_moe import _align_padded, _assert_ids_in_range, pick_blocks
from quadrant.kernels.fused_norm_rope import act_and_mul, act_and_mul_ref
from quadrant.kernels.triton_import import require_triton, tl, triton
# The grids import torch alone: no formats, no other kernels, so no cycle at the top.
from quadrant.quant.grids import int4_groups, int8_per_token

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class W4A8Weights:
    """4-bit grouped weights of [E, N, K] (or one [N, K] matrix as E = 1)."""

    qweight: torch.Tensor  # uint8 [E, N, K/2]: byte p/2 + j holds inputs p + j (low), p + span/2 + j (high)
    scale: torch.Tensor  # fp32 [E, K/g, N]: per group, along N for coalesced loads
    lo: torch.Tensor  # fp32 [E, K/g, N]: the group's min (code 0)
    group: int

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, half = self.qweight.shape
        return e, n, 2 * half

    @property
    def span(self) -> int:
        """Inputs whose codes share bytes (the kernel's K step)."""
        return w4_span(self.group)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [E, N, K] in input order."""
        e, n, half = self.qweight.shape
        halves = self.qweight.view(e, n, -1, 1, self.span // 2)  # [E, N, K/span, 1, span/2]
        return torch.cat([halves & 0x0F, halves >> 4], dim=-2).view(e, n, 2 * half)

    def dequantize(self) -> torch.Tensor:
        """The float [E, N, K] weights the codes stand for (the reference's)."""
        codes = self.codes().float()
        e, n, k = codes.shape
        grouped = codes.view(e, n, k // self.group, self.group)
        s, lo = self.scale.transpose(1, 2).unsqueeze(-1), self.lo.transpose(1, 2).unsqueeze(-1)  # [E, N, K/g, 1]
        return (grouped * s + lo).view(e, n, k)


@dataclass
class Fp8Weights:
    """e4m3 weights of [E, N, K] with one fp32 scale per output channel."""

    weight: torch.Tensor  # float8_e4m3fn [E, N, K]
    scale: torch.Tensor  # fp32 [E, N]

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, k = self.weight.shape
        return e, n, k

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.unsqueeze(-1)


QuantWeights = W4A8Weights | Fp8Weights


def w4_span(group: int) -> int:
    return max(group, 64)


def pack_w4a8(weight: torch.Tensor, group: int, on_grid: bool = False) -> W4A8Weights:
    """[E, N, K] or [N, K] float weights -> W4A8Weights on the same device (asymmetric groups of `group`;
    `on_grid`: keep the 4-bit grids the weights already sit on, as `int4_groups`)."""
    w = weight if weight.dim() == 3 else weight.unsqueeze(0)
    span = w4_span(group)
    if w.shape[-1] % span:
        raise ValueError(f"in_features {w.shape[-1]} is not a multiple of {span} (the group size {group}, "
                         f"and at least 64 for the int8 tensor cores)")
    codes, scale, lo = int4_groups(w, group, on_grid)  # [E, N, K/g, g], [E, N, K/g, 1] x 2
    c = codes.to(torch.uint8).view(*w.shape[:-1], -1, span)
    qweight = (c[..., : span // 2] | (c[..., span // 2 :] << 4)).flatten(-2).contiguous()  # [E, N, K/2]
    scale, lo = scale.squeeze(-1), lo.squeeze(-1)  # [E, N, K/g]
    return W4A8Weights(qweight, scale.transpose(1, 2).contiguous(), lo.transpose(1, 2).contiguous(), group)


def pack_fp8(weight: torch.Tensor) -> Fp8Weights:
    """[E, N, K] or [N, K] float weights -> per-channel e4m3 weights."""
    w = (weight if weight.dim() == 3 else weight.unsqueeze(0)).float()
    scale = w.abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # [E, N]
    return Fp8Weights((w / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.contiguous())


@dataclass
class QuantActivations:
    q: torch.Tensor  # int8 or e4m3 [M, K]
    scale: torch.Tensor  # fp32 [M]
    group_sums: torch.Tensor | None  # int32 [M, K/g]: sum of each group's int8 codes (W4A8's lo term)


def quantize_activations(x: torch.Tensor, weights: QuantWeights) -> QuantActivations:
    """Per-token 8-bit activations for `weights`' kernel: int8 (W4A8) or e4m3 (FP8), symmetric."""
    xf = x.float()
    if isinstance(weights, Fp8Weights):
        scale = xf.abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # [M]
        return QuantActivations((xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale, None)
    codes, step = int8_per_token(xf)
    q = codes.to(torch.int8)
    sums = q.view(q.shape[0], -1, weights.group).sum(-1, dtype=torch.int32)
    return QuantActivations(q, step.squeeze(-1), sums)


# -- Triton ------------------------------------------------------------------------------------
@triton.jit
def _unpack_nibbles(packed, NATIVE: tl.constexpr):
    """uint8 tile -> (low nibbles, high nibbles) as int8 tiles of the same shape."""
    if NATIVE:
        # Four bytes per 32-bit register: one AND gives four low codes, a shift and an AND four high.
        low, high = tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 $0, $2, 0x0F0F0F0F; shr.u32 t, $2, 4; and.b32 $1, t, 0x0F0F0F0F; }",
            "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        low = (packed & 0xF).to(tl.int8)
        high = (packed >> 4).to(tl.int8)
    return low, high


@triton.jit
def _q8_gemm_kernel(
    a, a_scale, a_sums, b, b_scale, b_lo, c, topk_weights, sorted_ids, expert_of_block,
    num_pairs, N, K,
    a_sm, g_sm, b_se, b_sn, s_se, s_sg, c_sm,
    TOP_K: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, W4: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
):
    """C[pair] = dequant(A[pair // TOP_K] . B[expert]^T) for one block of sorted pairs x BLOCK_N columns.
    W4: BLOCK_K is the span, GROUP the group (the span or half of it), GROUPS >= K/GROUP a power of two
    (>= 16); s/lo are [E, K/GROUP, N]. Else (fp8): s is [E, N], lo unused.
    NATIVE: the GPU's own instructions (fp8 MMA, PTX); the interpreter's portable twins otherwise."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_of_block + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    a_rows = (pairs // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    a_ptrs = a + a_rows[:, None] * a_sm
    b_base = b + expert * b_se + n[None, :].to(tl.int64) * b_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if W4:  # K is a whole number of groups (checked at packing)
            half = tl.arange(0, BLOCK_K // 2)
            a_low = tl.load(a_ptrs + (k0 + half)[None, :], mask=valid[:, None], other=0)  # [BM, BK/2]
            a_high = tl.load(a_ptrs + (k0 + BLOCK_K // 2 + half)[None, :], mask=valid[:, None], other=0)
            packed = tl.load(b_base + (k0 // 2 + half)[:, None], mask=n_mask[None, :], other=0)  # [BK/2, BN]
            # The scales are loaded before the products, so they arrive while the MMAs run.
            s = tl.load(b_scale + expert * s_se + (k0 // GROUP) * s_sg + n, mask=n_mask, other=0.0)
            if GROUP < BLOCK_K:  # groups of 32: the halves are two groups
                s_high = tl.load(b_scale + expert * s_se + (k0 // GROUP + 1) * s_sg + n, mask=n_mask, other=0.0)
            low, high = _unpack_nibbles(packed, NATIVE)
            part = tl.dot(a_low, low, out_dtype=tl.int32)
            if GROUP < BLOCK_K:
                acc = tl.fma(part.to(tl.float32), s[None, :], acc)
                part = tl.dot(a_high, high, out_dtype=tl.int32)
                acc = tl.fma(part.to(tl.float32), s_high[None, :], acc)
            else:
                part = tl.dot(a_high, high, part, out_dtype=tl.int32)
                acc = tl.fma(part.to(tl.float32), s[None, :], acc)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < K
            a_tile = tl.load(a_ptrs + kk[None, :], mask=valid[:, None] & k_mask[None, :], other=0)  # [BM, BK]
            # e4m3 travels as its bytes (the interpreter has no fp8 constants); the GPU multiplies fp8
            # on the tensor cores, the interpreter in fp32 (exact products, same sums).
            w = tl.load(b_base + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BK, BN]
            a8 = a_tile.to(tl.float8e4nv, bitcast=True)
            w8 = w.to(tl.float8e4nv, bitcast=True)
            if NATIVE:
                # Hopper's fp8 MMA accumulates with ~14 mantissa bits: sum each K step on its own and
                # add it to the fp32 accumulator (DeepGEMM's promotion, every 128 inputs).
                acc += tl.dot(a8, w8)
            else:
                acc = tl.dot(a8.to(tl.float32), w8.to(tl.float32), acc, input_precision="ieee")
    if W4:
        # The mins' term, sum over groups of (sum of the group's codes) x lo, is one more small product:
        # [BM, groups] x [groups, BN] on the tensor cores in 3xTF32 (fp32-exact for these code sums).
        g = tl.arange(0, GROUPS)
        g_mask = g < K // GROUP
        sums = tl.load(a_sums + a_rows[:, None] * g_sm + g[None, :], mask=valid[:, None] & g_mask[None, :], other=0)
        lo = tl.load(b_lo + expert * s_se + g[:, None] * s_sg + n[None, :], mask=g_mask[:, None] & n_mask[None, :],
                     other=0.0)
        acc = tl.dot(sums.to(tl.float32), lo, acc, input_precision="tf32x3")
    else:
        acc = acc * tl.load(b_scale + expert * s_se + n, mask=n_mask, other=0.0)[None, :]
    acc = acc * tl.load(a_scale + a_rows, mask=valid, other=0.0)[:, None]
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights + pairs, mask=valid, other=0.0)[:, None]
    c_ptrs = c + pairs[:, None].to(tl.int64) * c_sm + n[None, :]
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class Q8Blocks:
    block_m: int
    block_n: int
    block_k: int  # W4A8: the span of inputs sharing bytes (W4A8Weights.span)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillTiles:
    """The prefill tile of each 8-bit format (block_k is replaced by the weights' own K step).
    Immutable: a benchmark sweeping candidates passes its tile per call (`prefill=`) instead."""

    w4a8: Q8Blocks
    fp8: Q8Blocks

    def for_weights(self, weights: QuantWeights) -> Q8Blocks:
        return self.w4a8 if isinstance(weights, W4A8Weights) else self.fp8


# OLMoE and Qwen3-MoE expert shapes at 16k tokens (H200): w4a8 360/329 TFLOP/s with 64 x 128 (128 x 128:
# 352/324); fp8 499/469 with 64 x 128 (128 x 128: 477/444).
PREFILL_TILES = PrefillTiles(w4a8=Q8Blocks(64, 128, 128, num_warps=4, num_stages=4),
                             fp8=Q8Blocks(64, 128, 128, num_warps=4, num_stages=4))


def pick_q8_blocks(num_tokens: int, top_k: int, num_experts: int, weights: QuantWeights,
                   prefill: Q8Blocks | None = None) -> Q8Blocks:
    """Decode-sized batches: 16-row tiles (little padding); prefill: the tile that won the sweep of
    benchmarks/gpu_moe.py on an H200 (BENCHMARKS.md), on the 8-bit tensor cores (wgmma), K step 128
    (W4A8: its span, one group of 64 or more, or two of 32). `prefill`: another prefill tile than
    PREFILL_TILES' for the weights' format (its block_k is ignored)."""
    block_k = weights.span if isinstance(weights, W4A8Weights) else 128
    if pick_blocks(num_tokens, top_k, num_experts).block_m == 16:
        return Q8Blocks(16, 64, block_k, num_warps=4, num_stages=4)
    tile = prefill if prefill is not None else PREFILL_TILES.for_weights(weights)
    return Q8Blocks(tile.block_m, tile.block_n, block_k, tile.num_warps, tile.num_stages)


def _q8_gemm(acts: QuantActivations, weights: QuantWeights, out: torch.Tensor, sorted_ids: torch.Tensor,
             expert_of_block: torch.Tensor, num_pairs: int, top_k: int, topk_weights: torch.Tensor | None,
             blocks: Q8Blocks) -> None:
    _, num_n, num_k = weights.shape
    w4 = isinstance(weights, W4A8Weights)
    b = weights.qweight if isinstance(weights, W4A8Weights) else weights.weight.view(torch.uint8)
    a = acts.q if w4 else acts.q.view(torch.uint8)
    lo = weights.lo if isinstance(weights, W4A8Weights) else weights.scale  # unread for fp8
    sums = acts.group_sums if acts.group_sums is not None else acts.scale  # unread for fp8
    block_n = min(blocks.block_n, max(16, triton.next_power_of_2(num_n)))
    grid = (expert_of_block.shape[0], triton.cdiv(num_n, block_n))
    _q8_gemm_kernel[grid](
        a, acts.scale, sums, b, weights.scale, lo, out, topk_weights if topk_weights is not None else out,
        sorted_ids, expert_of_block,
        num_pairs, num_n, num_k,
        a.stride(0), sums.stride(0), b.stride(0), b.stride(1), weights.scale.stride(0),
        weights.scale.stride(1) if w4 else 0, out.stride(0),
        TOP_K=top_k, MUL_ROUTED_WEIGHT=topk_weights is not None, W4=w4, NATIVE=not triton.knobs.runtime.interpret,
        BLOCK_M=blocks.block_m, BLOCK_N=block_n, BLOCK_K=blocks.block_k,
        GROUP=weights.group if isinstance(weights, W4A8Weights) else 128,
        GROUPS=max(16, triton.next_power_of_2(num_k // weights.group)) if isinstance(weights, W4A8Weights) else 16,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def _check(x: torch.Tensor, weights: QuantWeights, name: str) -> None:
    _, _, k = weights.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: input must be [M, {k}], got {tuple(x.shape)}")
    if weights.scale.device != x.device:
        raise ValueError(f"{name}: weights are on {weights.scale.device} but the input is on {x.device}")
    if not x.is_cuda and isinstance(_q8_gemm_kernel, triton.runtime.JITFunction):
        raise ValueError(f"{name} needs CUDA tensors, got {x.device} (or TRITON_INTERPRET=1)")


def quant_linear(x: torch.Tensor, weights: QuantWeights, bias: torch.Tensor | None = None,
                 prefill: Q8Blocks | None = None) -> torch.Tensor:
    """x [M, K] (float) @ one quantised matrix [N, K]^T -> [M, N] in x's dtype, 8-bit activations.
    `prefill`: the tile for large batches, as pick_q8_blocks'."""
    require_triton()
    _check(x, weights, "quant_linear")
    num_rows, (_, num_n, _) = x.shape[0], weights.shape
    out = torch.empty(num_rows, num_n, dtype=x.dtype, device=x.device)
    if num_rows:
        blocks = pick_q8_blocks(num_rows, 1, 1, weights, prefill)
        padded = triton.cdiv(num_rows, blocks.block_m) * blocks.block_m
        rows = torch.arange(padded, dtype=torch.int32, device=x.device)  # rows >= M are padding
        experts = torch.zeros(padded // blocks.block_m, dtype=torch.int32, device=x.device)
        _q8_gemm(quantize_activations(x, weights), weights, out, rows, experts, num_rows, 1, None, blocks)
    return out if bias is None else out + bias


def fused_moe_q8(x: torch.Tensor, w13: QuantWeights, w2: QuantWeights, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, activation: str = "silu",
                 prefill: Q8Blocks | None = None) -> torch.Tensor:
    """fused_moe with W4A8 or fp8 experts: x [T, H], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in x's dtype.
    Activations are quantised per token twice: x before gate_up, act(gate) * up before down.
    `prefill`: the tile for large batches, as pick_q8_blocks'."""
    require_triton()
    _check(x, w13, "fused_moe_q8")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    if w2.shape != (num_experts, hidden, two_inter // 2) or type(w2) is not type(w13):
        raise ValueError(f"w2 must be {type(w13).__name__} [{num_experts}, {hidden}, {two_inter // 2}] to match w13, "
                         f"got {type(w2).__name__} {list(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [{num_tokens}, k], "
                         f"got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    _assert_ids_in_range(topk_ids, num_experts)
    blocks = pick_q8_blocks(num_tokens, top_k, num_experts, w13, prefill)
    sorted_ids, expert_of_block, _ = _align_padded(topk_ids, num_experts, blocks.block_m)
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)  # [T*k, 2I]
    _q8_gemm(quantize_activations(x, w13), w13, gate_up, sorted_ids, expert_of_block, num_pairs, top_k, None, blocks)
    inter = act_and_mul(gate_up, activation)  # [T*k, I]
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    weights = topk_weights.reshape(-1).float().contiguous()
    # Same row blocks as the sort (the pairs were padded to them); only the K step follows w2's group.
    down_blocks = replace(blocks, block_k=pick_q8_blocks(num_tokens, top_k, num_experts, w2).block_k)
    _q8_gemm(quantize_activations(inter, w2), w2, down, sorted_ids, expert_of_block, num_pairs, 1, weights,
             down_blocks)
    return down.view(num_tokens, top_k, hidden).sum(1)


# -- reference ---------------------------------------------------------------------------------
def quant_linear_ref(x: torch.Tensor, weights: QuantWeights, expert: int = 0) -> torch.Tensor:
    """What the kernel computes, in fp32 torch: the same 8-bit activations times the dequantised weights."""
    acts = quantize_activations(x, weights)
    return (acts.q.float() * acts.scale[:, None]) @ weights.dequantize()[expert].t()


def fused_moe_q8_ref(x: torch.Tensor, w13: QuantWeights, w2: QuantWeights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Per-expert loop over the same quantised activations and dequantised weights, fp32 throughout."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate_up = quant_linear_ref(x[tokens], w13, e)
        inter = act_and_mul_ref(gate_up, activation).to(x.dtype)
        down = quant_linear_ref(inter, w2, e)
        out.index_add_(0, tokens, down * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)
