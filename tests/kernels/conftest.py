from __future__ import annotations

import pytest
import torch

from tests.kernel_device import KERNEL_DEVICE


@pytest.fixture
def on_kernel_device():
    """Tensors a test creates land where the kernels run (a compiled kernel cannot read CPU tensors).
    Opt-in per module (`pytestmark`): seeded CPU generators need CPU factories."""
    with torch.device(KERNEL_DEVICE):
        yield
