"""The native CPU decode attention (kernels/csrc/paged_decode.c) against a float64 torch
reference over the same paged cache: softmax(q k^T * scale) v per query head, its KV head
shared by the group (GQA), over each sequence's own blocks. fp32 summation and the kernel's
polynomial exp differ from float64 by about 1e-6 of the output's scale; the bound is 2e-5."""

from __future__ import annotations

import pytest
import torch

from quadrant.kernels import cpu_native as cn
from quadrant.layers import attn_backends

pytestmark = pytest.mark.skipif(cn.library() is None, reason="native CPU kernels do not build or run here")


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    bsz, num_heads, dim = q.shape
    num_kv, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(bsz, num_heads, dim, dtype=torch.float64)
    for b in range(bsz):
        n = int(seq_lens[b])
        blocks = tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].double().permute(1, 0, 2, 3).reshape(num_kv, -1, dim)[:, :n]  # [Hk, S, D]
        v = v_cache[blocks].double().permute(1, 0, 2, 3).reshape(num_kv, -1, dim)[:, :n]
        group = num_heads // num_kv
        for h in range(num_heads):
            scores = (k[h // group] @ q[b, h].double()) * scale
            out[b, h] = torch.softmax(scores, 0) @ v[h // group]
    return out


def random_cache(seed: int, num_blocks: int, num_kv: int, block_size: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, num_kv, block_size, dim, generator=g)
    v = torch.randn(num_blocks, num_kv, block_size, dim, generator=g)
    return g, k, v


@pytest.mark.parametrize("num_heads,num_kv,dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 8)])
@pytest.mark.parametrize("lens", [[1], [37], [16, 1, 5, 130, 64]])
def test_paged_decode_matches_reference(num_heads, num_kv, dim, lens):
    block_size, num_blocks = 16, 40
    g, k, v = random_cache(len(lens) * dim + num_heads, num_blocks, num_kv, block_size, dim)
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column: tables wider than needed
    # Each sequence's blocks scattered over the pool, unused table slots pointing anywhere.
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens]).int()
    q = torch.randn(len(lens), num_heads, dim, generator=g) * 2  # peaked softmaxes too
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = dim ** -0.5
    out = cn.paged_decode(q, k, v, tables, seq_lens, scale)
    ref = reference(q, k, v, tables, seq_lens, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_paged_decode_refuses_bad_shapes():
    _, k, v = random_cache(0, 4, 2, 16, 12)  # head_dim 12: not a multiple of 8
    with pytest.raises(ValueError, match="cannot take"):
        cn.paged_decode(torch.randn(1, 4, 12), k, v, torch.zeros(1, 2, dtype=torch.int32),
                        torch.tensor([3], dtype=torch.int32), 0.3)
    _, k, v = random_cache(0, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="cannot take"):  # a length past the table's blocks
        cn.paged_decode(torch.randn(1, 4, 16), k, v, torch.zeros(1, 2, dtype=torch.int32),
                        torch.tensor([33], dtype=torch.int32), 0.3)


def test_backend_takes_the_native_kernel_and_agrees_with_the_gather_path():
    """The torch backend's decode: the native kernel on a cache marked for it, the gather path on
    the same cache unmarked; both agree, padded rows (masked by seq_lens) included."""
    from quadrant.layers.attention import LayerKVCache

    _, k, v = random_cache(3, 12, 3, 16, 64)
    layer = type("Layer", (), {"kv_cache": LayerKVCache(k, v), "scale": 0.125, "logit_softcap": None,
                               "sliding_window": None})()
    q = torch.randn(3, 9, 64)
    tables = torch.tensor([[0, 5, 7], [2, 11, 11], [1, 1, 1]], dtype=torch.int32)
    seq_lens = torch.tensor([40, 17, 1], dtype=torch.int32)
    gathered = attn_backends._paged_decode(layer, q, tables, seq_lens, 40, padded=True)
    layer.kv_cache.native_decode = True
    native = attn_backends._paged_decode(layer, q, tables, seq_lens, 40, padded=True)
    torch.testing.assert_close(native, gathered, rtol=0, atol=2e-5)


def test_token_tree_rows_attend_to_their_ancestors_only():
    """Rows of a speculative token tree (compiled CPU verification: one decode row per token): each
    attends to the positions before its tree's span and to its ancestors in it. Native kernel, the
    C++ op and the gather path against the reference over exactly those positions; a row without a tree
    (span past its length) as before."""
    from quadrant.engine.spec.tree import ancestor_masks
    from quadrant.layers.attention import LayerKVCache

    parents = [-1, -1, 0, 1, 1]  # root at position 20; nodes at 21..25
    bits = ancestor_masks(parents)
    _, k, v = random_cache(7, 10, 2, 16, 32)
    table = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:3].int()
    rows = len(bits) + 1  # the tree's 6 tokens, then a plain row
    tables = table[None].expand(rows, -1).contiguous()
    seq_lens = torch.tensor([21 + j for j in range(6)] + [30], dtype=torch.int32)  # a token sees up to itself
    tree_start = torch.tensor([20] * 6 + [30], dtype=torch.int32)
    tree_mask = torch.tensor(bits + [-1])
    q = torch.randn(rows, 4, 32)
    ancestors = [[0]]
    for i, p in enumerate(parents):
        ancestors.append(ancestors[p + 1] + [i + 1])
    ref = torch.empty(rows, 4, 32, dtype=torch.float64)
    for r in range(rows):
        keep = list(range(20)) + [20 + j for j in ancestors[r]] if r < 6 else list(range(30))
        index = torch.tensor(keep)
        kk = k[table.long()].double().permute(1, 0, 2, 3).reshape(2, -1, 32)[:, index]  # [Hk, S', D]
        vv = v[table.long()].double().permute(1, 0, 2, 3).reshape(2, -1, 32)[:, index]
        for h in range(4):
            ref[r, h] = torch.softmax(kk[h // 2] @ q[r, h].double() * 0.2, 0) @ vv[h // 2]
    native = cn.paged_decode(q, k, v, tables, seq_lens, 0.2, tree_start, tree_mask)
    torch.testing.assert_close(native.double(), ref, rtol=0, atol=2e-5)
    op = cn.paged_decode_op(q, k, v, tables, seq_lens, 0.2, tree_start, tree_mask)
    torch.testing.assert_close(op, native, rtol=0, atol=1e-6)
    layer = type("Layer", (), {"kv_cache": LayerKVCache(k, v), "scale": 0.2, "logit_softcap": None,
                               "sliding_window": None})()
    gathered = attn_backends._paged_decode(layer, q, tables, seq_lens, 30, True, tree_start, tree_mask)
    torch.testing.assert_close(gathered.double(), ref, rtol=0, atol=2e-5)


def test_custom_op_traces_in_compiled_code():
    _, k, v = random_cache(5, 6, 2, 16, 16)
    q, tables, lens = torch.randn(2, 4, 16), torch.tensor([[0, 3], [5, 1]], dtype=torch.int32), torch.tensor(
        [20, 9], dtype=torch.int32)
    compiled = torch.compile(lambda t: cn.paged_decode_op(t, k, v, tables, lens, 0.25) * 2, fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(q), cn.paged_decode(q, k, v, tables, lens, 0.25) * 2)
