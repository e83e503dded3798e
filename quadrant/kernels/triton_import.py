"""`triton` and `triton.language`, or stand-ins that let kernel modules import without Triton.

Without Triton the @triton.jit functions stay plain Python functions that are never launched;
the launchers check `HAS_TRITON` and the CPU path uses the torch references.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: torch's CPU wheel does not bring Triton
    HAS_TRITON = False

    def _jit(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit)  # type: ignore[assignment]
    tl = SimpleNamespace(constexpr=Any, dtype=Any)  # type: ignore[assignment]


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("this path needs Triton: pip install triton (it comes with CUDA builds of torch)")
