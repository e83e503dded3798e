"""Triton kernels for the per-token elementwise work around attention and the MLP.

RMSNorm fused with its residual add, rotary embedding applied in place to q or k, and the
gated activation act(gate) * up. Each kernel sits with a launcher that checks its inputs and a
plain torch `*_ref` that defines what it must compute; layers ask `use_fused` which to call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quadrant.kernels.triton_import import HAS_TRITON as _HAS_TRITON
from quadrant.kernels.triton_import import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("silu", "gelu_tanh")
# A row is one register tile; wider rows would spill, and no model's hidden size comes close.
_MAX_ROW = 65536


def use_fused(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on x: a CUDA tensor and triton importable."""
    return _HAS_TRITON and x.is_cuda and not x.requires_grad  # no backward: inference only


def _check_launch(x: torch.Tensor) -> None:
    if not _HAS_TRITON:
        raise RuntimeError("triton is not installed; check use_fused(x) and call the torch layer instead")
    # With TRITON_INTERPRET=1 at this module's import, `triton.jit` returned interpreter wrappers,
    # which run on CPU tensors; all kernels were decorated together, so one stands for all.
    if not x.is_cuda and isinstance(_rms_norm_kernel, triton.runtime.JITFunction):
        raise ValueError(f"Triton kernels need CUDA tensors, got {x.device}; set TRITON_INTERPRET=1 to run on CPU")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)

if _HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        residual_out_ptr,
        x_row_stride,
        residual_row_stride,
        D,
        eps,
        offset,
        HAS_RESIDUAL: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: T * D may pass 2**31 in long prefills
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
            # Rounded to the activation dtype before normalising, as torch's `x + residual` is.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(residual_out_ptr + row * D + cols, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            out = h * (offset + w)
        else:
            # RMSNorm computes `weight * h.to(dtype)`: round h first so bf16 matches it. The
            # product of two bf16 values is exact in fp32, leaving one rounding as in torch.
            out = w * h.to(dtype).to(tl.float32)
        tl.store(out_ptr + row * D + cols, out.to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward as one kernel: out, or (out, x + residual) when residual is given.

    x: [..., D]; weight: [D] in x's dtype. The inputs are left untouched; the sum is a new tensor.
    """
    _check_float("x", x)
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},) to match x's last dim, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}; cast it with the model"
        )
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got ({tuple(residual.shape)}, {residual.dtype}, {residual.device})"
        )
    if not 0 < D <= _MAX_ROW:
        raise ValueError(f"rms_norm fuses rows of 1 to {_MAX_ROW} elements, got {D}; use rms_norm_ref")
    _check_launch(x)

    x2 = _rows(x, D)  # [T, D]
    r2 = _rows(residual, D) if residual is not None else x2  # [T, D]; unread without a residual
    num_tokens = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [..., D]
    residual_out = torch.empty_like(out) if residual is not None else out  # [..., D]
    if num_tokens:  # a grid of 0 programs is a launch error on CUDA
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(num_tokens,)](
            x2, r2, weight.contiguous(), out, residual_out,
            x2.stride(0), r2.stride(0), D, float(eps), float(offset),
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(offset), BLOCK=block,
            num_warps=_num_warps(block),
        )  # fmt: skip
    return out if residual is None else (out, residual_out)


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in plain torch: out, or (out, x + residual). RMSNorm.forward's CPU path is this
    function, so the kernel is held to the layer's own math.

    Computed in fp32 whatever the activation dtype, as Hugging Face does; `offset` 1.0 gives
    Gemma's (1 + w) gain."""
    if residual is not None:
        x = x + residual
        residual = x
    if not offset and x.dtype == torch.float32:
        out = F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op
        return out if residual is None else (out, residual)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        out = (h * (offset + weight.float())).to(dtype)
    else:
        out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    rows = t.reshape(-1, D)  # a view whenever the layout allows one
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# ---------------------------------------------------------------------------------------------
# Rotary embedding, in place

if _HAS_TRITON:

    @triton.jit
    def _rotary_kernel(
        qk_ptr,
        cos_ptr,
        sin_ptr,
        num_heads,
        half,
        qk_token_stride,
        qk_head_stride,
        cos_token_stride,
        sin_token_stride,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_HALF)
        col_mask = cols < half
        # Both halves of each table are read, not assumed equal: sin is signed (-sin | +sin).
        cos_row = cos_ptr + t * cos_token_stride + cols
        sin_row = sin_ptr + t * sin_token_stride + cols
        cos1 = tl.load(cos_row, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(cos_row + half, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(sin_row, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(sin_row + half, mask=col_mask, other=0.0).to(tl.float32)[None, :]

        ptrs = qk_ptr + t * qk_token_stride + heads[:, None] * qk_head_stride + cols[None, :]  # [BLOCK_H, BLOCK_HALF]
        mask = (heads[:, None] < num_heads) & col_mask[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
        # x * cos + swap_halves(x) * sin, one half at a time.
        out1 = x1 * cos1 + x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
        dtype = qk_ptr.dtype.element_ty
        tl.store(ptrs, out1.to(dtype), mask=mask)
        tl.store(ptrs + half, out2.to(dtype), mask=mask)


def apply_rotary_inplace(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate qk: [T, H, D] in place by RotaryEmbedding.cos_sin's tables ([T, 1, D] or [T, D]).

    qk may be a view with any token and head strides (q or k sliced out of a fused qkv output)
    as long as D is contiguous. Computed in fp32, stored in qk's dtype; returns qk.
    """
    _check_float("qk", qk)
    if qk.dim() != 3:
        raise ValueError(f"qk must be [T, H, D], got shape {tuple(qk.shape)}")
    num_tokens, num_heads, D = qk.shape
    if D % 2:
        raise ValueError(f"rotary needs an even head dim, got {D}")
    if qk.stride(-1) != 1:
        raise ValueError(f"qk must be contiguous along D (stride 1), got strides {qk.stride()}")
    cos2 = _rope_table("cos", cos, qk)  # [T, D]
    sin2 = _rope_table("sin", sin, qk)  # [T, D]
    _check_launch(qk)

    if num_tokens and num_heads:
        block_half = triton.next_power_of_2(D // 2)
        # Heads of a token share its cos/sin row; a tile of them amortises the table loads.
        block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_half))
        grid = (num_tokens, triton.cdiv(num_heads, block_h))
        _rotary_kernel[grid](
            qk, cos2, sin2, num_heads, D // 2,
            qk.stride(0), qk.stride(1), cos2.stride(0), sin2.stride(0),
            BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
        )  # fmt: skip
    return qk


def apply_rotary_ref(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate qk: [T, H, D] (rotate-half layout) out of place by RotaryEmbedding.cos_sin's tables:
    the layer's apply_rotary (which calls this), and what apply_rotary_inplace must match."""
    swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2 | x1]
    return torch.addcmul(qk * cos, swapped, sin)


def _rope_table(name: str, table: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
    num_tokens, _, D = qk.shape
    if table.shape not in ((num_tokens, D), (num_tokens, 1, D)):
        raise ValueError(f"{name} must be [{num_tokens}, {D}] or [{num_tokens}, 1, {D}], got {tuple(table.shape)}")
    _check_float(name, table)
    if table.device != qk.device:
        raise ValueError(f"{name} is on {table.device} but qk is on {qk.device}")
    return _rows(table, D)


# ---------------------------------------------------------------------------------------------
# Gated activation: act(gate) * up

if _HAS_TRITON:

    @triton.jit
    def _act_and_mul_kernel(
        gate_up_ptr,
        out_ptr,
        inter,
        row_stride,
        GELU_TANH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        row = gate_up_ptr + t * row_stride
        g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU_TANH:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) * (g + 0.044715 g^3)
            # tanh from exp, as tl has no tanh on every version; exp(-2|z|) lies in (0, 1], so no
            # overflow whatever |z| is (inf included), and the sign is put back after.
            e = tl.exp(-2.0 * tl.abs(z))
            tanh_abs = (1.0 - e) / (1.0 + e)
            act = 0.5 * g * (1.0 + tl.where(z >= 0, tanh_abs, -tanh_abs))
        else:
            act = g / (1.0 + tl.exp(-g))  # exp overflowing to inf for g << 0 gives -0, the limit
        tl.store(out_ptr + t * inter + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def act_and_mul(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """gate_up: [..., 2 * I], gate then up -> act(gate) * up: [..., I], in fp32, stored in the input dtype."""
    _check_float("gate_up", gate_up)
    _check_activation(activation)
    width = gate_up.shape[-1] if gate_up.dim() else 0
    if width == 0 or width % 2:
        raise ValueError(f"gate_up's last dim must be 2 * intermediate_size (even, > 0), got {width}")
    inter = width // 2
    _check_launch(gate_up)

    rows = _rows(gate_up, width)  # [T, 2I]
    num_tokens = rows.shape[0]
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)  # [..., I]
    if num_tokens:
        block = min(triton.next_power_of_2(inter), 1024)
        grid = (num_tokens, triton.cdiv(inter, block))
        _act_and_mul_kernel[grid](
            rows, out, inter, rows.stride(0),
            GELU_TANH=activation == "gelu_tanh", BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return out


def act_and_mul_ref(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """LlamaMLP's torch path: act(gate) * up in the input dtype."""
    _check_activation(activation)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    return act * up


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
