"""Depth-scaled sandwich norm + TinyInit keep the residual stream's RMS flat with depth at
initialisation; pre-norm with the usual N(0, 0.02) init lets it grow."""

from __future__ import annotations

import math

import pytest
import torch

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.train.config import InitConfig
from quadrant.train.init import init_weights
from quadrant.train.model import build_model


def residual_rms(num_layers: int, placement: str, tiny: bool) -> list[float]:
    """RMS of the residual stream after each layer for 64 random tokens of a fresh d=128 model."""
    config = ModelConfig(architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         sandwich_norm=placement != "pre")
    init = InitConfig(norm_placement=placement, tiny_init=tiny)  # embeddings: N(0, 1) tiny, else N(0, 0.02)
    model = build_model(config)
    init_weights(model, config, init)
    rms: list[float] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _m, _i, out: rms.append(float((out[0] + out[1]).pow(2).mean().sqrt())))
    ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, torch.arange(64), AttentionMetadata.for_packed_sequences([64]))
    return rms


def test_depth_scaled_sandwich_with_tiny_init_is_flat_with_depth():
    finals = {}
    for depth in (8, 16, 32, 64):
        rms = residual_rms(depth, "depth_scaled_sandwich", tiny=True)
        finals[depth] = rms[-1]
        # Each layer adds a normalised output of RMS c / sqrt(L): the stream stays within
        # sqrt(1 + 2 c^2) = 1.73 of its N(0, 1) embedding (c = 1), whatever the depth.
        assert 0.9 < min(rms) and max(rms) < 1.9, (depth, rms)
    # Measured 1.69, 1.68, 1.64, 1.44: no growth from 8 to 64 layers.
    assert 0.8 < finals[64] / finals[8] < 1.1, finals


def test_pre_norm_residual_grows_with_depth():
    # Measured 0.12 at 8 layers, 0.40 at 64 (from 0.026 after the embedding): about sqrt(L).
    finals = {depth: residual_rms(depth, "pre", tiny=False)[-1] for depth in (8, 64)}
    assert finals[64] > 2.5 * finals[8], finals


def test_post_norm_gains_start_at_c_over_sqrt_depth():
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4, sandwich_norm=True)
    model = build_model(config)
    init_weights(model, config, InitConfig(norm_placement="depth_scaled_sandwich", post_norm_scale=2.0, tiny_init=True))
    layer = model.model.layers[3]
    assert torch.allclose(layer.post_attention_layernorm.weight, torch.full((32,), 0.5))
    assert torch.allclose(layer.post_feedforward_layernorm.weight, torch.full((32,), 0.5))
    assert torch.allclose(layer.input_layernorm.weight, torch.ones(32))
    std = layer.self_attn.qkv_proj.weight.std().item()
    assert std == pytest.approx(math.sqrt(1 / (2 * 32 * 16)), rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.05)
