"""Weight formats against the dense reference matmul, with tolerances from their rounding."""

from __future__ import annotations

import pytest
import torch

from quadrant.layers.linear import Linear
from quadrant.quant.formats import (Dense, Int8Dynamic, NativeQ4, NativeQ8, W4A16, W8A16, compact_rows, cpu_plan,
                                    int4_groups, int8_per_channel, native_available, pack_plan, prefill_dtype, run_kernels,
                                    single_plan)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def wx():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 128, generator=g) * 0.05, torch.randn(7, 128, generator=g)


def test_w4a16_is_exact_on_a_4bit_grid(wx):
    w, x = wx
    # Weights already on an asymmetric 4-bit grid per group of 32 (what GGUF Q4_1 holds) ...
    groups = w.reshape(96, 4, 32)
    lo, scale = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    lo, scale = lo.bfloat16().float(), scale.bfloat16().float()  # representable scales and zeros
    grid = (torch.round((groups - lo) / scale).clamp(0, 15) * scale + lo).reshape(96, 128)
    fmt = W4A16()
    out = fmt.apply(x, fmt.pack(grid, None))
    # ... come through unchanged; only the bf16 activations and bf16 zero point round (~1e-2 relative).
    assert rel_err(out, x @ grid.t()) < 1e-2


def test_w4a8_computes_the_4bit_grid_with_int8_tokens():
    """CPU w4a8 = the GPU kernel's products: per-token int8 activations times the 4-bit grid itself.
    Rows whose groups' ranges differ 8x are where re-expressing that grid per channel in int8 (the
    previous CPU path) added as much error as the 4-bit rounding."""
    from quadrant.quant.formats import W4A8, int8_per_token

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[:, :128] *= 8.0  # the first group of each row spans 8x the second's range
    x = torch.randn(9, 256, generator=g)
    codes, scale, lo = int4_groups(w, 128)
    grid = (codes * scale + lo).reshape(w.shape)
    fmt = W4A8(group_size=128)
    out = fmt.apply(x, fmt.pack(grid, None))
    x_codes, step = int8_per_token(x)
    reference = (x_codes * step) @ grid.t()
    assert torch.equal(x_codes, x_codes.round()) and x_codes.abs().max() <= 127
    # Only the int4 kernel's bf16 scales and zeros round (2^-9 relative each; 2.5e-3 here). The grid
    # re-expressed per channel in int8 lands at 8.9e-3 on these rows.
    assert rel_err(out, reference) < 5e-3
    q, s8 = int8_per_channel(grid)
    assert rel_err((x_codes * step) @ (q.float() * s8[:, None]).t(), reference) > 5e-3


def test_w8a16_and_int8_close_to_dense(wx):
    w, x = wx
    ref = x @ w.t()
    assert rel_err(W8A16().apply(x, W8A16().pack(w, None)), ref) < 1e-2  # int8 weights + bf16 activations
    assert rel_err(Int8Dynamic().apply(x, Int8Dynamic().pack(w, None)), ref) < 2e-2  # + 8-bit activations
    q, s = int8_per_channel(w)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-7


def test_int8_rows_are_batch_invariant(wx):
    w, x = wx
    fmt = Int8Dynamic()
    packed = fmt.pack(w, torch.randn(96))
    x = x.clone()
    x[2] *= 100.0  # an outlier token must not change its neighbours' quantisation
    full = fmt.apply(x, packed)
    for i in range(x.shape[0]):
        assert torch.equal(fmt.apply(x[i : i + 1], packed)[0], full[i])


def test_plan_picks_kernels_by_batch_size(wx):
    w, _ = wx
    kernels = pack_plan(cpu_plan(4), w, None)  # no width given: torch's kernels
    assert [type(f) for _, f, _ in kernels] == [W4A16, Dense]
    assert kernels[1][2][0].dtype == prefill_dtype()  # prefill: bf16 where the CPU has it natively, else fp32
    assert [type(f) for _, f, _ in pack_plan(cpu_plan(8), w, None)] == [W8A16, Dense]
    assert [type(f) for _, f, _ in pack_plan(cpu_plan(4, sensitive=True), w, None)] == [W8A16]
    if native_available(w.shape[1]):  # the native integer-dot kernels where they build and run
        assert [type(f) for _, f, _ in pack_plan(cpu_plan(4, in_features=w.shape[1]), w, None)] == [NativeQ4, Dense]
        assert [type(f) for _, f, _ in pack_plan(cpu_plan(8, in_features=w.shape[1]), w, None)] == [NativeQ8, Dense]
    small, big = torch.randn(2, 128), torch.randn(40, 128)
    assert torch.equal(run_kernels(kernels, small), kernels[0][1].apply(small, kernels[0][2]))
    assert torch.equal(run_kernels(kernels, big), kernels[1][1].apply(big, kernels[1][2]))


def test_the_compact_dense_crossover_is_measured_unless_set(monkeypatch):
    """QUADRANT_SMALL_BATCH_TOKENS fixes the largest step the compact kernels take (tests/conftest.py sets
    8); unset, it is measured once per weight width: 1 (dense from 2 rows) up to 48 where the native
    kernels run."""
    from quadrant.quant import formats

    monkeypatch.setenv("QUADRANT_SMALL_BATCH_TOKENS", "5")
    assert formats.small_batch_tokens() == 5
    assert cpu_plan(4)[0][0] == 5 and cpu_plan(8)[0][0] == 5
    monkeypatch.delenv("QUADRANT_SMALL_BATCH_TOKENS")
    monkeypatch.setattr(formats, "_crossover", {})
    for bits in (4, 8):
        measured = formats.small_batch_tokens(bits)
        sizes = (1, *formats._CROSSOVER_SIZES) if native_available(576) else (formats.SMALL_BATCH_TOKENS,)
        assert measured in sizes
        assert formats.small_batch_tokens(bits) == measured  # once per process
        assert cpu_plan(bits)[0][0] == measured
    assert set(formats._crossover) == {4, 8}


def test_compact_rows_is_the_smallest_switch_of_the_layers():
    """The speculation policy's step limit: the fewest tokens at which any layer of the model switches
    from its compact kernel to dense GEMMs; layers with one kernel at every size (the LM head) have none."""
    layers = [Linear(64, 32) for _ in range(3)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.normal_()
    layers[0].repack([(5, W8A16()), (float("inf"), Dense())])
    layers[1].repack([(3, W4A16(group_size=32)), (float("inf"), Dense())])
    layers[2].repack(single_plan("int8"))
    assert compact_rows(torch.nn.Sequential(*layers)) == 3
    assert compact_rows(torch.nn.Sequential(layers[2])) is None


def test_linear_repack_drops_dense_weight(wx):
    w, x = wx
    lin = Linear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.normal_()
    ref = lin(x)
    lin.repack(single_plan("int8"))
    assert lin.weight is None and lin.bias is None and not list(lin.parameters())
    assert rel_err(lin(x), ref) < 1e-2


def test_a_folders_group_keeps_its_grids():
    """A 4-bit folder's weights load through on_grid packing: its groups keep their own grids, also
    those whose codes stop short of 0 or 15 (GPTQ's), which the min/max grid would round again."""
    from quadrant.quant.formats import W4A8, W4A16, get_format

    assert get_format("w4a16", 64) == W4A16(group_size=64, on_grid=True)
    assert get_format("w4a8", 128) == W4A8(group_size=128, on_grid=True)
    assert get_format("w4a16") == W4A16(group_size=128)  # a float model: the plain min/max grid
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(3, 12, (16, 2, 64), generator=g).float()  # codes 3..11 only
    w = (codes * 0.01 + torch.randn(16, 2, 1, generator=g) * 0.1).view(16, 128)
    got, scale, lo = int4_groups(w, 64, on_grid=True)
    assert torch.allclose((got * scale + lo).view(16, 128), w, rtol=0, atol=1e-6)


def test_gpu_format_choice(monkeypatch):
    """On a GPU the 8-bit-activation formats take the Triton kernels where its tensor cores can run
    them (the capability is the one thing faked here), the LM head's int8 stays in the model dtype,
    and the CPU-only formats are refused with a clear message (config and loader alike)."""
    from quadrant.config import EngineConfig
    from quadrant.quant.formats import Dense, GpuQ8, get_format, runs_on

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert runs_on("w4a8", "cuda") and not runs_on("w8a8", "cuda") and not runs_on("w4a8", "mps")
    with pytest.raises(ValueError, match=r"w8a8 needs a CUDA GPU with compute capability 8\.9\+"):
        get_format("w8a8", None, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert get_format("w4a8", 64, "cuda") == GpuQ8(name="w4a8", group_size=64, on_grid=True)  # a folder's grid
    assert get_format("w4a8", None, "cuda") == GpuQ8(name="w4a8", group_size=128)
    assert get_format("w8a8", None, "cuda") == GpuQ8(name="w8a8")
    assert isinstance(get_format("int8", None, "cuda"), Dense)
    with pytest.raises(ValueError, match="w4a16 runs on the CPU only"):
        get_format("w4a16", None, "cuda")
    EngineConfig("m", device="cuda", weight_format="w4a8")  # accepted
    with pytest.raises(ValueError, match="int8 runs on the CPU only so far; on cuda use w8a8, w4a8 or dense"):
        EngineConfig("m", device="cuda", weight_format="int8")
