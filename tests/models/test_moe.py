"""Mixture-of-experts families against Hugging Face transformers, and the router and MoE block
against plain torch references.

Tolerances: whole models as in test_vs_transformers (fp32 logits within 1e-4 of the largest
reference logit, 32 identical greedy tokens), from safetensors and from GGUF written the way
llama.cpp's converter writes it. Router: exact expert ids, weights within 1e-6 (the same fp32
ops). DeepSeek-V3 block against transformers' DeepseekV3MoE on shared weights: 1e-5 relative
(fp32; only the order of the per-expert sums differs).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from quadrant.config import ModelConfig  # noqa: E402
from quadrant.errors import ModelLoadError  # noqa: E402
from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.layers.moe import Experts, SparseMoeBlock, select_experts  # noqa: E402
from quadrant.loader.source import open_model  # noqa: E402
from quadrant.models.llama import LlamaMLP  # noqa: E402
from tests.models.test_gguf_archs import _write_gguf  # noqa: E402
from tests.models.test_vs_transformers import _rel_err, check_logits_and_greedy, make_random_hf  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, num_experts_per_tok=2)

# name -> (transformers class, tiny config, the GGUF architecture llama.cpp's converter writes)
FAMILIES = {
    "mixtral": lambda: ("MixtralForCausalLM", transformers.MixtralConfig(
        **COMMON, intermediate_size=64, num_hidden_layers=2, num_local_experts=4, rms_norm_eps=1e-5), "llama"),
    # A dense layer among MoE ones (mlp_only_layers), a gated shared expert, weights not renormalised.
    "qwen2_moe": lambda: ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_experts=8, mlp_only_layers=[1], norm_topk_prob=False), "qwen2moe"),
    "qwen3_moe": lambda: ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, head_dim=32, num_hidden_layers=2,
        num_experts=8, norm_topk_prob=True), "qwen3moe"),
    "olmoe": lambda: ("OlmoeForCausalLM", transformers.OlmoeConfig(
        **COMMON, intermediate_size=32, num_hidden_layers=2, num_experts=8, norm_topk_prob=False,
        rms_norm_eps=1e-5), "olmoe"),
    # DeepSeek-V3 routing on qwen3 attention: sigmoid scores, selection bias, grouped top-k,
    # renormalised and scaled weights, a shared MLP, a leading dense layer.
    "dots1": lambda: ("Dots1ForCausalLM", transformers.Dots1Config(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=8,
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=1, sliding_window=None), "dots1"),
}


def _make(name: str, path):
    torch.manual_seed(0)
    cls_name, config, arch = FAMILIES[name]()
    return make_random_hf(getattr(transformers, cls_name), config, path), arch


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_moe_family_matches_transformers(name, tmp_path):
    hf, _ = _make(name, tmp_path)
    check_logits_and_greedy(hf, tmp_path)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_moe_gguf_matches_transformers(name, tmp_path):
    hf, arch = _make(name, tmp_path / "hf")
    path = tmp_path / f"{name}.gguf"
    _write_gguf(hf, arch, path, checkpoint=tmp_path / "hf")
    source = open_model(path)
    ours = source.load_model(torch.float32)
    # Which layers are MoE comes from the router tensors present (qwen2_moe's layer 1, dots1's layer 0 are dense).
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers] == [
        hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    ids = torch.randint(0, hf.config.vocab_size, (19,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)])))
    assert _rel_err(got, ref) < 1e-4


def test_missing_expert_tensor_is_reported(tmp_path):
    _make("mixtral", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.experts\.w13\[2\.up\]"):
        open_model(tmp_path).load_model(torch.float32)


# -- router ------------------------------------------------------------------------------------
def _select_ref(logits, top_k, scoring, bias, n_group, topk_group, renormalize, scale):
    """select_experts one token at a time, in plain Python over the experts."""
    num_experts = logits.shape[1]
    per_group = num_experts // n_group
    weights, ids = [], []
    for row in logits:
        scores = row.sigmoid() if scoring == "sigmoid" else row.softmax(0)
        choice = (scores if bias is None else scores + bias).tolist()
        group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group])[-2:]) for g in range(n_group)]
        best_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(num_experts) if e // per_group in best_groups or n_group == 1]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = scores[chosen]
        if renormalize:
            w = w / w.sum()
        weights.append((w * scale).tolist())
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids)


@pytest.mark.parametrize("scoring,bias,n_group,topk_group,renormalize,scale", [
    ("softmax", False, 1, 1, False, 1.0),  # qwen2-moe, olmoe
    ("softmax", False, 1, 1, True, 1.0),  # mixtral, qwen3-moe
    ("sigmoid", True, 1, 1, True, 2.5),
    ("sigmoid", True, 4, 2, True, 2.5),  # deepseek-v3
    ("sigmoid", True, 2, 1, False, 1.0),
])
def test_router_matches_plain_torch(scoring, bias, n_group, topk_group, renormalize, scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 8, generator=g) * 2
    correction = torch.randn(8, generator=g) * 0.5 if bias else None
    weights, ids = select_experts(logits, 2, scoring, correction, n_group, topk_group, renormalize, scale)
    want_w, want_ids = _select_ref(logits, 2, scoring, correction, n_group, topk_group, renormalize, scale)
    order, want_order = ids.sort(dim=1), want_ids.sort(dim=1)  # the k chosen, in any order
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), want_w.gather(1, want_order.indices),
                               atol=1e-6, rtol=1e-6)
    assert weights.dtype == torch.float32
    if renormalize:
        torch.testing.assert_close(weights.sum(1), torch.full((37,), scale), atol=1e-5, rtol=0)


# -- DeepSeek-V3 MoE block against transformers ------------------------------------------------
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_block_matches_transformers(norm_topk_prob):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = transformers.DeepseekV3Config(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    torch.manual_seed(0)
    hf = DeepseekV3MoE(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
        hf.gate.e_score_correction_bias.normal_(0.0, 0.1)
    config = ModelConfig(
        architecture="dots1", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        router="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob,
        n_shared_experts=2)
    ours = SparseMoeBlock(config, LlamaMLP).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        # transformers stacks experts as we do: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
        ours.experts.w13.copy_(hf.experts.gate_up_proj)
        ours.experts.w2.copy_(hf.experts.down_proj)
        shared = hf.shared_experts
        ours.shared_experts.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
        x = torch.randn(2, 23, 64)
        want = hf(x)
        got = ours(x.reshape(-1, 64)).reshape(2, 23, 64)
    assert _rel_err(got, want) < 1e-5


def test_tokens_per_expert_counts_and_resets():
    config = ModelConfig(architecture="qwen3moe", vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2)
    block = SparseMoeBlock(config, LlamaMLP)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
        x = torch.randn(11, 16)
        _, ids = block.gate(x)
        block(x)
        block(x[:3])
    experts = block.experts
    assert isinstance(experts, Experts)
    want = torch.bincount(ids.flatten(), minlength=4) + torch.bincount(ids[:3].flatten(), minlength=4)
    assert torch.equal(experts.tokens_per_expert, want) and int(want.sum()) == 2 * 14
    experts.reset_stats()
    assert int(experts.tokens_per_expert.sum()) == 0


# -- config checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(num_experts=8, num_experts_per_tok=2, n_group=3), "n_group"),
    (dict(num_experts=8, num_experts_per_tok=4, n_group=4, topk_group=1), "topk_group"),
    (dict(num_experts=4, num_experts_per_tok=2, moe_layers=[2]), "moe_layers"),
    (dict(num_experts=4, num_experts_per_tok=2, shared_expert_gate=True), "shared_expert_intermediate_size"),
])
def test_bad_moe_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(architecture="qwen3moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, **fields)


def test_hf_config_top_k_over_experts_raises():
    cfg = transformers.MixtralConfig(num_local_experts=2, num_experts_per_tok=3).to_dict()
    with pytest.raises(ValueError, match="lower num_experts_per_tok"):
        ModelConfig.from_hf_config(cfg)
