"""Native CPU decode kernels, built once with the system's C compiler and called via ctypes: the
small-batch GEMMs of 4-bit and int8 weights (csrc/tiled_gemm.c) and decode attention read in
place from the paged KV cache (csrc/paged_decode.c).

torch's CPU int4 kernel unpacks every weight to a float before multiplying; at decode sizes
that, not memory, bounds it (6-7 GB/s of weights on a 2-core AVX2 machine whose memory reads
~30 GB/s). The native kernels round activations to integers per 32 inputs and multiply integer
blocks (llama.cpp's method), from weights stored in tiles of 8 or 16 output rows, so a multi-row
step (verification, batched decode) costs little more than a one-row one. Nothing
here is required: without a C compiler, on a CPU without AVX2/FMA/F16C, or with
QUADRANT_NATIVE_KERNELS=0 (read by quant/formats.py), the weight formats keep torch's kernels.
The shared object is cached in the folder the caller names ($QUADRANT_HOME/kernels), keyed by
the source and flags, so only the first run on a machine compiles (about a second).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("tiled_gemm.c", "paged_decode.c")]
TORCH_OPS_SOURCE = Path(__file__).parent / "csrc" / "torch_ops.cpp"
op_kernels = "Python"  # which kernels the quadrant:: ops run on the CPU: "C++" once csrc/torch_ops.cpp is loaded
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
# Where torch dispatches AVX-512 (it checks the CPU and that the OS saves the registers), the kernels take
# 512-bit vectors: the GEMMs' weight tiles hold 16 rows, where AVX2 builds' hold 8.
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl"]
QK = 32  # inputs per activation block (and per 4-bit weight block)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:  # not Linux: the kernels without VNNI
        return set()


def build_flags() -> list[str]:
    """The compiler flags for this CPU (they also key the cached library). VNNI's vpdpbusd (AVX512-VNNI,
    or AVX-VNNI on AVX2 laptops' CPUs) is the GEMMs' multiply; without it, two multiply-adds."""
    cpu = _cpu_flags()
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return FLAGS + AVX512_FLAGS + (["-mavx512vnni"] if "avx512_vnni" in cpu else [])
    return FLAGS + (["-mavxvnni"] if "avx_vnni" in cpu else [])


def _without_vnni(flags: list[str]) -> list[str]:
    return [f for f in flags if f not in ("-mavx512vnni", "-mavxvnni")]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None  # a PyDLL once loaded
_op_lib: ctypes.CDLL | None = None  # the library whose functions the quadrant:: ops' kernels call
_tried = False
_tile = 0  # the loaded GEMMs' rows per tile


def _supported_cpu() -> bool:
    # torch's own dispatch level: AVX2 implies FMA and F16C on every x86 CPU torch targets.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile(compiler_env: str, compilers: tuple[str, str], args: list[str], target: Path) -> None:
    """Run the first compiler found (`$compiler_env`, else `compilers` on PATH) with `args` plus
    `-o`, into a temporary file that replaces `target` atomically: concurrent processes never load a
    half-written file."""
    compiler = os.environ.get(compiler_env) or shutil.which(compilers[0]) or shutil.which(compilers[1])
    if compiler is None:
        raise RuntimeError(f"no compiler ({' or '.join(compilers)}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *args, "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[:500]}")
        os.replace(out, target)


def _build(target: Path, flags: list[str]) -> None:
    try:
        _compile("CC", ("gcc", "cc"), [*flags, *map(str, SOURCES), "-lm"], target)
    except RuntimeError:
        if flags == _without_vnni(flags):
            raise
        # a compiler too old for the VNNI flag (-mavxvnni: GCC 11): the same kernels without it
        _compile("CC", ("gcc", "cc"), [*_without_vnni(flags), *map(str, SOURCES), "-lm"], target)


def library(cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """The loaded kernels, building them into cache_dir (default: a folder in the system's temporary
    directory) on first use; None where they cannot run here."""
    global _lib, _tried, _tile
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if not _supported_cpu():
            return None
        source = b"".join(path.read_bytes() for path in SOURCES)
        flags = build_flags()
        key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
        folder = cache_dir or Path(tempfile.gettempdir()) / "quadrant-kernels"
        target = folder / f"quadrant-cpu-{key}.so"
        try:
            if not target.exists():
                _build(target, flags)
            # PyDLL keeps the GIL through each call: a call is tens of microseconds, and releasing
            # it would hand the interpreter to any busy thread (a background compile) for a whole
            # switch interval (5 ms) per matmul.
            lib = ctypes.PyDLL(str(target))
        except (OSError, RuntimeError) as e:
            warnings.warn(f"native CPU kernels unavailable, using torch's ({e})", stacklevel=2)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.q4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr]
        lib.q8_gemm.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr]
        lib.paged_decode_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                         ctypes.c_float, ptr]
        lib.q4_gemm.restype = lib.q8_gemm.restype = lib.paged_decode_f32.restype = ctypes.c_int
        lib.tile_rows.restype = ctypes.c_int
        _register_op_kernels(lib, folder)
        _lib, _tile = lib, lib.tile_rows()
        return _lib


def _build_torch_ops(target: Path) -> None:
    """The C++ kernels of the quadrant:: ops (csrc/torch_ops.cpp), against this torch's headers."""
    from torch.utils import cpp_extension

    _compile("CXX", ("g++", "c++"), [
        "-O2", "-shared", "-fPIC", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{d}" for d in cpp_extension.include_paths()), str(TORCH_OPS_SOURCE),
        *(f"-L{d}" for d in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"], target)


def _register_op_kernels(lib: ctypes.CDLL, folder: Path) -> None:
    """The CPU kernels of the quadrant:: ops: C++ ones (csrc/torch_ops.cpp, built once per machine
    and torch, ~6 s) that call the C library directly, or, where those cannot be built, the Python
    functions below (each call then pays ~4.5 us more: the GIL, argument boxing, ctypes). Once per
    process: a library loaded again (a test's other build) leaves the ops on the first one's kernels."""
    global _op_lib, op_kernels
    if _op_lib is not None:
        return
    _op_lib = lib  # kept alive: the C++ kernels hold its functions' addresses
    key = hashlib.sha256(TORCH_OPS_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    target = folder / f"quadrant-torch-ops-{key}.so"
    failed = target.with_suffix(".failed")  # a build that failed once is not retried at every start
    try:
        if os.environ.get("QUADRANT_PYTHON_OP_KERNELS") == "1":
            raise RuntimeError("QUADRANT_PYTHON_OP_KERNELS=1")
        if failed.exists():
            raise RuntimeError(f"an earlier build failed (remove {failed} to retry): {failed.read_text()[:200]}")
        if not target.exists():
            try:
                _build_torch_ops(target)
            except RuntimeError as e:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(e))
                raise
        shim = ctypes.CDLL(str(target))  # its static initialisers register the kernels
        shim.quadrant_set_kernels.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int]
        shim.quadrant_set_kernels(*(ctypes.cast(f, ctypes.c_void_p) for f in
                                    (lib.q4_gemm, lib.q8_gemm, lib.paged_decode_f32)), lib.tile_rows())
        op_kernels = "C++"
    except Exception as e:  # noqa: BLE001 - no compiler, headers or ABI match: the Python kernels do the same
        _ops.impl("q4_mm", _q4_mm_impl, "CPU")
        _ops.impl("q8_mm", _q8_mm_impl, "CPU")
        _ops.impl("paged_decode", paged_decode, "CPU")
        log.debug("quadrant:: ops run Python kernels (%s)", e)


@dataclass
class Q4Blocks:
    """A [N, K] weight in blocks of 32 inputs, stored in tiles of `tile` output rows (csrc/tiled_gemm.c's
    layout, one vector lane per row): per tile and block, the rows' codes for inputs 4c..4c+3 and
    4c+16..4c+19 interleaved row by row, then the rows' fp16 scales and fp16 mins (weight = code *
    scale + min). Rows past N in the last tile are zero."""

    codes: torch.Tensor  # uint8 [N / tile, K / 32, 4, 4 * tile]
    scales: torch.Tensor  # fp16 [N / tile, K / 32, 2, tile]
    bias: torch.Tensor | None  # fp32 [N]
    in_features: int
    out_features: int

    @property
    def tile(self) -> int:
        return tile_of(self.codes)


@dataclass
class Q8Rows:
    """A [N, K] weight as int8 codes with one fp32 scale per row, stored in tiles of `tile` output rows
    (csrc/tiled_gemm.c's layout): per tile and block of 32 inputs, the rows' codes for inputs 4c..4c+3
    interleaved row by row, each plus 128 (unsigned, for vpdpbusd). Rows past N are zero."""

    codes: torch.Tensor  # uint8 [N / tile, K / 32, 8, 4 * tile]
    scale: torch.Tensor  # fp32 [N / tile * tile]
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    @property
    def tile(self) -> int:
        return tile_of(self.codes)


def tile_of(codes: torch.Tensor) -> int:
    """The rows per tile of packed codes (both layouts: 4 bytes a row per chunk)."""
    return codes.shape[-1] // 4


def tile_rows() -> int:
    """The output rows per tile of this machine's GEMMs (8 with AVX2, 16 with AVX-512)."""
    if (_lib or library()) is None:
        raise RuntimeError("the native CPU kernels do not run here")
    return _tile


def pack_q4(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bias: torch.Tensor | None,
            tile: int | None = None) -> Q4Blocks:
    """codes [N, K] in 0..15, scale and lo [N, K / 32] (weight = code * scale + lo), into tiles of
    `tile` rows (default: this machine's kernel's)."""
    tile = tile or tile_rows()
    n, k = codes.shape
    g, tiles = k // QK, -(-n // tile)
    pad = tiles * tile - n
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).reshape(tiles, tile, g, 8, 4)
    # input group j (inputs 4j..4j+3) in the low nibbles of chunk j, group j + 4 in its high ones
    nibbles = (c[:, :, :, :4] | (c[:, :, :, 4:] << 4)).permute(0, 2, 3, 1, 4)  # [T, G, chunk, row, 4]
    grid = [torch.nn.functional.pad(t.reshape(n, g).float(), (0, 0, 0, pad)).reshape(tiles, tile, g).transpose(1, 2)
            for t in (scale, lo)]
    scales = torch.stack(grid, 2).to(torch.float16).contiguous()  # [T, G, 2, tile]
    return Q4Blocks(nibbles.reshape(tiles, g, 4, 4 * tile).contiguous(), scales,
                    None if bias is None else bias.float().contiguous(), k, n)


def unpack_q4(packed: Q4Blocks) -> torch.Tensor:
    """The float [N, K] weight the tiles hold (the reference the tests compare against)."""
    n, k, tile = packed.out_features, packed.in_features, packed.tile
    tiles, g = packed.codes.shape[:2]
    nib = packed.codes.reshape(tiles, g, 4, tile, 4)
    codes = torch.cat([nib & 0x0F, nib >> 4], 2).permute(0, 3, 1, 2, 4).reshape(tiles * tile, g, QK).float()
    scales = packed.scales.float().permute(0, 3, 1, 2).reshape(tiles * tile, g, 2)
    return (codes * scales[..., 0, None] + scales[..., 1, None]).reshape(tiles * tile, k)[:n]


def pack_q8(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, tile: int | None = None) -> Q8Rows:
    """codes [N, K] in -127..127, scale [N], into tiles of `tile` rows (default: this machine's kernel's)."""
    tile = tile or tile_rows()
    n, k = codes.shape
    tiles = -(-n // tile)
    pad = tiles * tile - n
    biased = (torch.nn.functional.pad(codes.to(torch.int16), (0, 0, 0, pad)) + 128).to(torch.uint8)
    tiled = biased.reshape(tiles, tile, k // QK, 8, 4).permute(0, 2, 3, 1, 4)  # [T, G, chunk, row, 4]
    return Q8Rows(tiled.reshape(tiles, k // QK, 8, 4 * tile).contiguous(),
                  torch.nn.functional.pad(scale.reshape(n).float(), (0, pad)).contiguous(),
                  None if bias is None else bias.float().contiguous(), k, n)


def unpack_q8(packed: Q8Rows) -> torch.Tensor:
    """The int8 codes [N, K] the tiles hold."""
    n, k, tile = packed.out_features, packed.in_features, packed.tile
    tiles = packed.codes.shape[0]
    codes = packed.codes.reshape(tiles, k // QK, 8, tile, 4).permute(0, 3, 1, 2, 4).reshape(tiles * tile, k)
    return (codes.to(torch.int16) - 128).to(torch.int8)[:n]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(fn: Any, x: torch.Tensor, k: int, n: int, *weights: int | None) -> torch.Tensor:
    """Run one GEMM on x [..., K]; fp32 [..., N] out. Kept lean: a decode step makes ~200 calls."""
    x2 = x if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() else \
        x.reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n)
    if fn(x2.data_ptr(), m, k, *weights, out.data_ptr()) != 0:
        raise MemoryError("native GEMM: out of memory for its activation scratch")
    return out if x2 is x else out.view(*x.shape[:-1], n)


def _check_tile(tile: int) -> None:
    if tile != _tile:
        raise ValueError(f"weights packed in tiles of {tile} rows; this machine's kernel takes {_tile}")


def q4_mm(x: torch.Tensor, packed: Q4Blocks) -> torch.Tensor:
    """x [..., K] -> fp32 [..., N]."""
    lib = _lib or library()
    assert lib is not None
    _check_tile(packed.tile)
    return _call(lib.q4_gemm, x, packed.in_features, packed.out_features, packed.codes.data_ptr(),
                 packed.scales.data_ptr(), packed.out_features, _ptr(packed.bias))


def q8_mm(x: torch.Tensor, packed: Q8Rows) -> torch.Tensor:
    """x [..., K] -> fp32 [..., N]."""
    lib = _lib or library()
    assert lib is not None
    _check_tile(packed.tile)
    return _call(lib.q8_gemm, x, packed.in_features, packed.out_features, packed.codes.data_ptr(),
                 packed.scale.data_ptr(), packed.out_features, _ptr(packed.bias))


# The same GEMMs as torch ops, so torch.compile's graphs (engine/cpu_compiled.py) call them as
# opaque kernels; eager code calls the functions above directly. Defined through the plain
# Library API, not torch.library.custom_op: a compiled decode step makes ~200 such calls, and
# custom_op's per-call checks cost ~10 us each. Their CPU kernels are registered when the library
# loads (_register_op_kernels): C++ where it builds, else the Python functions here.
_ops = torch.library.Library("quadrant", "DEF")
_ops.define("q4_mm(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int in_features, int out_features) -> Tensor")
_ops.define("q8_mm(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int in_features, int out_features) -> Tensor")


def _q4_mm_impl(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                in_features: int, out_features: int) -> torch.Tensor:
    return q4_mm(x, Q4Blocks(codes, scales, bias, in_features, out_features))


def _q8_mm_impl(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int, out_features: int) -> torch.Tensor:
    return q8_mm(x, Q8Rows(codes, scale, bias, in_features, out_features))


@torch.library.register_fake("quadrant::q4_mm")
def _q4_mm_shape(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


@torch.library.register_fake("quadrant::q8_mm")
def _q8_mm_shape(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


def q4_mm_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
             in_features: int, out_features: int) -> torch.Tensor:
    return torch.ops.quadrant.q4_mm(x, codes, scales, bias, in_features, out_features)


def q8_mm_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             in_features: int, out_features: int) -> torch.Tensor:
    return torch.ops.quadrant.q8_mm(x, codes, scale, bias, in_features, out_features)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, tree_start: torch.Tensor | None = None,
                 tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention from a paged fp32 cache, in place: q [B, Hq, D] fp32, K/V caches
    [num_blocks, Hk, block_size, D] fp32, block_tables [B, W] and seq_lens [B] int32 -> [B, Hq, D].
    tree_start [B] int32 / tree_mask [B] int64: rows of speculative token trees (AttentionMetadata)."""
    lib = _lib or library()
    assert lib is not None
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    bsz, num_heads, dim = q.shape
    _, num_kv, block_size, _ = k_cache.shape
    starts = tree_start.to(torch.int32).contiguous() if tree_start is not None else None
    bits = tree_mask.to(torch.int64).contiguous() if tree_mask is not None else None
    out = torch.empty_like(q)
    rc = lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                              lens.data_ptr(), starts.data_ptr() if starts is not None else None,
                              bits.data_ptr() if bits is not None else None, bsz, num_heads, num_kv, block_size, dim,
                              scale, out.data_ptr())
    if rc == 1:
        raise MemoryError("native paged decode: out of memory for its score scratch")
    if rc != 0:
        raise ValueError(f"native paged decode cannot take q {tuple(q.shape)} over a cache {tuple(k_cache.shape)} "
                         f"with tables {tuple(tables.shape)}")
    return out


_ops.define("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
            "float scale, Tensor? tree_start=None, Tensor? tree_mask=None) -> Tensor")


@torch.library.register_fake("quadrant::paged_decode")
def _paged_decode_shape(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, tree_start: torch.Tensor | None = None,
                        tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(q)


def paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, tree_start: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.quadrant.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, tree_start, tree_mask)
