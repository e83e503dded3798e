"""kv_store: the Triton write (and quantise-on-write) against the torch reference, under the interpreter."""

from __future__ import annotations

import pytest
import torch

from quadrant.kernels.kv_store import dequantize_ref, store_kv, store_kv_ref
from tests.kernels.paged import slots_for

pytestmark = pytest.mark.usefixtures("on_kernel_device")


def _valid_rows(cache_len: list[int], tables: torch.Tensor, block_size: int) -> list[tuple[int, int]]:
    rows = []
    for b, n in enumerate(cache_len):
        for pos in range(n):
            rows.append((int(tables[b, pos // block_size]), pos % block_size))
    return rows


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
def test_store_matches_reference_over_chunked_writes(cache_dtype):
    torch.manual_seed(0)
    num_kv, dim, block_size, group = 3, 40, 16, 8
    seq_lens = [37, 5, 16]
    num_blocks = 12
    tables = torch.randperm(num_blocks)[:9].view(3, 3).int()
    quantised = cache_dtype in (torch.int8, torch.float8_e4m3fn)
    caches = []
    for _ in range(2):  # (kernel, reference)
        kc, vc = (torch.zeros(num_blocks, num_kv, block_size, dim, dtype=cache_dtype) for _ in range(2))
        ks, vs = ((torch.zeros(num_blocks, num_kv, block_size // group) for _ in range(2)) if quantised
                  else (None, None))
        caches.append((kc, vc, ks, vs))
    written = [0, 0, 0]
    # Steps that mix sequences, straddle group and block boundaries, and carry graph padding (slot -1).
    for step in ([7, 3, 9], [1, 1, 1], [20, 1, 6], [9, 0, 0], [0, 0, 0]):
        ks_new, vs_new, slots = [], [], []
        for b, n in enumerate(step):
            n = min(n, seq_lens[b] - written[b])
            ks_new.append(torch.randn(n, num_kv, dim) * (1 + 3 * b))
            vs_new.append(torch.randn(n, num_kv, dim))
            slots.append(slots_for(tables, b, written[b], written[b] + n, block_size))
            written[b] += n
        ks_new.append(torch.randn(2, num_kv, dim))
        vs_new.append(torch.randn(2, num_kv, dim))
        slots.append(torch.full((2,), -1, dtype=torch.long))
        k, v, s = torch.cat(ks_new), torch.cat(vs_new), torch.cat(slots)
        k, v = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
        store_kv(k, v, *caches[0][:2], s, caches[0][2], caches[0][3], group)
        store_kv_ref(k, v, *caches[1][:2], s, caches[1][2], caches[1][3], group)
    rows = _valid_rows(written, tables, block_size)
    blocks = torch.tensor([r[0] for r in rows])
    offsets = torch.tensor([r[1] for r in rows])
    for which in range(2):  # K, then V
        got, want = caches[0][which], caches[1][which]
        if quantised:
            got = dequantize_ref(got, caches[0][2 + which], group)
            want = dequantize_ref(want, caches[1][2 + which], group)
        got, want = got[blocks, :, offsets].float(), want[blocks, :, offsets].float()
        # Same fp32 arithmetic in both: identical codes; 1e-6 absorbs division rounding order.
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantised_store_is_close_to_the_values(cache_dtype):
    """Each rounding costs at most half a step: int8 amax/254, e4m3 a relative 2^-4 (3 mantissa bits).
    Earlier tokens are rounded again whenever the group's scale grows, so the bound is 4 roundings
    (with this seed the scale grows three times), plus e4m3's subnormal step for tiny values."""
    torch.manual_seed(1)
    block_size, group, dim = 16, 16, 64
    kc, vc = (torch.zeros(2, 1, block_size, dim, dtype=cache_dtype) for _ in range(2))
    ks, vs = (torch.zeros(2, 1, block_size // group) for _ in range(2))
    k = torch.randn(16, 1, dim)
    for t in range(16):  # decode: one token per step
        store_kv(k[t:t + 1], k[t:t + 1], kc, vc, torch.tensor([16 + t]), ks, vs, group)
    got = dequantize_ref(kc, ks, group)[1, 0]
    amax = k.abs().max()
    if cache_dtype == torch.int8:
        bound = 4 * amax / 254
    else:
        bound = 4 * k[:, 0].abs() / 16 + amax / 448 * 2**-9
    assert torch.all((got - k[:, 0]).abs() <= bound)


def test_store_rejects_mismatched_cache():
    k = torch.randn(2, 2, 8)
    cache = torch.zeros(4, 3, 16, 8)
    with pytest.raises(ValueError, match="does not hold"):
        store_kv(k, k, cache, cache.clone(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs k_scale"):
        qc = torch.zeros(4, 2, 16, 8, dtype=torch.int8)
        store_kv(k, k, qc, qc.clone(), torch.tensor([0, 1]))
