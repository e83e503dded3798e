"""The weight formats quadrant knows, one description each: the single list the CLI, the configs,
the quantiser and the kernels' format choice read (no torch here, so anything may import it).

What a format is (bits, groups, activation precision, where it runs) lives here; how it packs and
multiplies lives in quant/formats.py, and how a quantised folder stores it in quant/folder.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class FormatSpec:
    name: str
    weight_bits: int  # 16: the checkpoint's floats; 8: per-channel int8; 4: asymmetric groups
    activation_bits: int  # 16: float activations; 8: per-token 8-bit activations inside the matmul
    default_group: int | None  # 4-bit formats: inputs per (scale, min) group when nothing else says
    gpu: bool  # has CUDA kernels (the others are dequantised at load on a GPU)
    min_capability: tuple[int, int] | None = None  # on CUDA: the tensor cores it needs
    note: str = ""  # one line for help texts

    @property
    def quantized(self) -> bool:
        return self.weight_bits < 16

    @property
    def four_bit(self) -> bool:
        return self.weight_bits == 4


WEIGHT_FORMATS = MappingProxyType({f.name: f for f in (
    FormatSpec("dense", 16, 16, None, gpu=True, note="the checkpoint's floats"),
    FormatSpec("int8", 8, 16, None, gpu=False, note="per-channel int8 weights, float activations"),
    # fp8 e4m3 weights and activations on Ada/Hopper tensor cores; int8 x per-token int8 on the CPU.
    FormatSpec("w8a8", 8, 8, None, gpu=True, min_capability=(8, 9), note="8-bit weights and activations"),
    FormatSpec("w4a16", 4, 16, 128, gpu=False, note="4-bit groups, float activations"),
    # 4-bit groups on the int8 tensor cores (Ampere on).
    FormatSpec("w4a8", 4, 8, 128, gpu=True, min_capability=(8, 0), note="4-bit groups, 8-bit activations"),
)})
QUANT_FORMATS = tuple(name for name, f in WEIGHT_FORMATS.items() if f.quantized)
GPU_FORMATS = tuple(name for name, f in WEIGHT_FORMATS.items() if f.gpu)


def format_spec(name: str) -> FormatSpec:
    """The format called `name`; a ValueError naming the known ones otherwise."""
    try:
        return WEIGHT_FORMATS[name]
    except KeyError:
        raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {name!r}") from None
