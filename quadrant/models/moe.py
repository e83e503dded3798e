"""Mixture-of-experts families on the llama decoder: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, dots1.

The decoder is llama.py's; ModelConfig's MoE fields give a MoE layer a layers/moe FFN (router,
stacked experts, shared experts) and set the variant: softmax or sigmoid (DeepSeek-V3-style,
dots1) routing, renormalised or not, grouped top-k, shared experts gated (Qwen2-MoE) or not.
What differs per family, and lives here, is how checkpoints name the expert weights.
"""

from __future__ import annotations

import torch

from quadrant.config import ModelConfig
from quadrant.models.llama import LlamaForCausalLM


class MoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE, Qwen3-MoE and OLMoE: Hugging Face names `mlp.gate`, `mlp.experts.{e}.*_proj`."""

    packed_modules = {
        **LlamaForCausalLM.packed_modules,
        # One expert's tensor -> its shard of the stacked expert weights (layers/moe.Experts).
        "experts.{e}.gate_proj.weight": ("experts.w13", "{e}.gate"),
        "experts.{e}.up_proj.weight": ("experts.w13", "{e}.up"),
        "experts.{e}.down_proj.weight": ("experts.w2", "{e}.down"),
        # All experts stacked [E, ...], as GGUF stores them (named so by gguf_names below).
        "experts.gate_proj.weight": ("experts.w13", "gate"),
        "experts.up_proj.weight": ("experts.w13", "up"),
        "experts.gate_up_proj.weight": ("experts.w13", "gate_up"),
        "experts.down_proj.weight": ("experts.w2", "down"),
    }
    gguf_names = {
        **LlamaForCausalLM.gguf_names,
        "blk.{i}.ffn_gate_inp": "model.layers.{i}.mlp.gate",
        "blk.{i}.ffn_gate_exps": "model.layers.{i}.mlp.experts.gate_proj",
        "blk.{i}.ffn_up_exps": "model.layers.{i}.mlp.experts.up_proj",
        "blk.{i}.ffn_gate_up_exps": "model.layers.{i}.mlp.experts.gate_up_proj",
        "blk.{i}.ffn_down_exps": "model.layers.{i}.mlp.experts.down_proj",
        "blk.{i}.ffn_gate_inp_shexp": "model.layers.{i}.mlp.shared_expert_gate",
        "blk.{i}.ffn_gate_shexp": "model.layers.{i}.mlp.shared_expert.gate_proj",
        "blk.{i}.ffn_up_shexp": "model.layers.{i}.mlp.shared_expert.up_proj",
        "blk.{i}.ffn_down_shexp": "model.layers.{i}.mlp.shared_expert.down_proj",
    }
    gguf_rope_permuted = False

    @classmethod
    def adapt_gguf_tensor(cls, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        if name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
            tensor = tensor[None]  # llama.cpp keeps Qwen2-MoE's [1, H] gate as [H]
        return super().adapt_gguf_tensor(name, tensor, config)


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: `block_sparse_moe.gate` and experts' w1 (gate), w3 (up), w2 (down); in GGUF it is
    the "llama" architecture with expert tensors, q/k rows permuted as for llama."""

    packed_modules = {
        **MoeForCausalLM.packed_modules,
        "block_sparse_moe.gate": ("mlp.gate", None),
        "block_sparse_moe.experts.{e}.w1.weight": ("mlp.experts.w13", "{e}.gate"),
        "block_sparse_moe.experts.{e}.w3.weight": ("mlp.experts.w13", "{e}.up"),
        "block_sparse_moe.experts.{e}.w2.weight": ("mlp.experts.w2", "{e}.down"),
    }
    gguf_rope_permuted = True


class Dots1ForCausalLM(MoeForCausalLM):
    """dots1: Qwen3 attention with a DeepSeek-V3 MoE block (sigmoid router with
    e_score_correction_bias, `shared_experts`, leading dense layers)."""

    packed_modules = {
        **MoeForCausalLM.packed_modules,
        "gate.e_score_correction.bias": ("gate.e_score_correction_bias", None),  # GGUF's exp_probs_b.bias
    }
    gguf_names = {
        **{k: v for k, v in MoeForCausalLM.gguf_names.items() if "shexp" not in k},
        "blk.{i}.exp_probs_b": "model.layers.{i}.mlp.gate.e_score_correction",
        "blk.{i}.ffn_gate_shexp": "model.layers.{i}.mlp.shared_experts.gate_proj",
        "blk.{i}.ffn_up_shexp": "model.layers.{i}.mlp.shared_experts.up_proj",
        "blk.{i}.ffn_down_shexp": "model.layers.{i}.mlp.shared_experts.down_proj",
    }
