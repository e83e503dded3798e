"""The residual-stream rotation (`quant/rotate.py`): the rotated checkpoint computes the same
function (fp32 logits within 1e-4 of the largest, as the family tests hold against
transformers: the rotation is exact in fp64, only the fp32 rounding of the rotated weights and
of the sums differs), for dense and MoE families, tied and untied heads, safetensors and GGUF;
the families it cannot rotate are refused; `quadrant quantize --rotate on` writes a folder
that loads back to exactly the in-memory quantisation of the rotated model."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.layers.linear import Linear  # noqa: E402
from quadrant.loader.source import open_model  # noqa: E402
from quadrant.quant.formats import single_plan  # noqa: E402
from quadrant.quant.quantize import QuantizeError, quantize_model  # noqa: E402
from quadrant.quant.rotate import RotatedSource, RotationError, random_orthogonal  # noqa: E402
from tests.models.test_gguf_archs import _write_gguf  # noqa: E402
from tests.models.test_moe import _make  # noqa: E402
from tests.models.test_vs_transformers import make_random_hf  # noqa: E402
from tests.tiny_models import outlier_llama, save_tiny_llama  # noqa: E402


def _logits(model, n: int = 23) -> torch.Tensor:
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(n), AttentionMetadata.for_packed_sequences([n])))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _tied_llama(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    make_random_hf(transformers.LlamaForCausalLM, cfg, path)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(48, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, random_orthogonal(48, seed=3)) and not torch.equal(q, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dots1"])
def test_rotated_model_computes_the_same_logits(name, tmp_path):
    if name == "llama":
        save_tiny_llama(tmp_path)
    elif name == "llama-tied":
        _tied_llama(tmp_path)
    else:
        _make(name, tmp_path)
    source = open_model(tmp_path)
    rotated = RotatedSource.of(source)
    assert not rotated.config.tie_word_embeddings and rotated.hf_config()["tie_word_embeddings"] is False
    weights = dict(rotated.weights())
    assert all(torch.equal(t, torch.ones_like(t)) for n, t in weights.items() if n.endswith("norm.weight")
               and "q_norm" not in n and "k_norm" not in n)
    assert _rel(_logits(rotated.load_model(torch.float32)), _logits(source.load_model(torch.float32))) < 1e-4


def test_rotated_gguf_with_stacked_experts(tmp_path):
    hf, arch = _make("qwen3_moe", tmp_path / "hf")
    path = tmp_path / "m.gguf"
    _write_gguf(hf, arch, path, checkpoint=tmp_path / "hf")
    source = open_model(path)
    rotated = RotatedSource.of(source)
    assert any(t.dim() == 3 for _, t in rotated.weights())  # GGUF's [E, N, K] expert stacks, rotated whole
    assert _rel(_logits(rotated.load_model(torch.float32)), _logits(source.load_model(torch.float32))) < 1e-4


def test_families_with_offset_norms_are_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    make_random_hf(transformers.Gemma3ForCausalLM, cfg, tmp_path / "g")
    with pytest.raises(RotationError, match="not plain RMSNorm"):
        RotatedSource.of(open_model(tmp_path / "g"))
    with pytest.raises(QuantizeError, match="not plain RMSNorm"):
        quantize_model(str(tmp_path / "g"), "w8a8", tmp_path / "q", progress=False, rotate="on")
    assert not (tmp_path / "q").exists()
    # "auto" quietly leaves such a model unrotated.
    quantize_model(str(tmp_path / "g"), "w8a8", tmp_path / "q2", progress=False, smoothing=None)
    assert "rotation" not in json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("fmt", ["w8a8", "w4a8", "w4a16"])
def test_rotated_folder_loads_back_as_quantised_in_memory(tmp_path, fmt):
    _tied_llama(tmp_path / "m")
    out = tmp_path / "q"
    rotate = "on" if fmt == "w4a16" else "auto"  # "auto" rotates for the 8-bit-activation formats
    quantize_model(str(tmp_path / "m"), fmt, out, progress=False, group_size=64, smoothing=None, rotate=rotate)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["rotation"].startswith("random")
    model = RotatedSource.of(open_model(tmp_path / "m")).load_model(torch.float32)
    for _, m in model.named_modules():
        if isinstance(m, Linear):
            m.repack(single_plan(fmt, 64))
    model.lm_head.repack(single_plan("int8"))  # the LM head runs int8 weight-only in every format
    folder = open_model(out)
    assert _rel(_logits(folder.load_model(torch.float32, "cpu", fmt)), _logits(model)) < 1e-5


def test_rotation_lowers_w8a8_error_on_residual_outliers(tmp_path):
    """Four residual-stream channels 100x the rest (LLMs' massive activations start in the stream):
    each norm's output then carries them, and per-token int8 activations lose the other channels.
    Rotated, the stream spreads them over every channel."""
    model = outlier_llama(512, stream_scale=100.0)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    dense = _logits(open_model(tmp_path / "m").load_model(torch.float32))
    errors = {}
    for rotate in ("off", "on"):
        quantize_model(str(tmp_path / "m"), "w8a8", tmp_path / rotate, progress=False, smoothing=None, rotate=rotate)
        errors[rotate] = _rel(_logits(open_model(tmp_path / rotate).load_model(torch.float32, "cpu", "w8a8")), dense)
    assert errors["on"] < 0.85 * errors["off"], errors


def test_a_tensor_no_rule_covers_is_refused_up_front(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_llama(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.mystery_proj.weight"] = torch.zeros(128, 128)  # reads or writes the stream: unknown
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(RotationError, match="no rule for model.layers.0.mlp.mystery_proj.weight"):
        RotatedSource.of(open_model(tmp_path))
