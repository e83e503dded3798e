"""Where the Triton kernels under test run: the GPU when there is one (compiled), else the CPU
(Triton's interpreter, switched on in tests/conftest.py)."""

from __future__ import annotations

import os

import torch

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
