"""The training objective: SFT masking, packed-document attention, schedules, the TP layout helpers."""

from __future__ import annotations

import math

import pytest
import torch

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.train.config import InitConfig, OptimConfig
from quadrant.train.data import IGNORE_INDEX
from quadrant.train.init import init_weights
from quadrant.train.model import TrainingModel, build_model, packed_metadata
from quadrant.train.optim import lr_at
from quadrant.train.parallelize import canonical_merged, interleave_merged, stage_layers

CONFIG = ModelConfig(architecture="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def _model() -> TrainingModel:
    causal = build_model(CONFIG)
    init_weights(causal, CONFIG, InitConfig(init_std=0.2))
    return TrainingModel(causal)


def test_masked_positions_contribute_exactly_zero_loss_and_gradient():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    positions = torch.arange(16).repeat(2, 1)
    labels = torch.randint(0, 128, (2, 16), generator=gen)
    masked = torch.rand(2, 16, generator=gen) < 0.5
    labels[masked] = IGNORE_INDEX
    logits = None

    def capture(_m, _i, out):
        nonlocal logits
        out.retain_grad()
        logits = out

    model.lm_head.register_forward_hook(capture)
    loss, count = model(ids, positions, labels)
    loss.backward()
    assert count == (~masked).sum()
    assert logits is not None and logits.grad is not None
    assert torch.count_nonzero(logits.grad.view(2, 16, -1)[masked]) == 0  # exactly zero, not small
    # The loss is the sum over unmasked tokens only: recompute it from those rows alone.
    keep = ~masked.view(-1)
    ref = torch.nn.functional.cross_entropy(logits.detach()[keep], labels.view(-1)[keep], reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_documents_in_a_row_do_not_attend_to_each_other():
    model = _model()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (10,), generator=g), torch.randint(0, 128, (6,), generator=g)
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(10), torch.arange(6)])[None]
    meta = packed_metadata(positions)
    assert meta.query_start_loc_cpu == [0, 10, 16]
    with torch.no_grad():
        together = model.model(packed[0], positions[0], meta)
        alone = model.model(b, torch.arange(6), AttentionMetadata.for_packed_sequences([6]))
    # A leak across documents moves the hidden states by ~1e-1; 16 rows against 6 only change the
    # matmuls' blocking (fp32 rounding, up to ~2e-6 seen).
    torch.testing.assert_close(together[10:], alone, rtol=1e-5, atol=1e-5)


def test_schedules():
    cosine = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cosine) == pytest.approx(0.1)
    assert lr_at(9, 100, cosine) == pytest.approx(1.0)
    assert lr_at(99, 100, cosine) == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, 100, cosine) == pytest.approx(0.55, abs=0.02)
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, 100, wsd) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(89, 100, wsd) == pytest.approx(0.5) and lr_at(99, 100, wsd) == 0.0
    assert all(lr_at(s, 100, wsd) >= lr_at(s + 1, 100, wsd) for s in range(5, 99))
    assert math.isclose(lr_at(3, 100, OptimConfig(lr=2.0, schedule="constant")), 2.0)


def test_tp_interleave_round_trip_and_stage_split():
    weight = torch.arange(48.0).view(12, 4)  # q: 8 rows, k: 2, v: 2
    inter = interleave_merged(weight, [8, 2, 2], 2)
    assert inter[:6, 0].tolist() == [0, 4, 8, 12, 32, 40]  # rank 0: q rows 0-3, k row 0, v row 0
    torch.testing.assert_close(canonical_merged(inter, [8, 2, 2], 2), weight)
    assert stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]


def test_equal_length_rows_attend_in_one_call_like_the_per_sequence_loop():
    from quadrant.layers import attn_backends
    from quadrant.layers.attention import Attention

    layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, scale=8**-0.5)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3 * 10, h, 8, generator=gen) for h in (4, 2, 2))
    meta = AttentionMetadata.for_packed_sequences([10, 10, 10])
    batched = attn_backends.torch_attention(layer, q, k, v, meta)
    looped = torch.cat([attn_backends._attend(layer, q[i:i + 10], k[i:i + 10].transpose(0, 1), v[i:i + 10].transpose(0, 1))
                        for i in (0, 10, 20)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)  # fp32, same math, other kernel


@pytest.mark.parametrize("fields, model_type", [
    (dict(architecture="llama"), "llama"),
    (dict(architecture="qwen3", qk_norm=True), "qwen3"),
    (dict(architecture="qwen3moe", qk_norm=True, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True), "qwen3_moe"),
    (dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2, norm_topk_prob=True), "mixtral"),
    (dict(architecture="llama", qk_norm=True), "quadrant_llama"),  # options the family type fixes otherwise
    (dict(architecture="llama", sandwich_norm=True), "quadrant_llama"),
    (dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, router_bias=True),
     "quadrant_mixtral"),
])
def test_exported_configs_read_back_and_keep_plain_types_when_they_can(fields, model_type):
    import dataclasses

    config = ModelConfig(**{**dataclasses.asdict(CONFIG), "moe_layers": None, **fields})
    written = config.to_hf_config()
    assert written["model_type"] == model_type
    back = ModelConfig.from_hf_config(written)
    assert {f.name for f in dataclasses.fields(config) if getattr(back, f.name) != getattr(config, f.name)} == set()
