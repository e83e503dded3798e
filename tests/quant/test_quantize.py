"""`quadrant quantize`: stored grids, folders that load back, and the refusals.

A written folder must load back to exactly what quantising the float model in memory gives
(logits within 1e-5 relative: the codes are identical, only float summation order may
differ). How much each format costs in quality is measured on the real default model in
benchmarks/quant_quality.py (tiny random models are too chaotic to say: 4-bit noise flips
most of their near-uniform choices).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant.engine.engine import LLMEngine  # noqa: E402
from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.loader.source import open_model  # noqa: E402
from tests.tiny_models import outlier_llama, save_tiny_llama  # noqa: E402
from quadrant.quant.quantize import (QuantizeError, _pack_nibbles, _unpack_nibbles, dequantize_tensor,  # noqa: E402
                                     quantize_model, quantize_tensor)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path)
    return path


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "w4a16", "w4a8"])
def test_stored_grid_round_trips(fmt):
    w = torch.randn(2, 24, 256) * 0.1  # stacked like MoE experts
    parts = quantize_tensor(w, fmt)
    back = dequantize_tensor(parts, fmt)
    step = {"int8": w.abs().amax(-1, keepdim=True) / 127, "w8a8": w.abs().amax(-1, keepdim=True) / 127}.get(fmt)
    if step is None:  # 4-bit: half a step of the group's range / 15
        g = w.reshape(2, 24, 2, 128)
        step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g).reshape(w.shape)
    assert torch.all((back - w).abs() <= step / 2 + 1e-6)
    # Quantising the grid again gives the same codes: loading a folder reproduces what was written.
    again = quantize_tensor(back, fmt)
    assert torch.equal(again["qweight"], parts["qweight"])


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (3, 64))
    assert torch.equal(_unpack_nibbles(_pack_nibbles(codes)).long(), codes)


def _logits(path, fmt: str, group_size: int | None = None) -> torch.Tensor:
    engine = LLMEngine.from_model(str(path), weight_format=fmt if group_size is None else "dense")
    if group_size is not None:  # quantise in memory with a non-default group, as the folder was written
        from quadrant.quant.formats import single_plan
        from quadrant.layers.linear import Linear
        for name, m in engine.model.named_modules():
            if isinstance(m, Linear):
                m.repack(single_plan(fmt, group_size))
        head = engine.model.lm_head
        head.repack(single_plan("int8"))  # the LM head runs int8 weight-only in every format
    ids = torch.arange(40) % 256
    with torch.inference_mode():
        hidden = engine.model(ids, torch.arange(40), AttentionMetadata.for_packed_sequences([40]))
        return engine.model.compute_logits(hidden)


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "w4a16", "w4a8"])
def test_quantized_folder_loads_back_close_to_dense(tiny_llama, tmp_path, fmt):
    out = tmp_path / fmt
    report = quantize_model(str(tiny_llama), fmt, out, progress=False, group_size=64, smoothing=None, rotate="off")
    assert report.num_quantized == 2 * 7 + 1  # 7 projections per layer + the untied LM head
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "quadrant", "format": fmt, "rounding": "rtn",  # no tokenizer
                                          **({"group_size": 64} if fmt.startswith("w4") else {})}
    source = open_model(out)
    assert source.quantization_label() == fmt and source.default_weight_format("cpu") == fmt
    info = source.describe()
    assert info["quantization"] == fmt and info["size on disk"] < sum(
        f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    in_memory = _logits(tiny_llama, fmt, group_size=64)
    ours = _logits(out, "auto")  # the folder's own format
    assert ((ours - in_memory).abs().max() / in_memory.abs().max()).item() < 1e-5


def test_refusals_write_nothing(tiny_llama, tmp_path):
    out = tmp_path / "q"
    quantize_model(str(tiny_llama), "int8", out, progress=False)
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_model(str(tiny_llama), "w4a16", out, progress=False)
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize_model(str(out), "w4a16", tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()
    # A width no 4-bit group divides (hidden 48 is not a multiple of 32).
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    odd = tmp_path / "odd"
    transformers.LlamaForCausalLM(cfg).save_pretrained(odd, safe_serialization=True)
    with pytest.raises(QuantizeError, match="cannot hold"):
        quantize_model(str(odd), "w4a8", tmp_path / "odd-q", progress=False)
    assert not (tmp_path / "odd-q").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left


def test_smoothing_lowers_w8a8_error_on_outlier_channels(default_gguf_path, tmp_path):
    """A few hidden channels with 30x norm gains (the outliers LLM activations have): per-token int8
    activations lose them; SmoothQuant's migration into the weights must cut the error."""
    from quadrant.loader.source import open_model as open_source

    model = outlier_llama(49152, norm_gain=30.0)
    path = tmp_path / "outliers"
    model.save_pretrained(path, safe_serialization=True)
    open_source(default_gguf_path).tokenizer().save_pretrained(path)
    dense = _logits(path, "dense")
    errors = {}
    for smoothing in (None, "auto"):
        out = tmp_path / f"w8a8-{smoothing}"
        quantize_model(str(path), "w8a8", out, progress=False, smoothing=smoothing, rotate="off")
        ours = _logits(out, "auto")
        errors[smoothing] = ((ours - dense).abs().max() / dense.abs().max()).item()
    assert errors["auto"] < 0.7 * errors[None], errors
    assert json.loads((tmp_path / "w8a8-auto" / "config.json").read_text())["quantization_config"]["smoothquant"] == "auto"
