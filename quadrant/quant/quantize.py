"""Offline quantisation to a safetensors folder (`quadrant quantize`), and reading such folders back.

Every projection (attention, MLP, MoE experts) is stored quantised; embeddings, norms and
MoE routers stay float, and the LM head runs int8 weight-only in every format (llama.cpp
keeps its output matrix at 6-8 bits too). Per quantised weight `P.weight` [.., N, K]:

    int8, w8a8    P.qweight int8 [.., N, K]              P.scales fp32 [.., N]           (symmetric, per channel)
    w4a16, w4a8   P.qweight uint8 [.., N, K/2] (2 codes)  P.scales, P.mins [.., N, K/g]   (asymmetric, per group)

The 4-bit formats are rounded by GPTQ (`quant/gptq.py`), and their scales, mins and norm gains
then tuned end to end with the codes fixed (`quant/tune.py`): the folder is written, tuned, and
rewritten in place before it appears. For w8a8 the residual stream is first rotated (`quant/rotate.py`): the
folder then holds an ordinary checkpoint of the same architecture, norm gains 1 and the LM head
untied. The group g is --group-size (128 by default) where the input width allows (else 64 or 32);
K / scales' last dim gives it back. config.json gains `quantization_config` {quant_method: "quadrant", format}; an
LM head's own format follows from the model's (`tensor_format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from quadrant.loader import safetensors as st
# The folder format lives in quant/folder.py (loader/source.py reads folders through it without
# importing this module); its names stay importable from here.
from quadrant.quant.registry import format_spec
from quadrant.quant.folder import (QUANT_FORMATS, QuantizeError, _pack_nibbles, _unpack_nibbles,  # noqa: F401
                                   dequantize_tensor, iter_dequantized, quantize_tensor, stored_group_size,
                                   tensor_format)
from quadrant.quant.grids import group_size_for, int4_groups, int8_per_channel

if TYPE_CHECKING:
    from quadrant.config import ModelConfig
    from quadrant.loader.source import ModelSource
    from quadrant.quant.calibrate import Smoother
    from quadrant.quant.gptq import RoundWeights
    from quadrant.quant.tune import TuneConfig, TuneReport

_PROJECTIONS = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "lm_head.weight")
_SHARD_BYTES = 2 << 30


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Projection weights (2-D, or stacked 3-D experts); routers (`.gate.weight`) stay float."""
    return tensor.dim() in (2, 3) and (name.endswith(_PROJECTIONS) or (".experts." in name and name.endswith("weight")))


# -- the command -------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    path: Path
    format: str
    num_quantized: int
    bytes_in: int  # float32 bytes of the tensors read
    bytes_out: int  # bytes written (all tensors)
    tuning: TuneReport | None = None  # the end-to-end tuning of a 4-bit folder, where it ran


def quantize_model(model: str, fmt: str, out: str | Path, allow_requantize: bool = False,
                   progress: bool = True, group_size: int = 128,
                   smoothing: float | str | None = "auto", method: str = "auto",
                   rotate: str = "auto", tune_steps: int | None = None, thorough: bool = False) -> QuantizeReport:
    """Write `model` (name, .gguf or HF folder) quantised to `fmt` as a new safetensors folder `out`.

    `smoothing` (w8a8, w4a8): "auto" searches each layer's SmoothQuant strength on the shipped
    calibration text (for w4a8 only where the stream is not rotated), a number fixes it for all layers, None turns it off. `method`: "gptq" rounds
    each projection with GPTQ on the same text (4-bit groups and int8 channels alike), "rtn" to the
    nearest grid point; "auto" is gptq for the 4-bit formats where the model has a tokenizer and its
    Hessians fit in 8 GiB (not a large MoE), rtn otherwise. `rotate` ("on", "off", "auto"): rotate
    the residual stream first (`quant/rotate.py`); "auto" does for w8a8 and w4a8, where the model's
    norms allow it. `tune_steps`: after GPTQ, tune the 4-bit folder's scales, mins and norm gains end to end
    for that many steps (`quant/tune.py`); None: the recipe's default where GPTQ ran on a 4-bit format
    and the model is small enough to tune on a CPU in minutes, 0: never. `thorough`: the slower tuning
    recipe (`TuneConfig.thorough`) instead of the default one."""
    from quadrant.quant.tune import TuneConfig
    from quadrant.loader.source import open_pulled
    from quadrant.quant.rotate import RotatedSource, RotationError, rotation_refusal

    if fmt not in QUANT_FORMATS:
        raise QuantizeError(f"format must be one of {', '.join(QUANT_FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser()
    if out.exists():
        raise QuantizeError(f"{out} already exists; choose a new output folder (nothing was written)")
    source = open_pulled(model)
    already = source.quantization_label()
    if already is not None and not allow_requantize:
        raise QuantizeError(f"{model} is already quantised ({already}); quantise a float checkpoint, or pass "
                            f"--allow-requantize to stack the errors")
    if group_size not in (32, 64, 128, 256):
        raise QuantizeError(f"group size must be 32, 64, 128 or 256, got {group_size}")
    if method not in ("auto", "gptq", "rtn"):
        raise QuantizeError(f"method must be auto, gptq or rtn, got {method!r}")
    if rotate not in ("auto", "on", "off"):
        raise QuantizeError(f"rotate must be auto, on or off, got {rotate!r}")
    if tune_steps is not None and tune_steps < 0:
        raise QuantizeError(f"tune steps must be 0 (off) or more, got {tune_steps}")
    if thorough and not format_spec(fmt).four_bit:
        raise QuantizeError(f"--thorough tunes the 4-bit formats (w4a16, w4a8), not {fmt}")
    if thorough and tune_steps == 0:
        raise QuantizeError("--thorough is a tuning recipe; it cannot go with --tune-steps 0")
    if thorough and not source.has_tokenizer():
        raise QuantizeError(f"{model} has no tokenizer to tune with; leave out --thorough")
    if method == "gptq" and not source.has_tokenizer():
        raise QuantizeError(f"{model} has no tokenizer to calibrate GPTQ with; use --method rtn")
    _check_shapes(source.config, fmt)
    if rotate == "on" or (rotate == "auto" and fmt in _ROTATED_FORMATS and rotation_refusal(source) is None):
        try:
            source = RotatedSource.of(source)
        except RotationError as e:
            raise QuantizeError(str(e)) from None
    config = source.hf_config()  # a rotated source's: its LM head untied
    tied = source.config.tie_word_embeddings
    calibration = _calibrate(source, fmt, smoothing, group_size, method, progress)
    config["quantization_config"] = {"quant_method": "quadrant", "format": fmt}
    if format_spec(fmt).four_bit:
        config["quantization_config"]["group_size"] = group_size
    config["quantization_config"]["rounding"] = "gptq" if calibration.hessians is not None else "rtn"
    if calibration.smoother is not None:
        config["quantization_config"]["smoothquant"] = smoothing
    if isinstance(source, RotatedSource):  # a record only: the rotated weights load as any others
        config["quantization_config"]["rotation"] = f"random orthogonal, seed {source.seed}"
    four_bit = format_spec(fmt).four_bit
    tuning_ids = _tuning_ids(source) if four_bit and source.has_tokenizer() else []
    recipe = TuneConfig.thorough() if thorough else TuneConfig()
    # --thorough is an explicit request: it tunes wherever it is accepted, past "auto"'s size limit too.
    asked = recipe.steps if thorough and tune_steps is None else tune_steps
    steps = _tune_steps(source, fmt, calibration, asked, len(tuning_ids), recipe.steps)
    if steps:
        dtype = str(recipe.compute_dtype()).removeprefix("torch.")
        config["quantization_config"]["tuned"] = (f"scales, mins and norm gains, {steps} steps on the calibration "
                                                  f"texts (lr {recipe.lr:g}, {dtype} matmuls)")
    report = QuantizeReport(out, fmt, 0, 0, 0)

    def write(folder: Path) -> None:
        _write(source, fmt, folder, tied, progress, group_size, report, calibration)
        if steps:
            report.tuning = _tune(source, fmt, folder, replace(recipe, steps=steps), tuning_ids, progress)

    st.write_folder(out, config, source.tokenizer() if source.has_tokenizer() else None, write)
    return report


_TUNE_MAX_PARAMS = 1_000_000_000  # "auto" tunes up to here: ~1.8 s a step for 135M on two CPU cores (bf16)


def _tune_steps(source: ModelSource, fmt: str, calibration: Calibration, asked: int | None, tokens: int,
                default: int) -> int:
    """How many tuning steps to run: `asked`, or for None `default` where it applies (a 4-bit
    format rounded by GPTQ, a model of at most _TUNE_MAX_PARAMS). `tokens`: what the tuning texts
    encode to with the model's tokenizer."""
    from quadrant.quant.tune import TuneConfig

    four_bit = format_spec(fmt).four_bit
    if asked is not None:
        if asked and not four_bit:
            raise QuantizeError(f"tuning applies to the 4-bit formats (w4a16, w4a8), not {fmt}")
        if asked and not source.has_tokenizer():
            raise QuantizeError("the model has no tokenizer to tune with; pass --tune-steps 0")
        if asked and tokens < TuneConfig.seq_len:
            raise QuantizeError(f"the calibration texts encode to {tokens} tokens with this "
                                f"model's tokenizer; tuning needs {TuneConfig.seq_len} (pass --tune-steps 0)")
        return asked
    if not four_bit or calibration.hessians is None or tokens < TuneConfig.seq_len:
        return 0
    return default if source.parameter_count() <= _TUNE_MAX_PARAMS else 0


def _tuning_ids(source: ModelSource) -> list[int]:
    from quadrant.quant.tune import TUNING_TEXTS

    tokenizer = source.tokenizer()
    return [i for path in TUNING_TEXTS for i in tokenizer.encode(path.read_text())]


def _tune(source: ModelSource, fmt: str, folder: Path, recipe: TuneConfig, token_ids: list[int],
          progress: bool) -> TuneReport:
    from quadrant.quant.tune import tune_folder

    teacher = source.load_model(torch.float32, "cpu", "dense")
    return tune_folder(folder, teacher, fmt, token_ids, recipe, progress)


def _check_shapes(cfg: ModelConfig, fmt: str) -> None:
    """Refuse before writing anything when a projection's input width does not fit the format."""
    if not format_spec(fmt).four_bit:
        return
    widths = {cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size}
    widths |= {w for w in (getattr(cfg, "moe_intermediate_size", 0),) if w}
    for k in sorted(widths):
        try:
            group_size_for(k)
        except ValueError as e:
            raise QuantizeError(f"{fmt} cannot hold this architecture: {e}") from None


@dataclass
class Calibration:
    smoother: Smoother | None = None  # SmoothQuant scales (8-bit activations)
    hessians: dict[str, torch.Tensor] | None = None  # GPTQ's input Hessians
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens behind each Hessian
    # Checkpoint tensor name -> its weight as GPTQ's sequential pass rounded it in the model, where
    # that is what `_write` would compute again (no smoothing): rounding is per output row, so a
    # merged module's rows are its parts' own.
    rounded: dict[str, torch.Tensor] = field(default_factory=dict)


# Where "auto" rotates the residual stream; w4a8 then skips SmoothQuant under "auto" (the rotation
# has spread the outliers it would move, and moving them into 4-bit weights costs more: BENCHMARKS.md).
_ROTATED_FORMATS = tuple(n for n in QUANT_FORMATS if format_spec(n).activation_bits == 8)
_HESSIAN_BUDGET = 8 << 30  # "auto" rounds to nearest where GPTQ's Hessians would hold more (large MoEs)


def _calibrate(source: ModelSource, fmt: str, smoothing: float | str | None, group_size: int,
               method: str, progress: bool = False) -> Calibration:
    """Statistics of the float model on the shipped calibration text: SmoothQuant scales for the
    formats with 8-bit activations, GPTQ's input Hessians for all (each where it applies)."""
    from quadrant.quant.calibrate import CALIBRATION_TEXT, Smoother, supports_smoothing
    from quadrant.quant.rotate import RotatedSource
    from quadrant.quant.gptq import hessian_bytes, input_hessians

    if smoothing is not None and smoothing != "auto" and not (isinstance(smoothing, float) and 0.0 < smoothing < 1.0):
        raise QuantizeError(f"smoothing must be 'auto', a strength in (0, 1) or off, got {smoothing!r}")
    rotated = isinstance(source, RotatedSource)
    smooth = smoothing is not None and (fmt == "w8a8" or (fmt == "w4a8" and not (smoothing == "auto" and rotated)))
    # "auto": GPTQ for the 4-bit formats, where it is worth its minutes (a third of the perplexity at
    # groups of 128); int8 loses ~0.3% to nearest rounding, which `--method gptq` trims by ~0.1.
    use_gptq = method == "gptq" or (method == "auto" and format_spec(fmt).four_bit
                                    and hessian_bytes(source.config) <= _HESSIAN_BUDGET)
    if not (smooth or use_gptq) or not source.has_tokenizer():
        return Calibration()
    model = source.load_model(torch.float32, "cpu", "dense")
    ids = source.tokenizer().encode(CALIBRATION_TEXT.read_text())
    smoother = None
    if smooth and supports_smoothing(model):
        alpha = float(smoothing) if isinstance(smoothing, float) else None  # None: "auto", each layer's own
        smoother = Smoother(model, ids[:1024], alpha, fmt, group_size)
    hessians: dict[str, torch.Tensor] | None = None
    tokens: dict[str, int] = {}
    rounded: dict[str, torch.Tensor] = {}
    if use_gptq:  # sequential: each Hessian sees the inputs of the model rounded so far
        round_weights = _rounding_in_model(smoother, fmt, group_size)
        hessians, tokens = input_hessians(model, ids, round_weights=round_weights, progress=progress)
        if smoother is None:
            rounded = _rounded_tensors(model)
    del model
    return Calibration(smoother, hessians, tokens, rounded)


def _rounded_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{checkpoint name: weight} of every dense projection of the (rounded) calibration model, merged
    modules split back into their parts (q/k/v, gate/up)."""
    from quadrant.layers.linear import Linear, MergedLinear

    parts = {(merged, shard): proj for proj, (merged, shard) in getattr(type(model), "packed_modules", {}).items()}
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or not name.endswith("_proj") or module.weight is None:
            continue
        stem, _, leaf = name.rpartition(".")
        if not isinstance(module, MergedLinear):
            out[f"{name}.weight"] = module.weight.detach().clone()
            continue
        for shard in module.shard_offsets:
            proj = parts.get((leaf, shard))
            if proj is not None:
                out[f"{stem}.{proj}.weight"] = module.read_shard(module.weight.detach(), shard).clone()
    return out


def _round_projection(matrix: torch.Tensor, h: torch.Tensor | None, tokens: int, fmt: str, preferred_group: int,
                      scale: torch.Tensor | None) -> torch.Tensor:
    """One [N, K] projection (already smoothed by the column factors `scale`, if it is) as the folder
    stores it: floats on its grid (4-bit groups, or int8 per channel), from GPTQ where the
    calibration text reached it."""
    from quadrant.quant.gptq import gptq

    eight = format_spec(fmt).weight_bits == 8
    group = 0 if eight else group_size_for(matrix.shape[-1], preferred_group)
    if eight:
        q, step = int8_per_channel(matrix)
        nearest = q.float() * step[:, None]
    else:
        codes, grid_scale, lo = int4_groups(matrix, group)
        nearest = (codes * grid_scale + lo).view(matrix.shape)
    # Fewer tokens than twice the inputs (a rarely routed expert): GPTQ would fit the calibration
    # text's few directions and round worse than nearest elsewhere.
    if h is None or tokens < 2 * matrix.shape[-1]:
        return nearest.to(matrix.dtype)
    if torch.allclose(nearest, matrix.float(), rtol=0, atol=1e-6):
        return matrix  # already on such a grid (a Q4_1 source at g32): rounding to nearest is exact
    if scale is not None:  # smoothing divided this input by `scale`
        h = h / torch.outer(scale, scale).to(h.dtype)
    if eight:  # the per-channel grid fixed up front: 255 points, -127..127 steps
        return gptq(matrix.float(), h, matrix.shape[-1], grid=(step[:, None], -127 * step[:, None], 254)).to(matrix.dtype)
    return gptq(matrix.float(), h, group).to(matrix.dtype)


def _gptq_tensor(name: str, tensor: torch.Tensor, fmt: str, calibration: Calibration,
                 preferred_group: int) -> torch.Tensor:
    """`tensor` (already smoothed, if it is) rounded to its grid in format `fmt`: by GPTQ with its
    Hessian, to nearest where none was collected (a projection the calibration text never reached)."""
    from quadrant.quant.gptq import hessian_key

    assert calibration.hessians is not None
    scale = calibration.smoother.column_scale(name, tensor) if calibration.smoother is not None else None

    def one(matrix: torch.Tensor, key: str | None) -> torch.Tensor:
        h = calibration.hessians.get(key) if key is not None else None  # type: ignore[union-attr]
        return _round_projection(matrix, h, calibration.tokens.get(key or "", 0), fmt, preferred_group, scale)

    if tensor.dim() == 3:
        return torch.stack([one(tensor[e], hessian_key(name, e)) for e in range(tensor.shape[0])])
    return one(tensor, hessian_key(name))


def _rounding_in_model(smoother: Smoother | None, fmt: str, preferred_group: int) -> RoundWeights:
    """GPTQ's sequential pass rounds the calibration model's projections as `_write` will store them,
    in the model's own (unsmoothed) space: smooth the columns, round, unsmooth. (Row factors, which
    smoothing also applies, commute with rounding rows independently.)"""
    from quadrant.quant.gptq import checkpoint_name

    def round_weights(key: str, weight: torch.Tensor, h: torch.Tensor | None, tokens: int) -> torch.Tensor:
        scale = smoother.column_scale(checkpoint_name(key), weight) if smoother is not None else None
        if scale is None:
            return _round_projection(weight, h, tokens, fmt, preferred_group, None)
        return _round_projection(weight * scale, h, tokens, fmt, preferred_group, scale) / scale

    return round_weights


def _write(source: ModelSource, fmt: str, folder: Path, tied: bool, progress: bool, group_size: int,
           report: QuantizeReport, calibration: Calibration) -> None:
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shards: list[dict[str, torch.Tensor]] = []
    bar = tqdm(desc=f"quantize {fmt}", unit=" tensors", disable=not progress)
    for name, tensor in source.weights():
        report.bytes_in += tensor.numel() * 4
        if calibration.smoother is not None:
            tensor = calibration.smoother.apply(name, tensor)
        if is_quantizable(name, tensor) and not (tied and name == "lm_head.weight"):
            own = tensor_format(name, fmt)
            rounded = calibration.hessians is not None
            if rounded:  # floats on GPTQ's grids, stored as they are
                done = calibration.rounded.get(name)
                tensor = (done if done is not None and done.shape == tensor.shape
                          else _gptq_tensor(name, tensor, own, calibration, group_size))
            stem = name.removesuffix(".weight")
            parts = {f"{stem}.{k}": v.contiguous()
                     for k, v in quantize_tensor(tensor, own, group_size, on_grid=rounded).items()}
            report.num_quantized += 1
        else:
            # Safetensors sources keep their own dtype (the folder then loads back bit-identical to
            # quantising in memory); a GGUF's dequantised fp32 embedding table is stored as bf16.
            shrink = source.gguf is not None and tensor.is_floating_point() and tensor.dim() > 1
            parts = {name: (tensor.to(torch.bfloat16) if shrink else tensor).contiguous()}
        for key, value in parts.items():
            size = value.numel() * value.element_size()
            if shard and shard_bytes + size > _SHARD_BYTES:
                shards.append(shard)
                shard, shard_bytes = {}, 0
            shard[key] = value
            shard_bytes += size
            report.bytes_out += size
        bar.update(1)
    bar.close()
    shards.append(shard)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"))
        return
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / file))
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": report.bytes_out}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
