"""Gemma 3 (text): the llama decoder with Gemma's flags set by ModelConfig.

(1 + w) RMSNorm gains, sandwich norms around attention and FFN, q/k norms,
sqrt(D)-scaled embeddings, GELU-tanh, and a local/global pattern of sliding-
window layers with their own rotary base. Only the GGUF names differ here.
"""

from __future__ import annotations

from quadrant.models.llama import LlamaForCausalLM


class Gemma3ForCausalLM(LlamaForCausalLM):
    gguf_names = {
        **LlamaForCausalLM.gguf_names,
        "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
        "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
        "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    }
    gguf_rope_permuted = False
    gguf_norm_shift = 1.0
