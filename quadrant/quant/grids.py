"""The integer grids weights and activations are rounded to: 8-bit per channel or per token, 4-bit per group.

Pure tensor math from float tensors to (codes, steps[, mins]), shared by the CPU formats
(quant/formats.py), the quantised-folder layout (quant/folder.py), calibration and the GPU
kernels (kernels/quant_moe.py). A leaf: it imports torch only, nothing from quadrant, so any
layer, kernel or loader can use it without pulling in the formats or their kernels.
"""

from __future__ import annotations

import torch


def int8_per_channel(weight: torch.Tensor, on_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [N, K] -> (q int8 [N, K], scale fp32 [N]), weight ~= q * scale[:, None].

    `on_grid`: the rows are known to sit on int8 grids (GPTQ's, an int8 folder's, or a slice of a
    rounded row under tensor parallelism) whose largest code may be under 127, where amax / 127
    would round them again: each such row keeps the step amax / m of the largest m <= 127 that
    reproduces it."""
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / 127.0
    if on_grid:
        exact = _int8_reproduces(w, scale)
        for m in range(126, 0, -1):  # GPTQ moves the largest code by a few steps; a slice's may be anything
            if bool(exact.all()):
                break
            fits = ~exact & _int8_reproduces(w, amax / m)
            scale = torch.where(fits, amax / m, scale)
            exact |= fits
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_reproduces(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N]: whether each row sits on the symmetric grid of its step (`_reproduces` with min 0)."""
    step = scale[:, None]
    return _reproduces(torch.round(w / step), step, torch.zeros_like(step), w).squeeze(-1)


def int4_groups(weight: torch.Tensor, group_size: int,
                on_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the last dim: weight [.., K] -> (codes [.., K/g, g] in 0..15,
    scale and min [.., K/g, 1]), weight ~= codes * scale + min (the min/max grid). A weight on
    such a grid (GGUF Q4_1 with g = 32) gets the same codes back.

    `on_grid`: the weight is known to sit on 4-bit grids of this group size (GPTQ's output, a
    `quadrant quantize` folder) whose codes may not reach both ends (clipped, or moved inwards by
    GPTQ's updates), where the min/max grid would round them again. Such a group spans m < 15
    steps of its grid: the largest m that reproduces it is taken (codes 0..m). Off by default:
    the search costs ~15 roundings on float weights."""
    w = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    codes = torch.round((w - lo) / scale).clamp_(0, 15)
    if not on_grid:
        return codes, scale, lo
    exact = _reproduces(codes, scale, lo, w)
    for steps in range(14, 0, -1):
        if bool(exact.all()):
            break
        step = ((hi - lo) / steps).clamp_min(1e-12)
        fits = ~exact & _reproduces(torch.round((w - lo) / step), step, lo, w)
        if bool(fits.any()):
            scale = torch.where(fits, step, scale)
            codes = torch.where(fits, torch.round((w - lo) / step), codes)
            exact |= fits
    return codes, scale, lo


def _reproduces(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[.., 1]: whether every weight of the group sits on codes * scale + lo (to a thousandth of a step:
    fp32 rounding of a stored grid is ~1e-5 of one; random weights are nowhere near all on one)."""
    return ((codes * scale + lo - w).abs() <= 1e-3 * scale).all(-1, keepdim=True)


def group_size_for(in_features: int, preferred: int = 128) -> int:
    """The largest of preferred, 64, 32 dividing the input width (SmolLM2's 576 takes 64)."""
    for g in (preferred, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"4-bit formats need in_features divisible by 32, got {in_features}")


def int8_per_token(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [.., K] float -> (codes [.., K] as floats in -127..127, step [.., 1]): each row rounded to the
    symmetric int8 grid of its amax / 127, the 8-bit-activation kernels' grid (CPU and GPU w4a8).
    `amax` [.., 1]: the row's absolute maximum when x is only part of it (a row-parallel shard)."""
    if amax is None:
        amax = x.abs().amax(-1, keepdim=True)
    step = amax.clamp_min(1e-12) / 127.0
    return torch.round(x / step).clamp_(-127, 127), step
