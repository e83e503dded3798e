"""fused_moe: the Triton grouped GEMMs (under the interpreter without a GPU) and the torch CPU path
against the per-expert reference, plus moe_align's layout.

Tolerances: fp32 1e-4 (rel and abs, outputs are O(1)): the same fp32 products summed in another
order. bf16 2e-2: the fused paths round gate_up, act * up and each expert's output to bf16 where
the reference stays in fp32 until the end, and the interpreter truncates fp32 -> bf16 where GPUs
round to nearest; each of those is up to 2^-7 relative. int8 weights (w8a16) are compared with the
reference on the dequantised weights at the fp32 (or bf16) bound: codes times scale is exact math.
"""

from __future__ import annotations

import pytest
import torch

from quadrant.kernels.fused_moe import (
    _align_padded,
    expert_counts,
    fused_moe,
    fused_moe_cpu,
    fused_moe_ref,
    max_padded_rows,
    moe_align,
    pick_blocks,
)
from tests.kernel_device import KERNEL_DEVICE

DEVICE = KERNEL_DEVICE
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _case(num_experts, top_k, num_tokens, hidden=64, inter=96, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    topk_weights, topk_ids = logits.softmax(-1).topk(top_k, dim=-1)  # distinct experts per token
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), topk_weights, topk_ids)]


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _both_match_ref(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    want = fused_moe_ref(x, w13, w2, topk_weights, topk_ids, activation)
    _close(fused_moe(x, w13, w2, topk_weights, topk_ids, activation), want, x.dtype)
    _close(fused_moe_cpu(x, w13, w2, topk_weights, topk_ids, activation), want, x.dtype)


# -- fused_moe / fused_moe_cpu against the reference -------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [4, 8])
def test_fp32_matches_reference(num_experts, top_k, num_tokens):
    _both_match_ref(*_case(num_experts, top_k, num_tokens, seed=num_experts * 100 + top_k * 10 + num_tokens))


@pytest.mark.parametrize(
    "dtype,activation", [(torch.float32, "gelu_tanh"), (torch.bfloat16, "silu"), (torch.bfloat16, "gelu_tanh")]
)
def test_dtypes_and_activations(dtype, activation):
    # E=4, T=33, k=2: 66 pairs, over 16 per expert, so the 64-row tiles; fp32 silu is covered above.
    _both_match_ref(*_case(4, 2, 33, dtype=dtype, seed=7), activation=activation)


@pytest.mark.parametrize("num_experts,num_tokens", [(8, 5), (4, 33)])
def test_sizes_off_the_tiles(num_experts, num_tokens):
    # H=48, I=40: gate_up's 80 columns and down's 40-wide K end mid-tile, as do down's 48 columns.
    _both_match_ref(*_case(num_experts, 2, num_tokens, hidden=48, inter=40, seed=3))


def _quantise(w):
    """Per-output-channel symmetric int8: codes [E, N, K], fp32 scales [E, N]."""
    scale = w.float().abs().amax(-1) / 127.0
    codes = (w.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


@pytest.mark.parametrize("dtype,num_tokens", [(torch.float32, 5), (torch.float32, 33), (torch.bfloat16, 33)])
def test_int8_weights_match_reference_on_dequantised_weights(dtype, num_tokens):
    x, w13, w2, topk_weights, topk_ids = _case(4, 2, num_tokens, dtype=dtype, seed=11)
    (q13, s13), (q2, s2) = _quantise(w13), _quantise(w2)
    dq13 = (q13.float() * s13[..., None]).to(dtype)
    dq2 = (q2.float() * s2[..., None]).to(dtype)
    if dtype == torch.bfloat16:  # the bf16 reference needs bf16 weights: compare all in fp32 instead
        want = fused_moe_ref(x.float(), q13.float() * s13[..., None], q2.float() * s2[..., None],
                             topk_weights, topk_ids).to(dtype)
    else:
        want = fused_moe_ref(x, dq13, dq2, topk_weights, topk_ids)
    _close(fused_moe(x, q13, q2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2), want, dtype)
    _close(fused_moe_cpu(x, q13, q2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2), want, dtype)


def test_idle_expert_and_one_hot_expert():
    x, w13, w2, topk_weights, _ = _case(8, 2, 33, seed=5)
    # Slot 0 of every token goes to expert 3 (33 pairs: three 16-row blocks), slot 1 to experts 0-2:
    # experts 4..7 get nothing.
    topk_ids = torch.stack([torch.full((33,), 3), torch.arange(33) % 3], dim=1).to(DEVICE)
    _both_match_ref(x, w13, w2, topk_weights, topk_ids)
    # Every token to one expert, k=1.
    _both_match_ref(x, w13, w2, topk_weights[:, :1], torch.full((33, 1), 6, device=DEVICE))


def test_no_tokens():
    x, w13, w2, topk_weights, topk_ids = _case(4, 2, 0)
    for fn in (fused_moe, fused_moe_cpu, fused_moe_ref):
        assert fn(x, w13, w2, topk_weights, topk_ids).shape == (0, 64)


def test_block_choice():
    assert pick_blocks(1, 8, 64).block_m == 16  # decode
    assert pick_blocks(4096, 8, 64).block_m == 64  # prefill


# -- moe_align --------------------------------------------------------------------------------
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("num_tokens,top_k", [(1, 2), (37, 2), (40, 1)])
def test_moe_align_layout(num_tokens, top_k, block_m):
    num_experts = 8
    g = torch.Generator().manual_seed(num_tokens)
    topk_ids = torch.stack([torch.randperm(num_experts - 2, generator=g)[:top_k] for _ in range(num_tokens)])
    topk_ids = topk_ids.to(torch.int32)  # experts 6 and 7 get nothing
    sorted_ids, expert_of_block, num_rows = moe_align(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)

    assert sorted_ids.dtype == expert_of_block.dtype == torch.int32
    assert num_rows % block_m == 0 and sorted_ids.shape == (num_rows,)
    assert expert_of_block.shape == (num_rows // block_m,)
    assert num_rows == int(((counts + block_m - 1) // block_m * block_m).sum())
    real = sorted_ids[sorted_ids != num_pairs].long()
    assert torch.equal(real.sort().values, torch.arange(num_pairs))  # every (t, j) exactly once
    for b, e in enumerate(expert_of_block.tolist()):  # a block holds one expert's pairs
        ids = sorted_ids[b * block_m : (b + 1) * block_m].long()
        ids = ids[ids != num_pairs]
        assert (flat[ids] == e).all()
    runs = torch.bincount(expert_of_block.long(), minlength=num_experts) * block_m  # each run padded to block_m
    assert torch.equal(runs, (counts + block_m - 1) // block_m * block_m)
    assert torch.equal(expert_of_block, expert_of_block.sort().values)  # runs in expert order

    # The sync-free buffers fused_moe uses: the same rows first, then blocks marked -1.
    padded_ids, padded_experts, total = _align_padded(topk_ids, num_experts, block_m)
    assert padded_ids.shape == (max_padded_rows(num_pairs, num_experts, block_m),)
    assert int(total) == num_rows
    assert torch.equal(padded_ids[:num_rows], sorted_ids)
    assert (padded_ids[num_rows:] == num_pairs).all()
    assert torch.equal(padded_experts[: num_rows // block_m], expert_of_block)
    assert (padded_experts[num_rows // block_m :] == -1).all()


def test_expert_counts():
    topk_ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_counts(topk_ids, 5).tolist() == [2, 1, 0, 3, 0]


# -- bad input ---------------------------------------------------------------------------------
def _bad_inputs():
    x, w13, w2, tw, ti = _case(4, 2, 5, device="cpu")
    q13, s13 = _quantise(w13)
    q2, s2 = _quantise(w2)
    return {
        "x 3-D": ((x[None], w13, w2, tw, ti), {}),
        "E mismatch": ((x, w13, w2[:3], tw, ti), {}),
        "H mismatch": ((x[:, :32], w13, w2, tw, ti), {}),
        "I mismatch": ((x, w13, w2[:, :, :48], tw, ti), {}),
        "odd 2I": ((x, w13[:, :-1], w2, tw, ti), {}),
        "weight dtype": ((x, w13.double(), w2, tw, ti), {}),
        "topk shape": ((x, w13, w2, tw[:, :1], ti), {}),
        "topk tokens": ((x, w13, w2, tw[:4], ti[:4]), {}),
        "ids dtype": ((x, w13, w2, tw, ti.float()), {}),
        "activation": ((x, w13, w2, tw, ti, "relu"), {}),
        "int8 without scale": ((x, q13, q2, tw, ti), {}),
        "scale shape": ((x, q13, q2, tw, ti), {"w13_scale": s13[:, :4], "w2_scale": s2}),
        "scale on float": ((x, w13, w2, tw, ti), {"w13_scale": s13}),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_input_raises(name):
    args, kwargs = _bad_inputs()[name]
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
    for fn in (fused_moe, fused_moe_cpu):
        with pytest.raises(ValueError):
            fn(*args, **kwargs)
    if not kwargs and name != "int8 without scale":
        with pytest.raises(ValueError):
            fused_moe_ref(*args)


def test_moe_align_bad_input():
    with pytest.raises(ValueError):
        moe_align(torch.zeros(4, 2), 4, 16)
    with pytest.raises(ValueError):
        moe_align(torch.zeros(4, 2, dtype=torch.int32), 4, 0)


# -- compiled, on a GPU ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCompiled:
    """Model-sized shapes (64 experts, top-8): bf16 tensor-core tiles, so the bf16 bound."""

    def test_bf16_matches_reference(self):
        x, w13, w2, tw, ti = _case(64, 8, 256, hidden=2048, inter=768, dtype=torch.bfloat16, device="cuda")
        _close(fused_moe(x, w13, w2, tw, ti), fused_moe_ref(x, w13, w2, tw, ti), torch.bfloat16)

    def test_decode_int8_matches_reference(self):
        x, w13, w2, tw, ti = _case(64, 8, 4, hidden=2048, inter=768, dtype=torch.bfloat16, device="cuda")
        (q13, s13), (q2, s2) = _quantise(w13), _quantise(w2)
        want = fused_moe_ref(x.float(), q13.float() * s13[..., None], q2.float() * s2[..., None], tw, ti)
        got = fused_moe(x, q13, q2, tw, ti, w13_scale=s13, w2_scale=s2)
        _close(got, want.to(torch.bfloat16), torch.bfloat16)
