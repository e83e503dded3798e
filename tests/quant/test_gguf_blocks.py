"""Tests for gguf_blocks: agreement with gguf's numpy reference, errors, round-trips."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gq

import quadrant.quant.gguf_blocks as gb
from quadrant.quant.gguf_blocks import SUPPORTED_TYPES, dequantize, quantize_q4_0, quantize_q4_1, quantize_q8_0

T = GGMLQuantizationType
QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of each type's f16 scale fields inside a block. Random bytes there could
# be NaN/Inf/huge; we overwrite them with small finite values so the comparison means
# something (NaN != NaN) and exercises realistic magnitudes.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random uint8 data shaped like GGUFReader's [rows, bytes_per_row], finite scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.1, 0.1, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def test_supported_types_set() -> None:
    assert SUPPORTED_TYPES == {int(t) for t in (T.F32, T.F16, T.BF16, *QUANT_TYPES)}


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_types_match_gguf_reference(qtype: T) -> None:
    block_size = GGML_QUANT_SIZES[qtype][0]
    rows, cols = 7, 3 * max(block_size, 256)  # several blocks per row, odd row count
    raw = random_blocks(qtype, rows, cols, seed=int(qtype))
    ref = torch.from_numpy(gq.dequantize(raw, qtype).copy())
    got = dequantize(raw, qtype, (rows, cols))
    assert got.shape == (rows, cols) and got.dtype == torch.float32 and got.is_contiguous()
    # Exact: the decoders form the same float32 products in the same order as the
    # reference (f16->f32 and small-int products are exact; each add/mul rounds once).
    assert torch.equal(got, ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quant_types_torch_input_and_dtype(qtype: T) -> None:
    block_size = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, 4, 2 * max(block_size, 256), seed=100 + int(qtype))
    shape = (2, 2, 2 * max(block_size, 256))  # leading dims beyond 2-D are just rows
    ref = torch.from_numpy(gq.dequantize(raw, qtype).copy()).reshape(shape)
    got_t = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shape)  # flat torch bytes
    assert torch.equal(got_t, ref)
    got_bf16 = dequantize(raw, qtype, shape, dtype=torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert torch.equal(got_bf16, ref.to(torch.bfloat16))


def test_chunking_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny chunks so a tensor spans many chunks, with a partial last one
    monkeypatch.setattr(gb, "_CHUNK_ELEMS", 3 * 256)
    for qtype in (T.Q8_0, T.Q6_K, T.F16):
        if qtype == T.F16:
            raw = np.random.default_rng(1).standard_normal((5, 512)).astype(np.float16)
        else:
            raw = random_blocks(qtype, 5, 512, seed=7)
        ref = torch.from_numpy(np.asarray(gq.dequantize(raw, qtype), dtype=np.float32).copy())
        assert torch.equal(dequantize(raw, qtype, (5, 512)), ref.reshape(5, 512))


@pytest.mark.parametrize("as_bytes", [False, True], ids=["typed", "uint8"])
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf_reference(qtype: T, as_bytes: bool) -> None:
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 40)) * 3).astype(np.float32)  # finite values only
    if qtype == T.F32:
        stored = x
    elif qtype == T.F16:
        stored = x.astype(np.float16)
    else:  # bf16 = top half of the f32 bits; the reader hands this out as uint8
        stored = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(6, 80)
    ref = np.asarray(gq.dequantize(stored, qtype), dtype=np.float32).reshape(6, 40)
    raw = stored.view(np.uint8) if as_bytes else stored
    got = dequantize(raw, qtype, (6, 40))
    # exact: f16/bf16 -> f32 widening is exact and F32 is a plain copy
    assert torch.equal(got, torch.from_numpy(ref.copy()))
    assert got.dtype == torch.float32 and got.is_contiguous()


def test_f32_result_does_not_alias_input() -> None:
    x = np.arange(64, dtype=np.float32)
    got = dequantize(x, T.F32, (64,))
    got[0] = -1.0
    assert x[0] == 0.0


def test_read_only_input_no_warning() -> None:
    raw = random_blocks(T.Q8_0, 3, 64)
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dequantize(raw, T.Q8_0, (3, 64))
        f = np.ones(8, np.float32)
        f.flags.writeable = False
        dequantize(f, T.F32, (8,))


# --- real file ---------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _open_reader(path: str) -> GGUFReader:
    # parsing the header takes ~2 s; share one reader whatever scope the path fixture has
    return GGUFReader(path)


@pytest.fixture
def reader(default_gguf_path) -> GGUFReader:
    return _open_reader(str(default_gguf_path))


@pytest.mark.parametrize(
    "name, qtype",
    [
        ("token_embd.weight", T.Q8_0),
        ("blk.0.attn_q.weight", T.Q4_1),
        ("blk.0.ffn_down.weight", T.Q4_1),
        ("blk.0.attn_norm.weight", T.F32),
    ],
)
def test_real_file_tensors(reader: GGUFReader, name: str, qtype: T) -> None:
    t = next(t for t in reader.tensors if t.name == name)
    assert t.tensor_type == qtype
    shape = tuple(int(s) for s in reversed(t.shape))
    ref = torch.from_numpy(np.asarray(gq.dequantize(t.data, t.tensor_type)).copy()).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only memmap input must not warn
        got = dequantize(t.data, t.tensor_type, tuple(reversed(t.shape)))
    assert got.shape == shape
    assert torch.equal(got, ref)  # exact, see test_quant_types_match_gguf_reference


# --- errors ------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ2_XXS, T.IQ4_NL, T.Q8_1, T.TQ1_0],
                         ids=lambda t: t.name)
def test_unsupported_type_raises(qtype: T) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(type_size, dtype=np.uint8)
    with pytest.raises(ValueError, match=qtype.name):
        dequantize(raw, qtype, (block_size,))


def test_unknown_type_id_raises() -> None:
    with pytest.raises(ValueError, match="unknown GGML type id 9999"):
        dequantize(np.zeros(4, np.uint8), 9999, (1,))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.Q6_K, T.F32, T.BF16], ids=lambda t: t.name)
def test_truncated_bytes_raise(qtype: T) -> None:
    block_size = GGML_QUANT_SIZES[qtype][0]
    cols = max(block_size, 256)
    raw = random_blocks(qtype, 2, cols) if qtype in F16_FIELDS else np.zeros(
        2 * cols * GGML_QUANT_SIZES[qtype][1], np.uint8)
    flat = raw.reshape(-1)
    with pytest.raises(ValueError, match="truncated"):
        dequantize(flat[:-1], qtype, (2, cols))
    with pytest.raises(ValueError, match="needs"):
        dequantize(np.concatenate([flat, flat[:1]]), qtype, (2, cols))


def test_inner_dim_not_multiple_of_block_raises() -> None:
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        dequantize(np.zeros(34 * 2, np.uint8), T.Q8_0, (2, 48))  # 96 elements: 3 blocks' worth
    with pytest.raises(ValueError, match="block size 256"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (2, 128))


def test_non_float_dtype_raises() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        dequantize(np.zeros(34, np.uint8), T.Q8_0, (32,), dtype=torch.int32)


# --- quantisers --------------------------------------------------------------

QUANTISERS = [(T.Q8_0, quantize_q8_0), (T.Q4_0, quantize_q4_0), (T.Q4_1, quantize_q4_1)]


def _test_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 256, generator=g) * torch.logspace(-3, 1, 12).unsqueeze(1)
    x[0, :32] = 0.0                          # all-zero block: scale 0, no NaN
    x[1, :32] = 0.5                          # constant block (Q4_1: d = 0)
    x[2, :32] = torch.arange(32) - 15.5      # exact halves: exercises tie rounding
    x[3, 32:64] = -x[3, 32:64].abs()         # one-signed blocks
    return x


@pytest.mark.parametrize("qtype, quantise", QUANTISERS, ids=lambda v: getattr(v, "name", ""))
def test_quantiser_matches_gguf_reference_bytes(qtype: T, quantise) -> None:
    x = _test_input()
    got = quantise(x)
    ref = gq.quantize(x.numpy(), qtype)  # gguf's port of ggml's reference quantisers
    assert got.dtype == torch.uint8 and tuple(got.shape) == ref.shape
    assert torch.equal(got, torch.from_numpy(ref))


@pytest.mark.parametrize("qtype, quantise", QUANTISERS, ids=lambda v: getattr(v, "name", ""))
def test_quantiser_round_trip_within_one_step(qtype: T, quantise) -> None:
    x = _test_input().reshape(3, 4, 256)  # leading dims are preserved
    q = quantise(x)
    assert q.shape[:2] == (3, 4)
    y = dequantize(q, qtype, tuple(x.shape))
    # the step of each block is its stored f16 scale d
    blocks = q.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    step = blocks[:, :2].contiguous().view(torch.float16).float().abs()
    err = (y - x).abs().reshape(-1, 32)
    # one step, plus slack for the f16 rounding of d (and of m for Q4_1), ~2^-11 relative
    slack = 1e-3 * x.abs().reshape(-1, 32).amax(dim=1, keepdim=True) + 1e-7
    assert bool((err <= step + slack).all()), float((err - step - slack).max())
    # the zero block stays exactly zero
    assert torch.equal(y.reshape(-1, 256)[0, :32], torch.zeros(32))


def test_quantiser_rejects_bad_length() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(2, 48))
