"""GGUF block (de)quantisers written in torch.

`dequantize` turns a GGUF tensor's stored bytes (F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q5_K, Q6_K) into a float tensor; it is what the model loader uses at load time and the
reference that quantised-matmul kernels are tested against. `quantize_q8_0/q4_0/q4_1`
produce the simple block formats with ggml's reference rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["SUPPORTED_TYPES", "dequantize", "quantize_q8_0", "quantize_q4_0", "quantize_q4_1"]

_T = GGMLQuantizationType
QK_K = 256  # super-block size of the K-quants

# Elements decoded per step. Blocks are processed in chunks so that the decoders'
# temporaries (several per element for the K-quants) stay cache-sized instead of
# scaling with the tensor; each chunk is still thousands of blocks, done as one op.
_CHUNK_ELEMS = 1 << 18

_FLOAT_VIEW: dict[int, torch.dtype] = {
    _T.F32: torch.float32,
    _T.F16: torch.float16,
    _T.BF16: torch.bfloat16,
}


# ---------------------------------------------------------------------------
# field helpers; `b` is always a uint8 tensor [n_blocks, type_size]
# ---------------------------------------------------------------------------

def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """Little-endian f16 field at byte `off` of every block, as float32 [n, 1]."""
    # the 2-byte slice is strided; make it contiguous so it can be reinterpreted
    return b[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2, k]: low nibbles first, then high nibbles.

    Every 4-bit format here stores element j in the low nibble of byte j and element
    j + k in the high nibble (not adjacent elements in one byte)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def _k_scales_mins(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; bytes
    8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble),
    whose top 2 bits are parked in the spare top bits of bytes 0-3 / 4-7."""
    a, m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat((a & 0x3F, (hi & 0x0F) | ((a >> 6) << 4)), dim=1)
    mins = torch.cat((m & 0x3F, (hi >> 4) | ((m >> 6) << 4)), dim=1)
    return scales.to(torch.float32), mins.to(torch.float32)


# ---------------------------------------------------------------------------
# block decoders: uint8 [n, type_size] -> float32 [n, block_size]
# Products are formed in the same order as ggml so results are bit-identical;
# none of them is fused (no FMA), which would change the last bit.
# ---------------------------------------------------------------------------

def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    # f16 d | int8 q[32];  y = d * q
    d = _f16(b, 0)
    return b[:, 2:].view(torch.int8).to(torch.float32) * d


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    # f16 d | q[16] nibbles;  y = d * (q - 8)
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:]).reshape(b.shape[0], 32).to(torch.float32) - 8.0
    return q * d


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    # f16 d | f16 m | q[16] nibbles;  y = d * q + m
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:]).reshape(b.shape[0], 32).to(torch.float32)
    return q * d + m


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    # f16 d | f16 dmin | scales[12] | q[128]; 8 sub-blocks of 32:
    # y = (d * sc[j]) * q - (dmin * mn[j]); byte group c (32 bytes) holds sub-blocks 2c, 2c+1
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32).reshape(n * 4, 32))  # [4n, 2, 32]
    q = q.reshape(n, 8, 32).to(torch.float32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    # f16 d | f16 dmin | scales[12] | qh[32] | qs[128]; like Q4_K plus a 5th bit:
    # bit j of qh[l] is the high bit of element l of sub-block j
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    lo = _nibbles(b[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    hi = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # [n, 8, 32]
    q = (lo | (hi << 4)).to(torch.float32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | int8 scales[16] | f16 d  (d comes LAST in this format)
    # Two halves of 128; in half h, ql[64h + i] low/high nibble -> element i / i + 64,
    # qh[32h + l] bit pairs 0,2,4,6 -> top 2 bits of elements l, l+32, l+64, l+96.
    # y = (d * scale[e // 16]) * (q - 32)
    n = b.shape[0]
    d = _f16(b, 208)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)  # [n, 16]
    lo = _nibbles(b[:, 0:128].reshape(n * 2, 64)).reshape(n, 2, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    hi = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = (lo | (hi << 4)).to(torch.float32) - 32.0
    return ((d * sc).reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _q5_codes(b: torch.Tensor, qh_at: int, qs_at: int) -> torch.Tensor:
    """Q5_0/Q5_1's 5-bit codes [n, 32]: element e's low 4 bits from qs (j low, j + 16 high nibble),
    its 5th bit is bit e of the little-endian uint32 qh."""
    n = b.shape[0]
    qh = b[:, qh_at:qh_at + 4].contiguous().view(torch.int32)  # [n, 1]
    high = (qh >> torch.arange(32, dtype=torch.int32)) & 1  # [n, 32]
    low = _nibbles(b[:, qs_at:qs_at + 16]).reshape(n, 32).to(torch.int32)
    return (low | (high << 4)).to(torch.float32)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    # f16 d | qh[4] | qs[16]; x = d * (q - 16)
    return _f16(b, 0) * (_q5_codes(b, 2, 6) - 16.0)


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    # f16 d | f16 m | qh[4] | qs[16]; x = d * q + m
    return _f16(b, 0) * _q5_codes(b, 4, 8) + _f16(b, 2)


_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    _T.Q8_0: _deq_q8_0,
    _T.Q5_0: _deq_q5_0,
    _T.Q5_1: _deq_q5_1,
    _T.Q4_0: _deq_q4_0,
    _T.Q4_1: _deq_q4_1,
    _T.Q4_K: _deq_q4_k,
    _T.Q5_K: _deq_q5_k,
    _T.Q6_K: _deq_q6_k,
}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in (*_FLOAT_VIEW, *_DECODERS))


def _type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"unknown GGML type id {qtype}"


def _flat_bytes(raw: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The stored bytes as a flat uint8 array of the same library, without copying when
    the input is contiguous. numpy input is kept as numpy (see `dequantize`)."""
    if isinstance(raw, torch.Tensor):
        t = raw.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous().reshape(-1).view(torch.uint8)
    a = np.asarray(raw)  # drops the memmap subclass, keeps the mapping
    if a.dtype.byteorder == ">":
        raise ValueError("big-endian GGUF data is not supported")
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def dequantize(
    raw: torch.Tensor | np.ndarray,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode a GGUF tensor's stored bytes into a new contiguous tensor of `shape`.

    `raw` is the data as stored (uint8 bytes for quantised types, possibly [rows,
    bytes_per_row]; typed float or uint8 for F32/F16/BF16). `shape` is the PyTorch-order
    shape (gguf's reversed `ReaderTensor.shape`); blocks run along its last dim.
    """
    qtype = int(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"GGUF tensor type {_type_name(qtype)} is not supported "
            f"(supported: {', '.join(sorted(_type_name(t) for t in SUPPORTED_TYPES))})"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    shape = tuple(int(s) for s in shape)  # the reader hands out numpy uint64s
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    name = _type_name(qtype)
    inner = shape[-1] if shape else 1
    if inner % block_size != 0:
        raise ValueError(
            f"{name}: inner dimension {inner} of shape {shape} is not a multiple of the "
            f"block size {block_size}"
        )
    n_elems = int(np.prod(shape, dtype=np.int64))
    n_blocks = n_elems // block_size
    n_bytes = n_blocks * type_size

    src = _flat_bytes(raw)
    if src.shape[0] != n_bytes:
        raise ValueError(
            f"{name} tensor of shape {shape} needs {n_bytes} bytes "
            f"({n_blocks} blocks x {type_size}), got {src.shape[0]}"
            + (" (truncated?)" if src.shape[0] < n_bytes else "")
        )

    out = torch.empty(n_blocks, block_size, dtype=dtype)
    if n_blocks == 0:
        return out.reshape(shape)

    float_view = _FLOAT_VIEW.get(qtype)
    per_chunk = max(1, _CHUNK_ELEMS // block_size)  # blocks per step
    # A read-only numpy source (GGUFReader's memmap) can't become a torch tensor
    # without torch's non-writable warning (and a write through it would segfault), so
    # each chunk's bytes are copied into one small torch-owned staging buffer: cheap,
    # cache-resident, and the input is never aliased by anything we return.
    stage: torch.Tensor | None = None
    stage_np: np.ndarray | None = None
    if isinstance(src, np.ndarray):
        stage = torch.empty(min(n_blocks, per_chunk) * type_size, dtype=torch.uint8)
        stage_np = stage.numpy()

    for start in range(0, n_blocks, per_chunk):
        stop = min(start + per_chunk, n_blocks)
        lo, hi = start * type_size, stop * type_size
        if stage_np is not None:
            assert stage is not None
            np.copyto(stage_np[: hi - lo], src[lo:hi])
            chunk = stage[: hi - lo]
        else:
            chunk = src[lo:hi]  # type: ignore[assignment]
        if float_view is not None:
            # F32/F16/BF16: reinterpret the bytes; copy_ does the (exact) widening cast
            out[start:stop].copy_(chunk.view(float_view).view(stop - start, 1))
        else:
            out[start:stop].copy_(_DECODERS[qtype](chunk.view(stop - start, type_size)))
    return out.reshape(shape)


# ---------------------------------------------------------------------------
# quantisers (simple types only), following ggml's reference C rounding
# ---------------------------------------------------------------------------

def _blocks_of(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(
            f"{name}: last dimension of shape {tuple(x.shape)} must be a multiple of {block_size}"
        )
    lead = tuple(x.shape[:-1])
    xb = x.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1, block_size)
    return xb, lead


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> its f16 encoding as uint8 [n, 2] (round to nearest even)."""
    return v.to(torch.float16).contiguous().view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] of 0..15 -> [n, 16]: element j low nibble, element j + 16 high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf: ties away from zero (torch.round is ties-to-even). Exact: `v - trunc(v)`
    is representable, so no `+ 0.5` rounding trap near 0.49999997."""
    t = torch.trunc(v)
    return t + torch.trunc(2.0 * (v - t))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # ggml: id = d ? 1/d : 0 (an all-zero block encodes as zeros, not NaN)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _reshape_out(blocks: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    return blocks.reshape(*lead, -1) if lead else blocks.reshape(-1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Quantise to Q8_0 along the last dim; returns uint8 [*x.shape[:-1], bytes_per_row]."""
    xb, lead = _blocks_of(x, 32, "Q8_0")
    d = xb.abs().amax(dim=1, keepdim=True) / 127.0
    q = _round_half_away(xb * _inverse(d)).to(torch.int8).view(torch.uint8)
    return _reshape_out(torch.cat((_f16_bytes(d), q), dim=1), lead)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Quantise to Q4_0 along the last dim; returns uint8 [*x.shape[:-1], bytes_per_row]."""
    xb, lead = _blocks_of(x, 32, "Q4_0")
    # the signed value of largest magnitude maps to -8, so the full [-8, 7] range is used
    idx = xb.abs().argmax(dim=1, keepdim=True)  # first maximum on ties, like ggml's loop
    d = xb.gather(1, idx) / -8.0
    # x*id + 8.5 >= 0.5 here, so truncation is floor(x*id + 8.5) i.e. round-half-up
    q = torch.trunc(xb * _inverse(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    return _reshape_out(torch.cat((_f16_bytes(d), _pack_nibbles(q)), dim=1), lead)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """Quantise to Q4_1 along the last dim; returns uint8 [*x.shape[:-1], bytes_per_row]."""
    xb, lead = _blocks_of(x, 32, "Q4_1")
    lo = xb.amin(dim=1, keepdim=True)
    d = (xb.amax(dim=1, keepdim=True) - lo) / 15.0
    q = torch.trunc((xb - lo) * _inverse(d) + 0.5).clamp_(0, 15).to(torch.uint8)
    return _reshape_out(torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), dim=1), lead)
