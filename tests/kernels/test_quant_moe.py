"""The 8-bit-activation kernels (W4A8 and fp8 W8A8: kernels/quant_moe) against their torch references.

The references take the same quantised activations and the dequantised weights in fp32, so the
only difference is summation order: int32 sums (exact) times fp32 scales for W4A8, fp32
accumulation of exact fp8 products for fp8: 1e-5 relative to the output norm (fp32 inputs).
The MoE requantises act(gate) * up between its two GEMMs, where the kernel's and the reference's
fp32 activations may differ in the last bit and move a rare int8 code by one: 1e-3 there. bf16
inputs (GPU only) round gate_up and the outputs to bf16: 2e-2 (5e-2 for fp8's coarser steps). Against the float model the
quantisation error itself is bounded loosely (random N(0, 1) weights; real weights do better).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quadrant.kernels.fused_moe import fused_moe_ref
from quadrant.kernels.quant_moe import (
    PREFILL_TILES,
    Q8Blocks,
    W4A8Weights,
    fused_moe_q8,
    fused_moe_q8_ref,
    pack_fp8,
    pack_w4a8,
    pick_q8_blocks,
    quant_linear,
    quant_linear_ref,
    quantize_activations,
)
from quadrant.quant.folder import quantize_tensor
from quadrant.quant.grids import int4_groups
from tests.kernel_device import KERNEL_DEVICE

pytestmark = pytest.mark.usefixtures("on_kernel_device")

PACKERS = {"w4a8-g32": lambda w: pack_w4a8(w, 32), "w4a8-g64": lambda w: pack_w4a8(w, 64),
           "w4a8-g128": lambda w: pack_w4a8(w, 128), "fp8": pack_fp8}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def test_w4a8_packing_is_the_stored_grid():
    """Codes are `quadrant quantize`'s (nibbles paired within each group as the kernel reads them:
    input j with input j + g/2); scale and min give back its grid exactly."""
    torch.manual_seed(0)
    w = torch.randn(3, 48, 256)
    packed = pack_w4a8(w, 64)
    stored = quantize_tensor(w, "w4a8", 64)["qweight"]
    assert torch.equal(packed.codes(), torch.stack([stored & 0x0F, stored >> 4], dim=-1).flatten(-2))
    assert torch.equal(packed.qweight[..., :32] & 0x0F, packed.codes()[..., :32])  # group 0: inputs 0-31 low
    assert torch.equal(packed.qweight[..., :32] >> 4, packed.codes()[..., 32:64])  # inputs 32-63 high
    codes, scale, lo = int4_groups(w, 64)
    torch.testing.assert_close(packed.dequantize(), (codes * scale + lo).view(w.shape), atol=1e-6, rtol=1e-6)


def test_activation_sums_are_the_group_sums_of_the_codes():
    torch.manual_seed(1)
    x = torch.randn(7, 256) * torch.linspace(0.1, 10, 256)
    acts = quantize_activations(x, pack_w4a8(torch.randn(8, 256), 64))
    assert acts.q.dtype == torch.int8 and acts.q.abs().max() == 127
    assert torch.equal(acts.group_sums, acts.q.int().view(7, 4, 64).sum(-1))
    torch.testing.assert_close(acts.q.float() * acts.scale[:, None], x, atol=float(x.abs().max()) / 254, rtol=0)


@pytest.mark.parametrize("fmt", list(PACKERS))
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_quant_linear_matches_reference(fmt, rows):
    torch.manual_seed(rows)
    w = torch.randn(96, 256) * 0.05  # 96 outputs: a partial 64-wide tile
    weights = PACKERS[fmt](w)
    x = torch.randn(rows, 256)
    bias = torch.randn(96)
    out = quant_linear(x, weights, bias)
    assert out.shape == (rows, 96) and out.dtype == x.dtype
    # Hopper's fp8 tensor cores accumulate each 128-input step with ~14 mantissa bits (measured 2e-4
    # on an H200 before per-step promotion); everything else sums exactly or in fp32.
    exact = 1e-3 if KERNEL_DEVICE == "cuda" and fmt == "fp8" else 1e-5
    assert rel_err(out - bias, quant_linear_ref(x, weights)) < exact
    bound = 0.12 if isinstance(weights, W4A8Weights) else 0.05  # measured ~0.08 (4-bit) and ~0.03 (fp8)
    assert rel_err(out - bias, x @ w.t()) < bound


@pytest.mark.parametrize("fmt", ["w4a8-g64", "fp8"])
@pytest.mark.parametrize("num_experts,top_k,tokens", [(4, 1, 1), (4, 2, 5), (8, 2, 33), (8, 1, 70)])
def test_fused_moe_q8_matches_reference(fmt, num_experts, top_k, tokens):
    torch.manual_seed(num_experts * 100 + tokens)
    hidden, inter = 128, 64
    w13 = torch.randn(num_experts, 2 * inter, hidden) * 0.05
    w2 = torch.randn(num_experts, hidden, inter) * 0.05
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k), -1)
    q13, q2 = PACKERS[fmt](w13), PACKERS[fmt](w2)
    out = fused_moe_q8(x, q13, q2, weights, ids)
    assert rel_err(out, fused_moe_q8_ref(x, q13, q2, weights, ids)) < 1e-3
    bound = 0.25 if fmt.startswith("w4a8") else 0.1  # two quantised GEMMs; measured ~0.16 and ~0.065
    assert rel_err(out, fused_moe_ref(x, w13, w2, weights, ids)) < bound


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="bf16 tensor-core tiles: GPU only")
@pytest.mark.parametrize("fmt", ["w4a8-g128", "fp8"])
def test_fused_moe_q8_bf16_on_gpu(fmt):
    torch.manual_seed(3)
    w13, w2 = torch.randn(16, 512, 256) * 0.05, torch.randn(16, 256, 256) * 0.05
    x = torch.randn(300, 256)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(300)]).to(torch.int32)
    weights = torch.softmax(torch.randn(300, 4), -1)
    q13, q2 = PACKERS[fmt](w13), PACKERS[fmt](w2)
    out = fused_moe_q8(x.bfloat16(), q13, q2, weights, ids)
    assert out.dtype == torch.bfloat16
    # bf16 gate_up and act * up move some 8-bit codes of the second GEMM's input by one step; an e4m3
    # step is 2^-3 relative (measured 0.033 for fp8 on an H200), an int8 step far less.
    assert rel_err(out, fused_moe_q8_ref(x, q13, q2, weights, ids)) < (5e-2 if fmt == "fp8" else 2e-2)


def test_prefill_tile_is_passed_not_module_state():
    """The prefill tile is PREFILL_TILES' (frozen) or the caller's `prefill`, as a benchmark sweeping
    candidates passes it; block_k always follows the weights, and decode sizes keep their own tile."""
    w4, fp8 = pack_w4a8(torch.randn(8, 256), 64), pack_fp8(torch.randn(8, 256))
    default = pick_q8_blocks(4096, 8, 64, w4)
    tile = PREFILL_TILES.w4a8
    assert default == Q8Blocks(tile.block_m, tile.block_n, w4.span, tile.num_warps, tile.num_stages)
    candidate = Q8Blocks(128, 256, 999, num_warps=8, num_stages=3)
    assert pick_q8_blocks(4096, 8, 64, fp8, candidate) == Q8Blocks(128, 256, 128, 8, 3)
    assert pick_q8_blocks(4096, 8, 64, w4) == default  # the override left nothing behind
    assert pick_q8_blocks(1, 8, 64, w4, candidate).block_m == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        PREFILL_TILES.fp8 = candidate  # type: ignore[misc]
    torch.manual_seed(4)
    w, x = torch.randn(96, 256) * 0.05, torch.randn(70, 256)  # 70 rows: a prefill-sized batch
    for weights in (pack_w4a8(w, 64), pack_fp8(w)):
        out = quant_linear(x, weights, prefill=Q8Blocks(32, 32, 0, num_warps=4, num_stages=2))
        exact = 1e-3 if KERNEL_DEVICE == "cuda" and not isinstance(weights, W4A8Weights) else 1e-5
        assert rel_err(out, quant_linear_ref(x, weights)) < exact


def test_bad_inputs_are_clear_errors():
    weights = pack_w4a8(torch.randn(32, 128), 64)
    with pytest.raises(ValueError, match=r"input must be \[M, 128\]"):
        quant_linear(torch.randn(3, 64), weights)
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of 64"):
        pack_w4a8(torch.randn(32, 96), 64)
    w13, w2 = pack_w4a8(torch.randn(4, 64, 128), 64), pack_w4a8(torch.randn(4, 128, 64), 64)
    ids, weights = torch.zeros(3, 2, dtype=torch.int32), torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"w2 must be W4A8Weights \[4, 128, 32\]"):
        fused_moe_q8(torch.randn(3, 128), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids and topk_weights must both be"):
        fused_moe_q8(torch.randn(3, 128), pack_w4a8(torch.randn(4, 128, 128), 64), pack_w4a8(torch.randn(4, 128, 64), 64),
                     weights[:2], ids)


@pytest.mark.parametrize("fmt", ["w4a8", "w8a8"])
def test_experts_packed_for_the_gpu_run_the_8bit_kernel(fmt):
    """Experts.repack with the GPU format (what the loader hands it on CUDA) keeps the stacks for
    fused_moe_q8, with the linears' packing: the layer then computes the reference's product."""
    from quadrant.layers.moe import Experts
    from quadrant.quant.formats import GpuQ8

    torch.manual_seed(5)
    experts = Experts(4, 128, 64)
    with torch.no_grad():
        experts.w13.normal_(0, 0.05)
        experts.w2.normal_(0, 0.05)
    w13, w2 = experts.w13.detach().clone(), experts.w2.detach().clone()
    experts.repack(GpuQ8(name=fmt, group_size=64))
    assert experts.w13 is None and experts.quant13 is not None
    x = torch.randn(9, 128)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(9)]).to(torch.int32)
    weights = torch.softmax(torch.randn(9, 2), -1)
    pack = (lambda w: pack_w4a8(w, 64)) if fmt == "w4a8" else pack_fp8
    assert rel_err(experts(x, weights, ids), fused_moe_q8_ref(x, pack(w13), pack(w2), weights, ids)) < 1e-3
