"""Tiny random models of each family written as GGUF the way llama.cpp's converter writes them
(its tensor names, metadata keys, Q/K row permutation for "llama", +1 on gemma norm gains,
experts stacked [E, ...]), then loaded by quadrant and compared with transformers on the
original weights (fp32, 1e-4 relative)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import ExpertGatingFuncType, GGUFWriter
from safetensors.torch import load_file

from quadrant.layers.attention import AttentionMetadata
from quadrant.loader.source import open_model
from tests.models.test_vs_transformers import _make_hf, _rel_err

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # mixture of experts (the experts themselves are stacked, see _EXPERT)
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate.e_score_correction": "exp_probs_b",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
# One expert's projection (Qwen/OLMoE/dots1 or Mixtral names) -> the stacked GGUF tensor it joins.
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
                "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(hf_name: str, arch: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        table = {**HF_TO_GGUF, **GEMMA_NORMS} if arch == "gemma3" else HF_TO_GGUF
        return f"blk.{i}.{table[rest]}.{kind}"
    return f"{HF_TO_GGUF[stem]}.{kind}"


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf, arch: str, path, checkpoint=None) -> None:
    """`checkpoint`: the folder hf was saved to, read as the converter reads it (transformers 5
    holds experts fused in memory but saves them one tensor per expert); else hf's state dict."""
    c = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
        w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
        w.add_float32("gemma3.final_logit_softcapping", c.final_logit_softcapping)
    else:
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    _add_expert_metadata(w, c.to_dict())
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    experts: dict[str, list[np.ndarray]] = {}
    tensors = load_file(str(checkpoint / "model.safetensors")) if checkpoint is not None else hf.state_dict()
    for name, t in tensors.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if m := _EXPERT.fullmatch(name):
            experts.setdefault(f"blk.{m[1]}.{_EXPERT_GGUF[m[3]]}.weight", []).append(t.numpy())
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if name.endswith("shared_expert_gate.weight"):
            t = t.squeeze(0)  # llama.cpp's [H] gate
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, c.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(_gguf_name(name, arch), t.numpy().astype(np.float32))
    for gguf_name, per_expert in experts.items():
        w.add_tensor(gguf_name, np.stack(per_expert).astype(np.float32))  # [E, out, in], experts in order
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_expert_metadata(w: GGUFWriter, hp: dict) -> None:
    """The expert keys convert_hf_to_gguf writes (TextModel, Qwen2MoeModel, Dots1Model)."""
    num_experts = hp.get("num_local_experts") or hp.get("num_experts") or hp.get("n_routed_experts")
    if not num_experts:
        return
    w.add_expert_count(num_experts)
    w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("n_group") is not None:
        w.add_expert_group_count(hp["n_group"])
        w.add_expert_group_used_count(hp["topk_group"])
    if hp.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    if hp.get("n_shared_experts"):  # dots1
        w.add_leading_dense_block_count(hp["first_k_dense_replace"])
        w.add_expert_shared_count(hp["n_shared_experts"])
        w.add_expert_weights_scale(hp["routed_scaling_factor"])
        w.add_expert_weights_norm(hp["norm_topk_prob"])
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


@pytest.mark.parametrize("name,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma3", "gemma3")])
def test_gguf_arch_matches_transformers(name, arch, tmp_path):
    hf = _make_hf(name, tmp_path / "hf")
    path = tmp_path / f"{name}.gguf"
    _write_gguf(hf, arch, path)
    ours = open_model(path).load_model(torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (19,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)])))
    assert _rel_err(got, ref) < 1e-4
