"""Mixture-of-experts MLP: each token through its top-k experts' gated MLPs, weighted and summed.

The GPU path is vLLM's fused MoE: the T*k (token, slot) pairs are sorted by expert and each
expert's run padded to the GEMM's block_m (`moe_align`), so one grouped GEMM serves every
expert (gate_up, then down with the routing weight folded in) and the k results of a token
are summed last. Weights may be int8 with per-output-channel scales (w8a16). `fused_moe_cpu`
is the torch path the layer takes off the GPU; `fused_moe_ref` defines what both compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quadrant.kernels.fused_norm_rope import act_and_mul
from quadrant.kernels.kv_store import dot_as, dot_dtype
from quadrant.kernels.triton_import import require_triton, tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("silu", "gelu_tanh")


# -- input checks (shared by the three paths) ---------------------------------------------------
def _check_inputs(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be [T, H] float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    if w13_hidden != hidden or two_inter % 2 or two_inter == 0:
        raise ValueError(f"w13 {tuple(w13.shape)} must be [E, 2I, {hidden}] (gate rows, then up rows) "
                         f"for x [T, {hidden}]")
    if tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} must be [{num_experts}, {hidden}, {two_inter // 2}] to match w13")
    for name, w, scale in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        if w.dtype == torch.int8:
            if scale is None:
                raise ValueError(f"int8 {name} needs {name}_scale: fp32 [E, out_features], one scale per channel")
            if tuple(scale.shape) != tuple(w.shape[:2]) or scale.dtype != torch.float32:
                raise ValueError(f"{name}_scale must be float32 {tuple(w.shape[:2])}, "
                                 f"got {tuple(scale.shape)} {scale.dtype}")
            if scale.device != x.device:
                raise ValueError(f"{name}_scale is on {scale.device} but x is on {x.device}")
        elif w.dtype != x.dtype:
            raise ValueError(f"{name} is {w.dtype} but x is {x.dtype}: cast the weights with the model, "
                             "or use int8 + scales")
        elif scale is not None:
            raise ValueError(f"{name}_scale is only for int8 weights, but {name} is {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [{num_tokens}, k], "
                         f"got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"topk_weights must be a float tensor of topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)} {topk_weights.dtype}")
    if topk_ids.device != x.device or topk_weights.device != x.device:
        raise ValueError(f"topk_ids/topk_weights must be on x's device {x.device}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)


def _assert_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    # The router's invariant, checked where it costs no device sync; on the GPU an id out of
    # range trips the device-side index check of moe_align's scatter instead.
    if not topk_ids.is_cuda and topk_ids.numel():
        assert 0 <= int(topk_ids.min()) and int(topk_ids.max()) < num_experts, "expert id out of range"


# -- reference ---------------------------------------------------------------------------------
def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """x: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]; topk_*: [T, k] -> [T, H] in x's dtype.

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (act(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j];
    one expert at a time over the tokens routed to it, all in fp32.
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids, activation, None, None)
    num_experts = w13.shape[0]
    _assert_ids_in_range(topk_ids, num_experts)
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(num_experts):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate_up = xf[tokens] @ w13[e].float().t()  # [n, 2I]
        hidden = _act_and_mul_fp32(gate_up, activation)  # [n, I]
        y = hidden @ w2[e].float().t()  # [n, H]
        out.index_add_(0, tokens, y * topk_weights[tokens, slots].float()[:, None])
    return out.to(x.dtype)


# -- CPU path ----------------------------------------------------------------------------------
def fused_moe_cpu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """fused_moe_ref's math in torch, one gate_up and one down matmul per expert that has tokens.

    The matmuls run in x's dtype on the weights as stored (int8 ones cast, their scales applied
    to the output channels); activation, routing weights and the sum over k are fp32.
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale)
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    _assert_ids_in_range(topk_ids, num_experts)
    flat = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]: pairs grouped by expert
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].float()  # [T*k]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        gate_up = _linear(x[tokens[rows]], w13[e], w13_scale, e)  # [n, 2I] fp32
        hidden = _act_and_mul_fp32(gate_up, activation).to(x.dtype)  # [n, I]
        y = _linear(hidden, w2[e], w2_scale, e)  # [n, H] fp32
        out.index_add_(0, tokens[rows], y * weights[rows, None])
    return out.to(x.dtype)


def _act_and_mul_fp32(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    g = gate_up.float()
    return _act(g[:, :inter], activation) * g[:, inter:]


def _linear(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    if scale is None:
        return F.linear(a, w).float()
    return F.linear(a, w.to(a.dtype)).float() * scale[e]  # int8 -> bf16/fp16 is exact


# -- routing metadata --------------------------------------------------------------------------
def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs routed to each expert, int64 [E]: the router statistics the metrics report."""
    counts = torch.bincount(topk_ids.reshape(-1), minlength=num_experts)
    assert counts.shape[0] == num_experts, "expert id out of range"
    return counts


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows moe_align can need at most: every expert that gets a pair pads at most block_m - 1."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def _align_padded(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align into buffers of max_padded_rows, with no host sync (CUDA-graph capturable).

    Blocks past the real total have expert -1 (the kernel skips them) and only padding ids.
    Returns (sorted_ids, expert_of_block, total padded rows as a [1] int64 tensor).
    """
    flat = topk_ids.reshape(-1).long()  # [T*k]
    num_pairs, device = flat.numel(), flat.device
    # scatter_add_, not bincount: CUDA bincount reads the max id back to size its output.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E]: end row of each expert's run
    order = torch.argsort(flat, stable=True)  # [T*k]: pairs grouped by expert, token order within one
    sorted_experts = flat[order]
    first_pair = counts.cumsum(0) - counts  # where each expert's pairs start in `order`
    dest = (ends - padded)[sorted_experts] + torch.arange(num_pairs, device=device) - first_pair[sorted_experts]
    max_rows = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)  # [P_max]
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=device)  # [P_max // block_m]
    # The expert whose run holds a block's first row: the first whose run ends after it (runs of
    # experts without pairs are empty, so they never qualify).
    expert_of_block = torch.searchsorted(ends, block_starts, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1).to(torch.int32)
    return sorted_ids, expert_of_block, ends[-1:]


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sort the T*k (token, slot) pairs by expert, each expert's run padded to a multiple of block_m.

    Returns sorted_ids [P] int32 (pair index t*k + j; padding = T*k), expert_of_block
    [P // block_m] int32 and P. Reading P back is one host sync; fused_moe avoids it.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T, k], got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if block_m < 1 or num_experts < 1:
        raise ValueError(f"block_m and num_experts must be positive, got {block_m} and {num_experts}")
    _assert_ids_in_range(topk_ids, num_experts)
    sorted_ids, expert_of_block, total = _align_padded(topk_ids, num_experts, block_m)
    num_rows = int(total.item())
    return sorted_ids[:num_rows], expert_of_block[: num_rows // block_m], num_rows


# -- Triton ------------------------------------------------------------------------------------
@triton.jit
def _moe_gemm_kernel(
    a, b, c, b_scale, topk_weights, sorted_ids, expert_of_block,
    num_pairs, N, K,
    a_sm, b_se, b_sn, c_sm, s_se,
    TOP_K: tl.constexpr,  # pairs per row of A: k when A is x [T, H], 1 when A is per pair [T*k, I]
    MUL_ROUTED_WEIGHT: tl.constexpr, W8: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // TOP_K] @ B[expert]^T for one block of sorted pairs (one expert) x BLOCK_N columns."""
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share an expert's weight tile in L2
    pid_n = tl.program_id(1)
    expert = tl.load(expert_of_block + pid_m).to(tl.int64)
    if expert < 0:  # past the last real block: moe_align's buffers are sized for the worst case
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs  # padding rows of the expert's run
    a_rows = (pairs // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    a_ptrs = a + a_rows[:, None] * a_sm
    b_ptrs = b + expert * b_se + n[None, :].to(tl.int64) * b_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        a_tile = tl.load(a_ptrs + kk[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        b_tile = tl.load(b_ptrs + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BK, BN]
        acc += dot_as(a_tile, b_tile, DOT)  # int8 codes are exact in bf16/fp16
    if W8:
        acc = acc * tl.load(b_scale + expert * s_se + n, mask=n_mask, other=0.0)[None, :]
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights + pairs, mask=valid, other=0.0)[:, None]
    c_ptrs = c + pairs[:, None].to(tl.int64) * c_sm + n[None, :]
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class MoeBlocks:
    """Tile shape and launch options of the grouped GEMM."""

    block_m: int  # sorted pairs per program; each expert's run is padded to it
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def pick_blocks(num_tokens: int, top_k: int, num_experts: int) -> MoeBlocks:
    """Small batches (decode: a few pairs per expert) take 16-row tiles so the padding stays small;
    larger ones 64 rows, so each expert weight tile read feeds more rows (tensor-core sized)."""
    if num_tokens * top_k <= 16 * num_experts:
        return MoeBlocks(16, 64, 128, num_warps=4, num_stages=4)
    return MoeBlocks(64, 128, 64, num_warps=4, num_stages=3)


def _clip(block: int, size: int) -> int:
    return min(block, max(16, triton.next_power_of_2(size)))  # tl.dot needs every dim >= 16


def _moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_of_block: torch.Tensor,
    num_pairs: int,
    top_k: int,
    topk_weights: torch.Tensor | None,
    blocks: MoeBlocks,
    dot: tl.dtype,
) -> None:
    num_n, num_k = b.shape[1], b.shape[2]
    block_n, block_k = _clip(blocks.block_n, num_n), _clip(blocks.block_k, num_k)
    assert sorted_ids.shape[0] == expert_of_block.shape[0] * blocks.block_m
    scale = b_scale if b_scale is not None else out  # unread without W8
    grid = (expert_of_block.shape[0], triton.cdiv(num_n, block_n))
    _moe_gemm_kernel[grid](
        a, b, out, scale, topk_weights if topk_weights is not None else out, sorted_ids, expert_of_block,
        num_pairs, num_n, num_k,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0), scale.stride(0),
        TOP_K=top_k, MUL_ROUTED_WEIGHT=topk_weights is not None, W8=b_scale is not None, DOT=dot,
        BLOCK_M=blocks.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of fused_moe_ref (int8 weights take fp32 per-channel scales [E, out]).

    Align, gate_up GEMM into [T*k, 2I], act_and_mul, down GEMM with the routing weight into
    [T*k, H], then the sum over k. No host sync: the GEMM grid covers the worst-case padding.
    """
    require_triton()
    _check_inputs(x, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale)
    if not x.is_cuda and isinstance(_moe_gemm_kernel, triton.runtime.JITFunction):
        raise ValueError(f"fused_moe needs CUDA tensors, got {x.device}; use fused_moe_cpu (or TRITON_INTERPRET=1)")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("w13 and w2 must be contiguous along their last (input) dim")
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    _assert_ids_in_range(topk_ids, num_experts)
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks = pick_blocks(num_tokens, top_k, num_experts)
    dot = dot_dtype(x.dtype)
    sorted_ids, expert_of_block, _ = _align_padded(topk_ids, num_experts, blocks.block_m)
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)  # [T*k, 2I]
    _moe_gemm(x, w13, w13_scale, gate_up, sorted_ids, expert_of_block, num_pairs, top_k, None, blocks, dot)
    hidden_states = act_and_mul(gate_up, activation)  # [T*k, I]
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    weights = topk_weights.reshape(-1).float().contiguous()  # [T*k]
    _moe_gemm(hidden_states, w2, w2_scale, down, sorted_ids, expert_of_block, num_pairs, 1, weights, blocks, dot)
    return down.view(num_tokens, top_k, hidden).sum(1)
