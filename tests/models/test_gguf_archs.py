"""Tiny random models of each family written as GGUF the way llama.cpp's converter writes them
(its tensor names, metadata keys, Q/K row permutation for "llama", +1 on gemma norm gains),
then loaded by quadrant and compared with transformers on the original weights (fp32, 1e-4 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from quadrant.layers.attention import AttentionMetadata
from quadrant.loader.source import open_model
from tests.models.test_vs_transformers import _make_hf, _rel_err

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
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


def _write_gguf(hf, arch: str, path) -> None:
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
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, c.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(_gguf_name(name, arch), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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
