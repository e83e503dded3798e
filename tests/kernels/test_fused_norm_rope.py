"""fused_norm_rope: each Triton kernel against its torch reference (the layer's own code).

Without a GPU the kernels run on CPU tensors under Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before any test imports quadrant.kernels, which is when triton 3.6 reads it.

Tolerances: fp32 1e-5, as both sides do the same fp32 math in another order. bf16 1.6e-2 (2^-6,
two bf16 ulps): the kernels round once from fp32 where torch rounds intermediates (x * cos,
act(gate)) to bf16, and the interpreter truncates fp32 -> bf16 where GPUs round to nearest.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from quadrant.kernels import fused_norm_rope as fnr
from quadrant.layers.rotary import RotaryEmbedding
from tests.kernel_device import KERNEL_DEVICE

DEVICE = KERNEL_DEVICE
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


# -- rms_norm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens,D", [(1, 64), (7, 96), (33, 100), (7, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_layer(num_tokens, D, dtype, with_residual, offset):
    torch.manual_seed(D + num_tokens)
    x = torch.randn(num_tokens, D, device=DEVICE).to(dtype)
    weight = (torch.randn(D, device=DEVICE) * 0.5 + 1.0 - offset).to(dtype)
    residual = torch.randn(num_tokens, D, device=DEVICE).to(dtype) if with_residual else None
    x_before = x.clone()
    res_before = residual.clone() if residual is not None else None

    got = fnr.rms_norm(x, weight, 1e-6, residual, offset)
    want = fnr.rms_norm_ref(x, weight, 1e-6, residual, offset)

    # The norm of bf16 with offset 0 rounds twice (h to bf16, then weight * h), each a truncation
    # under the interpreter: allow three ulps (2.4e-2) there.
    tol = 2.4e-2 if dtype == torch.bfloat16 and not offset else TOL[dtype]
    if residual is None:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        _close(got, want, tol)
    else:
        assert isinstance(got, tuple) and isinstance(want, tuple)
        _close(got[0], want[0], tol)
        # x + residual is one rounding of an exact sum: equal on GPU, at most one ulp (rtol 2^-7)
        # apart under the interpreter, which truncates.
        torch.testing.assert_close(got[1], want[1], atol=0.0, rtol=2**-7)
        assert torch.equal(residual, res_before)
    assert torch.equal(x, x_before)  # the sum goes to a new tensor, never into the caller's x


def test_rms_norm_strided_rows_and_leading_dims():
    torch.manual_seed(1)
    D = 100
    wide = torch.randn(2, 3, D + 28, device=DEVICE)
    x = wide[..., :D]  # [2, 3, D], rows D + 28 apart
    residual = torch.randn(2, 3, D, device=DEVICE)
    weight = torch.randn(D, device=DEVICE)
    got = fnr.rms_norm(x, weight, 1e-5, residual)
    want = fnr.rms_norm_ref(x, weight, 1e-5, residual)
    assert isinstance(got, tuple) and isinstance(want, tuple)
    _close(got[0], want[0], TOL[torch.float32])
    _close(got[1], want[1], TOL[torch.float32])


# -- apply_rotary_inplace ----------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_q_and_k_slices_of_fused_qkv(num_tokens, D, dtype):
    torch.manual_seed(num_tokens * D)
    num_q, num_kv = 3, 1
    rope = RotaryEmbedding(D, 4096, 10000.0).to(DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), device=DEVICE)
    cos, sin = rope.cos_sin(positions, dtype)  # [T, 1, D] each
    qkv = torch.randn(num_tokens, num_q + 2 * num_kv, D, device=DEVICE).to(dtype)  # [T, Hq + 2Hk, D]
    q, k, v = qkv.split([num_q, num_kv, num_kv], dim=1)  # views, token stride (Hq + 2Hk) * D
    want_q, want_k = fnr.apply_rotary_ref(q, cos, sin), fnr.apply_rotary_ref(k, cos, sin)
    v_before = v.clone()

    assert fnr.apply_rotary_inplace(q, cos, sin) is q
    fnr.apply_rotary_inplace(k, cos.squeeze(1), sin.squeeze(1))  # [T, D] tables too

    _close(q, want_q, TOL[dtype])
    _close(k, want_k, TOL[dtype])
    assert torch.equal(v, v_before)  # nothing written outside the rotated heads


def test_rotary_half_not_a_power_of_two():
    torch.manual_seed(2)
    D, num_tokens = 100, 5  # half = 50: masked lanes in the tile
    rope = RotaryEmbedding(D, 64, 500000.0).to(DEVICE)
    cos, sin = rope.cos_sin(torch.arange(num_tokens, device=DEVICE), torch.float32)
    x = torch.randn(num_tokens, 4, D, device=DEVICE)  # [T, H, D]
    want = fnr.apply_rotary_ref(x, cos, sin)
    _close(fnr.apply_rotary_inplace(x, cos, sin), want, TOL[torch.float32])


# -- act_and_mul -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (7, 100), (33, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_and_mul_matches_mlp(num_tokens, inter, dtype, activation):
    torch.manual_seed(inter)
    gate_up = (torch.randn(num_tokens, 2 * inter, device=DEVICE) * 3).to(dtype)  # [T, 2I]
    _close(fnr.act_and_mul(gate_up, activation), fnr.act_and_mul_ref(gate_up, activation), TOL[dtype])


# numpy, under the interpreter, warns where the GPU quietly gives inf; inf is what the math wants.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_and_mul_extreme_gates_stay_finite(activation):
    # exp overflows for |gate| > 88: the kernels must still give the limits, not nan.
    gate = torch.tensor([-1e30, -1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4, 1e30], device=DEVICE)
    gate_up = torch.cat([gate, torch.ones_like(gate)]).view(1, 1, -1)  # [1, 1, 2I]: leading dims kept
    got = fnr.act_and_mul(gate_up, activation)
    assert got.shape == (1, 1, gate.numel()) and torch.isfinite(got).all()
    _close(got, fnr.act_and_mul_ref(gate_up, activation), TOL[torch.float32])


def test_empty_batch_launches_nothing():
    weight = torch.ones(64, device=DEVICE)
    out, summed = fnr.rms_norm(_x(0, 64), weight, 1e-6, residual=_x(0, 64))
    assert out.shape == summed.shape == (0, 64)
    assert fnr.apply_rotary_inplace(_x(0, 2, 64), _x(0, 64), _x(0, 64)).shape == (0, 2, 64)
    assert fnr.act_and_mul(_x(0, 128)).shape == (0, 64)


# -- input checks and fallbacks ----------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda: fnr.rms_norm(_x(4, 64), _x(63), 1e-6),  # weight's dim != x's last dim
        lambda: fnr.rms_norm(_x(4, 64), _x(64).bfloat16(), 1e-6),  # weight dtype != x dtype
        lambda: fnr.rms_norm(_x(4, 64), _x(64), 1e-6, residual=_x(3, 64)),  # residual shape
        lambda: fnr.rms_norm(_x(4, 64).int(), _x(64).int(), 1e-6),  # not a float dtype
        lambda: fnr.act_and_mul(_x(4, 127)),  # odd gate_up width
        lambda: fnr.act_and_mul(_x(4, 128), "relu"),  # unknown activation
        lambda: fnr.apply_rotary_inplace(_x(4, 2, 63), _x(4, 63), _x(4, 63)),  # odd head dim
        lambda: fnr.apply_rotary_inplace(_x(4, 2, 64), _x(5, 1, 64), _x(5, 1, 64)),  # table of another T
        lambda: fnr.apply_rotary_inplace(_x(4, 64, 2).transpose(1, 2), _x(4, 64), _x(4, 64)),  # D strided
        lambda: fnr.apply_rotary_inplace(_x(4, 64), _x(4, 64), _x(4, 64)),  # not [T, H, D]
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def _load_copy(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_modules_import_without_triton(monkeypatch):
    """CPU-only installs have no Triton: every kernel module still imports, its references run and
    its launchers refuse with a clear error."""
    import quadrant.kernels.kv_store as kv_store
    import quadrant.kernels.paged_decode as paged_decode
    import quadrant.kernels.triton_import as triton_import

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    shim = _load_copy(triton_import.__file__, "triton_import_without_triton")
    assert not shim.HAS_TRITON
    monkeypatch.setitem(sys.modules, "quadrant.kernels.triton_import", shim)
    fused = _load_copy(fnr.__file__, "fused_without_triton")
    x, weight = torch.randn(2, 8), torch.ones(8)
    assert not fused.use_fused(x)
    assert isinstance(fused.rms_norm_ref(x, weight, 1e-6), torch.Tensor)
    with pytest.raises(RuntimeError):
        fused.rms_norm(x, weight, 1e-6)
    store = _load_copy(kv_store.__file__, "kv_store_without_triton")
    cache = torch.zeros(2, 1, 4, 8)
    store.store_kv_ref(x[:1, None], x[:1, None], cache, cache.clone(), torch.tensor([5]))
    assert torch.equal(cache[1, 0, 1], x[0])
    with pytest.raises(RuntimeError, match="needs Triton"):
        store.store_kv(x[:1, None], x[:1, None], cache, cache.clone(), torch.tensor([5]))
    decode = _load_copy(paged_decode.__file__, "paged_decode_without_triton")
    assert decode.plan_splits([100], 1, 8)[0] >= 1


def test_use_fused_only_for_cuda_tensors():
    assert not fnr.use_fused(torch.zeros(1))
    if torch.cuda.is_available():
        assert fnr.use_fused(torch.zeros(1, device="cuda"))
