"""The native CPU GEMMs (kernels/csrc/tiled_gemm.c) against a float64 torch reference of the same
math: activations rounded per 32 inputs to 14-bit integers (scale amax / 8127, round half to even);
weights from their 4-bit blocks (fp16 scale and min) or int8 rows. The integer dot products are
exact, so the only differences are fp32 summation order: relative 1e-5 of the output's scale."""

from __future__ import annotations

import pytest
import torch

from quadrant.kernels import cpu_native as cn
from quadrant.quant.formats import NativeQ4, NativeQ8, W4A16, W8A16
from quadrant.quant.grids import int4_groups, int8_per_channel

pytestmark = pytest.mark.skipif(cn.library() is None, reason="native CPU kernels do not build or run here")


def rounded_activations(x: torch.Tensor, top: float = 8127.0) -> torch.Tensor:
    """x [M, K] as the kernels see it: integer codes times each 32-block's scale (float64)."""
    blocks = x.double().reshape(x.shape[0], -1, cn.QK)
    # The kernel computes the scale and its inverse in fp32, as here.
    d = (x.reshape(x.shape[0], -1, cn.QK).abs().amax(-1, keepdim=True) / top)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x.reshape(blocks.shape) * inv)  # torch.round: half to even, as lrintf
    return (q.double() * d.double()).reshape(x.shape)


# Output widths that fill whole tiles (48, 96) and ones that leave the last tile part-empty (7, 33, 20,
# 5); row counts of one, within one pass of 8 rows and past it (17).
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (1, 96, 7), (3, 576, 96), (17, 160, 33), (1, 1056, 20), (6, 1056, 5),
                                   (8, 64, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_q4_gemm_matches_reference(m, k, n, bias):
    g = torch.Generator().manual_seed(m * k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    b = torch.randn(n, generator=g) if bias else None
    codes, scale, lo = int4_groups(w, cn.QK)
    packed = cn.pack_q4(codes.reshape(n, k), scale, lo, b)
    ref = rounded_activations(x) @ cn.unpack_q4(packed).double().T
    if b is not None:
        ref += b.double()
    out = cn.q4_mm(x, packed)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("tile", [8, 16])
@pytest.mark.parametrize("n", [8, 13, 32])
def test_q4_blocks_hold_the_grid(tile, n):
    """Packing into tiles of either width keeps the codes and the fp16-rounded scale and min of each
    group of 32, whole tiles or not."""
    w = torch.randn(n, 96)
    codes, scale, lo = int4_groups(w, cn.QK)
    packed = cn.pack_q4(codes.reshape(n, 96), scale, lo, None, tile=tile)
    assert packed.codes.shape == (-(-n // tile), 3, 4, 4 * tile) and packed.scales.shape == (-(-n // tile), 3, 2, tile)
    expected = codes * scale.half().float() + lo.half().float()
    assert torch.equal(cn.unpack_q4(packed), expected.reshape(n, 96))


def test_a_rows_result_does_not_depend_on_its_batch():
    """Every row is rounded and summed alike at any row count: a row's output is bit-identical alone
    and among 2-17 rows (a verification step gives what one-row steps give)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 160, generator=g), torch.randn(17, 160, generator=g)
    for fmt in (NativeQ4(), NativeQ8()):
        packed = fmt.pack(w, None)
        alone = torch.cat([fmt.apply(x[i:i + 1], packed) for i in range(17)])
        for rows in (2, 5, 8, 9, 17):
            assert torch.equal(fmt.apply(x[:rows], packed), alone[:rows])


@pytest.mark.parametrize("tile", [8, 16])
def test_q8_tiles_hold_the_codes(tile):
    codes = torch.randint(-127, 128, (13, 64))
    packed = cn.pack_q8(codes, torch.rand(13), None, tile=tile)
    assert torch.equal(cn.unpack_q8(packed), codes.to(torch.int8))


def test_tiles_of_another_width_are_refused():
    other = 24 - cn.tile_rows()  # 8 where the kernels take 16, and the reverse
    q4 = cn.pack_q4(torch.randint(0, 16, (16, 64)), torch.rand(16, 2), torch.rand(16, 2), None, tile=other)
    q8 = cn.pack_q8(torch.randint(-127, 128, (16, 64)), torch.rand(16), None, tile=other)
    x = torch.randn(1, 64)
    for call in (lambda: cn.q4_mm(x, q4), lambda: cn.q8_mm(x, q8)):
        with pytest.raises(ValueError, match="tiles of"):
            call()
    for call in (lambda: torch.ops.quadrant.q4_mm(x, q4.codes, q4.scales, None, 64, 16),
                 lambda: torch.ops.quadrant.q8_mm(x, q8.codes, q8.scale, None, 64, 16)):
        with pytest.raises((RuntimeError, ValueError), match="tiles of"):  # the C++ kernels, or the Python ones
            call()


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (5, 576, 130), (8, 96, 9), (11, 64, 16)])
def test_q8_gemm_matches_reference(m, k, n):
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    q, s = int8_per_channel(w)
    b = torch.randn(n, generator=g)
    packed = cn.pack_q8(q, s, b)
    ref = rounded_activations(x) @ (q.double() * s.double().reshape(-1, 1)).T + b.double()
    out = cn.q8_mm(x.reshape(1, m, k), packed)  # leading dims are kept
    assert out.shape == (1, m, n)
    torch.testing.assert_close(out[0].double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


BUILDS = {"AVX2": cn.FLAGS, "AVX2 with AVX-VNNI": cn.FLAGS + ["-mavxvnni"],
          "AVX-512 without VNNI": cn.FLAGS + cn.AVX512_FLAGS}


@pytest.mark.parametrize("build", BUILDS)
def test_other_builds_match(build, tmp_path, monkeypatch):
    """The tests above ran this machine's build; the builds of machines
    without VNNI (two multiply-adds for vpdpbusd), without AVX-512 (tiles of 8 rows) or with AVX-VNNI
    alone (laptop CPUs) are checked against the same references wherever this CPU runs them."""
    runs = ("AVX-512" not in build or cn.AVX512_FLAGS[0] in cn.build_flags()) and \
        ("VNNI" not in build.replace("without VNNI", "") or "avx_vnni" in cn._cpu_flags())
    if BUILDS[build] == cn.build_flags() or not runs:
        pytest.skip(f"the {build} build is the one tested above, or this CPU cannot run it")
    monkeypatch.setattr(cn, "build_flags", lambda: list(BUILDS[build]))
    for name, value in (("_lib", None), ("_tried", False), ("_tile", cn._tile)):
        monkeypatch.setattr(cn, name, value)
    lib = cn.library(tmp_path)
    assert lib is not None and cn.tile_rows() == (16 if "AVX-512" in build else 8)
    for m, k, n in [(1, 96, 7), (3, 576, 96), (17, 160, 33), (6, 1056, 5)]:
        test_q4_gemm_matches_reference(m, k, n, True)
        test_q8_gemm_matches_reference(m, k, n)
    assert cn._lib is lib


def test_formats_stay_close_to_torch_kernels():
    """The native formats against torch's weight-only kernels of the same weights: they differ by the
    activations' rounding (14 bits per 32 inputs against bf16), well under 1% of the output's scale."""
    w, x = torch.randn(64, 256), torch.randn(4, 256)
    for native, torch_fmt in ((NativeQ4(), W4A16()), (NativeQ8(), W8A16())):
        a = native.apply(x, native.pack(w, None))
        b = torch_fmt.apply(x, torch_fmt.pack(w, None))
        assert (a - b).abs().max() < 0.01 * b.abs().max()


def test_custom_ops_trace_in_compiled_code():
    """torch.compile calls the kernels through their registered ops (the compiled CPU decode path)."""
    w, x = torch.randn(32, 64), torch.randn(2, 64)
    fmt = NativeQ4()
    packed = fmt.pack(w, torch.randn(32))
    compiled = torch.compile(lambda t: fmt.apply(t, packed) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), fmt.apply(x, packed) * 2)


def test_ops_run_cpp_kernels_where_a_compiler_is():
    """The quadrant:: ops' CPU kernels are csrc/torch_ops.cpp's (no Python in a compiled decode step's
    ~150 kernel calls) wherever a C++ compiler builds them, as on every machine these tests run on."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the ops keep their Python kernels")
    assert cn.op_kernels == "C++"


OPS_SCRIPT = """
import sys, torch
from quadrant.kernels import cpu_native as cn
assert cn.library() is not None
torch.manual_seed(0)
q4 = cn.pack_q4(torch.randint(0, 16, (48, 96)), torch.rand(48, 3), torch.rand(48, 3) - 0.5, torch.randn(48))
q8 = cn.pack_q8(torch.randint(-127, 128, (40, 64)), torch.rand(40), None)
q, k, v = torch.randn(2, 4, 16), torch.randn(6, 2, 4, 16), torch.randn(6, 2, 4, 16)
tables, lens = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32), torch.tensor([9, 11], dtype=torch.int32)
x4, x8 = torch.randn(3, 96), torch.randn(2, 5, 64)
torch.save([cn.op_kernels,
            torch.ops.quadrant.q4_mm(x4, q4.codes, q4.scales, q4.bias, 96, 48),
            torch.ops.quadrant.q8_mm(x8, q8.codes, q8.scale, None, 64, 40),
            torch.ops.quadrant.paged_decode(q, k, v, tables, lens, 0.25),
            cn.q4_mm(x4, q4), cn.q8_mm(x8, q8), cn.paged_decode(q, k, v, tables, lens, 0.25)], sys.argv[1])
"""


def test_cpp_and_python_op_kernels_give_identical_results(tmp_path):
    """The two registrations of the ops (each process has one: QUADRANT_PYTHON_OP_KERNELS=1 keeps the
    Python kernels) return exactly what the ctypes calls return, shapes included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    results = {}
    for python_kernels in ("0", "1"):
        out = tmp_path / f"ops-{python_kernels}.pt"
        env = {**os.environ, "QUADRANT_PYTHON_OP_KERNELS": python_kernels,
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", OPS_SCRIPT, str(out)], env=env, check=True, timeout=600)
        results[python_kernels] = torch.load(out)
    cpp, python = results["0"], results["1"]
    assert python[0] == "Python" and cpp[0] == ("C++" if cn.op_kernels == "C++" else "Python")
    for ops_out, direct in zip(cpp[1:4], cpp[4:]):
        assert ops_out.shape == direct.shape and torch.equal(ops_out, direct)
    for a, b in zip(cpp[1:], python[1:]):
        assert torch.equal(a, b)
