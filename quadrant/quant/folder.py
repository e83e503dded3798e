"""The quantised-folder format: how `quadrant quantize` stores a weight, and how a folder's tensors read back.

The one module both sides share: quant/quantize.py writes folders with `quantize_tensor`, and
loader/source.py reads them with `iter_dequantized` and `tensor_format`. It imports neither of
them (only the grids and the errors), so they need not import each other at module level. The
per-weight layout is in quant/quantize.py's module docstring.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from quadrant.errors import QuadrantError
from quadrant.quant.grids import group_size_for, int4_groups, int8_per_channel
from quadrant.quant.registry import QUANT_FORMATS, WEIGHT_FORMATS


class QuantizeError(QuadrantError, ValueError):
    """The model cannot be quantised as asked (nothing was written)."""


# -- packing -----------------------------------------------------------------------------------
def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[.., K] ints in [0, 15] -> [.., K/2] uint8, even k in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def quantize_tensor(weight: torch.Tensor, fmt: str, preferred_group: int = 128,
                    on_grid: bool = False) -> dict[str, torch.Tensor]:
    """weight [.., N, K] -> {"qweight", "scales"(, "mins")} in the layout of quant/quantize.py's docstring
    (`on_grid`: the weight already sits on the format's grids, GPTQ's, which are then stored exactly)."""
    w = weight.float()
    bits = WEIGHT_FORMATS[fmt].weight_bits if fmt in QUANT_FORMATS else None
    if bits == 8:
        flat = w.reshape(-1, w.shape[-1])
        q, scale = int8_per_channel(flat, on_grid)
        return {"qweight": q.reshape(w.shape), "scales": scale.reshape(w.shape[:-1])}
    if bits == 4:
        codes, scale, lo = int4_groups(w, group_size_for(w.shape[-1], preferred_group), on_grid)
        return {"qweight": _pack_nibbles(codes.reshape(w.shape)), "scales": scale.squeeze(-1), "mins": lo.squeeze(-1)}
    raise QuantizeError(f"format must be one of {', '.join(QUANT_FORMATS)}, got {fmt!r}")


def dequantize_tensor(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """The float weight a stored triple stands for (exactly the grid `quantize_tensor` chose)."""
    q, scale = parts["qweight"], parts["scales"].float()
    if WEIGHT_FORMATS[fmt].weight_bits == 8:
        return q.float() * scale.unsqueeze(-1)
    codes = _unpack_nibbles(q).float()  # [.., N, K]
    grouped = codes.reshape(*codes.shape[:-1], scale.shape[-1], codes.shape[-1] // scale.shape[-1])
    return (grouped * scale.unsqueeze(-1) + parts["mins"].float().unsqueeze(-1)).reshape(codes.shape)


def stored_group_size(parts: dict[str, torch.Tensor]) -> int:
    """The 4-bit group a stored weight was quantised with (0 for per-channel formats)."""
    if "mins" not in parts:
        return 0
    return 2 * parts["qweight"].shape[-1] // parts["scales"].shape[-1]


def tensor_format(name: str, fmt: str) -> str:
    """The format a weight runs in: the model's, but the LM head is always int8 weight-only (its
    logits feed sampling directly, and it is one matrix: 8-bit activations or 4-bit weights
    there cost more quality than the bytes they save)."""
    head = name == "lm_head" or name.startswith("lm_head.")
    return "int8" if head else fmt


def iter_dequantized(tensors: Iterator[tuple[str, torch.Tensor]], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantised folder's tensors with every stored triple turned back into `P.weight`."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        stem, _, part = name.rpartition(".")
        if part not in ("qweight", "scales", "mins"):
            yield name, tensor
            continue
        parts = pending.setdefault(stem, {})
        parts[part] = tensor
        own = tensor_format(stem, fmt)
        if set(parts) == ({"qweight", "scales", "mins"} if WEIGHT_FORMATS[own].four_bit else {"qweight", "scales"}):
            yield f"{stem}.weight", dequantize_tensor(pending.pop(stem), own)
    if pending:
        raise QuadrantError(f"quantised weights incomplete for {sorted(pending)[:3]}")
