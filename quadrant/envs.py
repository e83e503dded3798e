"""The one reader of QUADRANT_* environment variables.

Environment variables only locate things or switch on debugging; behaviour is
configured through the dataclass configs in config.py.
"""

from __future__ import annotations

import os
from pathlib import Path


def quadrant_home() -> Path:
    """Root of the model store and caches: $QUADRANT_HOME, default ~/.cache/quadrant."""
    value = os.environ.get("QUADRANT_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "quadrant"


def debug() -> bool:
    """QUADRANT_DEBUG=1 shows full tracebacks on the CLI instead of one-line errors."""
    return os.environ.get("QUADRANT_DEBUG", "") not in ("", "0", "false")


def api_key() -> str | None:
    """QUADRANT_API_KEY: the server's API key when --api-key is not given."""
    return os.environ.get("QUADRANT_API_KEY") or None


def native_kernels() -> bool:
    """QUADRANT_NATIVE_KERNELS=0 keeps torch's CPU kernels instead of the compiled integer-dot ones."""
    return os.environ.get("QUADRANT_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def cpu_compile() -> bool:
    """QUADRANT_CPU_COMPILE=0 keeps CPU decode steps eager (no torch.compile'd graphs)."""
    return os.environ.get("QUADRANT_CPU_COMPILE", "1") not in ("0", "false", "no")


def small_batch_tokens() -> int | None:
    """QUADRANT_SMALL_BATCH_TOKENS=N: CPU steps of up to N tokens take the compact decode kernels, larger
    ones dense GEMMs; unset, the crossover is measured on this machine (quant/formats.py)."""
    value = os.environ.get("QUADRANT_SMALL_BATCH_TOKENS")
    return int(value) if value else None


def async_scheduling() -> bool:
    """QUADRANT_ASYNC_SCHEDULING=1: engines that support overlapped scheduling use it unless configured
    otherwise (EngineConfig.async_scheduling, --[no-]async-scheduling); it is off by default."""
    return os.environ.get("QUADRANT_ASYNC_SCHEDULING", "0") not in ("0", "false", "no")
