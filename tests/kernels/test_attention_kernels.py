"""Paged decode (split-KV) and varlen prefill kernels against their torch references, under the interpreter.

Tolerances: fp32 everywhere: 2e-5 (online softmax reorders the sums); bf16 queries and cache:
2e-2 (the kernel rounds P to bf16 before P.V, the reference keeps fp32: a bf16 ulp at values
near 1). 8-bit caches are dequantised identically on both sides, so they get the fp32 bound.
"""

from __future__ import annotations

import pytest
import torch

from quadrant.kernels.paged_decode import paged_decode, paged_decode_ref, plan_splits
from quadrant.kernels.varlen_prefill import varlen_prefill, varlen_prefill_ref
from tests.kernels.paged import make_paged_case

pytestmark = pytest.mark.usefixtures("on_kernel_device")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}

CASES = [
    # (seq_lens, num_heads, num_kv, dim, block_size, window, softcap)
    ([1, 17, 64, 133], 4, 4, 64, 16, None, None),  # GQA 1, odd lengths, block boundaries
    ([40, 7], 6, 2, 32, 8, None, None),  # GQA 3
    ([300, 45, 129], 8, 1, 64, 16, None, None),  # GQA 8 (MQA), long enough for many splits
    ([90, 33], 4, 2, 48, 16, 20, None),  # sliding window, head_dim not a power of two
    ([70], 2, 1, 16, 32, None, 30.0),  # logit soft-cap
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("cache_dtype", [None, torch.int8, torch.float8_e4m3fn])
def test_paged_decode_matches_reference(case, cache_dtype):
    seq_lens, num_heads, num_kv, dim, block_size, window, softcap = case
    group = block_size // 2 if cache_dtype else 0
    pc = make_paged_case(seq_lens, num_kv, dim, block_size, torch.float32, cache_dtype, group, seed=len(seq_lens))
    q = torch.randn(len(seq_lens), num_heads, dim)
    ref = paged_decode_ref(q, pc.k_cache, pc.v_cache, pc.block_tables, pc.seq_lens, dim**-0.5, pc.k_scale,
                           pc.v_scale, group, window, softcap)
    # min_chunk 16 forces several splits per sequence on these short contexts.
    for min_chunk in (16, 4096):
        num_splits, chunk = plan_splits(seq_lens, num_kv, num_sms=8, min_chunk=min_chunk)
        got = paged_decode(q, pc.k_cache, pc.v_cache, pc.block_tables, pc.seq_lens, dim**-0.5, num_splits,
                           torch.tensor([chunk], dtype=torch.int32), pc.k_scale, pc.v_scale, group, window, softcap)
        torch.testing.assert_close(got, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_paged_decode_fixed_grid_wider_than_needed_and_bf16():
    """A CUDA-graph grid keeps its split count while lengths change: extra splits must add nothing."""
    seq_lens = [33, 200, 5]
    pc = make_paged_case(seq_lens, 2, 64, 16, torch.bfloat16, seed=3)
    q = torch.randn(3, 4, 64).to(torch.bfloat16)
    ref = paged_decode_ref(q, pc.k_cache, pc.v_cache, pc.block_tables, pc.seq_lens, 0.125)
    got = paged_decode(q, pc.k_cache, pc.v_cache, pc.block_tables, pc.seq_lens, 0.125, 16,
                       torch.tensor([32], dtype=torch.int32))
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_token_tree_rows(dtype):
    """Token-tree verification replayed through the decode graphs: each of a tree's 6 tokens (root at
    position 20, then 5 nodes in two branches) is a decode row over the same table, attending to the
    keys before the tree and to its ancestors only; two plain rows beside them (spans at their length,
    and past any length: the graphs' NO_SPAN). The reference against a
    direct per-query softmax over exactly those keys; the kernel against the reference, one split per
    row and several (the tree's keys then straddle a split boundary)."""
    from quadrant.engine.cuda_graphs import NO_SPAN
    from quadrant.engine.spec.tree import ancestor_masks
    from quadrant.kernels.kv_store import gather_kv

    parents = [-1, -1, 0, 1, 1]  # root -> {0, 1}; 0 -> 2; 1 -> {3, 4}
    num_heads, num_kv, dim, block = 4, 2, 32, 8
    pc = make_paged_case([26, 30], num_kv, dim, block, dtype, seed=5)
    tables = torch.cat([pc.block_tables[:1].expand(6, -1), pc.block_tables[1:], pc.block_tables[1:]])  # [8, W]
    seq_lens = torch.tensor([21 + j for j in range(6)] + [30, 30], dtype=torch.int32)  # a token sees up to itself
    tree_start = torch.tensor([20] * 6 + [30, NO_SPAN], dtype=torch.int32)
    tree_mask = torch.tensor(ancestor_masks(parents) + [-1, -1], dtype=torch.int64)
    q = torch.randn(8, num_heads, dim).to(dtype)
    ref = paged_decode_ref(q, pc.k_cache, pc.v_cache, tables, seq_lens, dim**-0.5, tree_start=tree_start,
                           tree_mask=tree_mask)
    keys = gather_kv(pc.k_cache, None, 0, pc.block_tables[:1].long(), 26, torch.float32)[0]  # [Hk, S, D]
    values = gather_kv(pc.v_cache, None, 0, pc.block_tables[:1].long(), 26, torch.float32)[0]
    ancestors = [[0]]
    for i, p in enumerate(parents):
        ancestors.append(ancestors[p + 1] + [i + 1])
    for r, line in enumerate(ancestors):
        index = torch.tensor(list(range(20)) + [20 + j for j in line])
        k, v = keys[:, index].repeat_interleave(2, 0), values[:, index].repeat_interleave(2, 0)  # GQA 2
        probs = (q[r].float()[:, None, :] @ k.transpose(1, 2) * dim**-0.5).softmax(-1)  # [Hq, 1, S']
        torch.testing.assert_close(ref[r].float(), (probs @ v)[:, 0], atol=TOL[dtype], rtol=TOL[dtype])
    plain = paged_decode_ref(q, pc.k_cache, pc.v_cache, tables, seq_lens, dim**-0.5)
    torch.testing.assert_close(ref[6:], plain[6:])  # the plain rows are untouched
    assert not torch.allclose(ref[2:6].float(), plain[2:6].float())  # the mask changed something
    for num_splits, chunk in ((1, 32), (3, 16)):
        got = paged_decode(q, pc.k_cache, pc.v_cache, tables, seq_lens, dim**-0.5, num_splits,
                           torch.tensor([chunk], dtype=torch.int32), tree_start=tree_start, tree_mask=tree_mask)
        torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_paged_decode_empty_rows_are_zero():
    """Graph padding rows have length 0: they must come out finite (zero), not NaN."""
    pc = make_paged_case([20, 1], 1, 16, 16, torch.float32, seed=4)
    lens = torch.tensor([20, 0], dtype=torch.int32)
    q = torch.randn(2, 2, 16)
    for splits, chunk in ((1, 32), (4, 16)):
        got = paged_decode(q, pc.k_cache, pc.v_cache, pc.block_tables, lens, 0.25, splits,
                           torch.tensor([chunk], dtype=torch.int32))
        assert torch.equal(got[1], torch.zeros(2, 16))
        torch.testing.assert_close(got[:1], paged_decode_ref(q, pc.k_cache, pc.v_cache, pc.block_tables, lens,
                                                             0.25)[:1], atol=2e-5, rtol=2e-5)


def test_plan_splits_balances_and_covers():
    # Few (sequence, head) pairs on a big GPU: split; many: don't.
    splits, chunk = plan_splits([8192], num_kv_heads=8, num_sms=132)
    assert splits > 1 and splits * chunk >= 8192
    assert plan_splits([8192] * 64, num_kv_heads=8, num_sms=132)[0] == 1
    splits, chunk = plan_splits([100, 5000], num_kv_heads=1, num_sms=132, max_splits=8)
    assert splits <= 8 and splits * chunk >= 5000 and chunk % 16 == 0


PREFILL_CASES = [
    # (context lengths, query lengths (the last ones of each context), Hq, Hk, D, block, window, softcap)
    ([37, 16, 70], [37, 3, 70], 4, 4, 64, 16, None, None),  # whole prompts and a chunk over a prefix
    ([50, 9, 100], [1, 9, 33], 6, 2, 32, 8, None, None),  # GQA 3, a decode row mixed in
    ([129, 40], [129, 17], 8, 1, 64, 16, None, None),  # GQA 8, more than one query block
    ([90, 61], [45, 61], 4, 2, 48, 16, 24, None),  # sliding window
    ([77], [20], 2, 1, 16, 32, None, 30.0),  # soft-cap
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"case{i}" for i in range(len(PREFILL_CASES))])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.float32, torch.int8), (torch.float32, torch.float8_e4m3fn)])
def test_varlen_prefill_matches_reference(case, dtype, cache_dtype):
    ctx, qlens, num_heads, num_kv, dim, block_size, window, softcap = case
    group = block_size // 2 if cache_dtype else 0
    pc = make_paged_case(ctx, num_kv, dim, block_size, dtype, cache_dtype, group, seed=len(ctx) + dim)
    starts = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(starts[-1]), num_heads, dim).to(dtype)
    args = (q, pc.k_cache, pc.v_cache, pc.block_tables, starts, pc.seq_lens)
    kw = dict(k_scale=pc.k_scale, v_scale=pc.v_scale, group=group, sliding_window=window, logit_softcap=softcap)
    ref = varlen_prefill_ref(*args, dim**-0.5, **kw)
    got = varlen_prefill(*args, max(qlens), dim**-0.5, **kw)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_kernels_reject_bad_metadata():
    pc = make_paged_case([5], 2, 16, 16, torch.float32)
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="int32"):
        paged_decode(q, pc.k_cache, pc.v_cache, pc.block_tables.long(), pc.seq_lens, 1.0, 1,
                     torch.tensor([16], dtype=torch.int32))
    with pytest.raises(ValueError, match="does not fit"):
        varlen_prefill(torch.randn(5, 3, 16), pc.k_cache, pc.v_cache, pc.block_tables,
                       torch.tensor([0, 5], dtype=torch.int32), pc.seq_lens, 5, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_prefill_token_tree_rows(dtype):
    """A speculative token tree's row (root + 5 nodes, two branches) beside a plain chunk: each node
    attends to the context before the tree and to its own ancestors only. The reference against a
    direct per-query softmax over exactly those keys; the kernel against the reference."""
    from quadrant.engine.spec.tree import ancestor_masks
    from quadrant.kernels.kv_store import gather_kv

    parents = [-1, -1, 0, 1, 1]  # root -> {0, 1}; 0 -> 2; 1 -> {3, 4}
    ctx, qlens, num_heads, num_kv, dim, block = [20, 33], [6, 5], 4, 2, 32, 8
    pc = make_paged_case(ctx, num_kv, dim, block, dtype, seed=11)
    starts = torch.tensor([0, 6, 11], dtype=torch.int32)
    q = torch.randn(11, num_heads, dim).to(dtype)
    tree_start = torch.tensor([ctx[0] - 6, ctx[1]], dtype=torch.int32)  # the plain row: no span
    tree_mask = torch.tensor(ancestor_masks(parents) + [-1] * 5, dtype=torch.int64)
    args = (q, pc.k_cache, pc.v_cache, pc.block_tables, starts, pc.seq_lens)
    ref = varlen_prefill_ref(*args, dim**-0.5, tree_start=tree_start, tree_mask=tree_mask)
    plain = varlen_prefill_ref(*args, dim**-0.5)
    torch.testing.assert_close(ref[6:], plain[6:])  # the plain chunk is untouched
    keys = gather_kv(pc.k_cache, None, 0, pc.block_tables[:1].long(), ctx[0], torch.float32)[0]  # [Hk, S, D]
    values = gather_kv(pc.v_cache, None, 0, pc.block_tables[:1].long(), ctx[0], torch.float32)[0]
    ancestors = [[0]]
    for i, p in enumerate(parents):
        ancestors.append(ancestors[p + 1] + [i + 1])
    for r, line in enumerate(ancestors):
        index = torch.tensor(list(range(ctx[0] - 6)) + [ctx[0] - 6 + j for j in line])
        k, v = keys[:, index].repeat_interleave(2, 0), values[:, index].repeat_interleave(2, 0)  # GQA 2
        probs = (q[r].float()[:, None, :] @ k.transpose(1, 2) * dim**-0.5).softmax(-1)  # [Hq, 1, S']
        torch.testing.assert_close(ref[r].float(), (probs @ v)[:, 0], atol=TOL[dtype], rtol=TOL[dtype])
    assert not torch.allclose(ref[:6].float(), plain[:6].float())  # the mask changed something
    got = varlen_prefill(*args, 6, dim**-0.5, tree_start=tree_start, tree_mask=tree_mask)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
