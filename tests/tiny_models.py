"""Tiny random transformers llamas saved as safetensors folders, for engine and quantisation tests."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(path: Path, hidden_size: int = 128, intermediate_size: int = 256, num_layers: int = 2,
                    std: float = 0.15, norm_jitter: float = 0.1, max_positions: int = 256, seed: int = 0):
    """A llama with N(0, std) weights and norm gains 1 + N(0, norm_jitter): larger than the default
    init, so its logits are peaked and greedy choices are not near-ties. Returns the HF model."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * norm_jitter + 1.0) if "norm" in name else p.normal_(0.0, std)
    model.save_pretrained(path, safe_serialization=True)
    return model


def outlier_llama(vocab_size: int, norm_gain: float = 1.0, stream_scale: float = 1.0):
    """A 2-layer llama (hidden 128) with N(0, 0.05) weights whose first four hidden channels carry
    outliers: RMSNorm gains of `norm_gain` there, and/or embeddings `stream_scale` times the rest
    (LLMs' massive activations start in the residual stream). Returns the HF model, unsaved."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05) if "norm" not in name else p.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = norm_gain
            layer.post_attention_layernorm.weight[:4] = norm_gain
        model.model.embed_tokens.weight[:, :4] *= stream_scale
    return model
