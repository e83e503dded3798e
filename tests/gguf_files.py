"""Small GGUF files written with the gguf package, for loader error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES


def write_tiny_llama_gguf(path: Path, arch: str = "llama", weight_type: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """A 1-layer llama-shaped GGUF with random weights; `weight_type` sets the 2-D tensors' type."""
    d, ff, vocab = 64, 128, 32
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1 or weight_type == GGMLQuantizationType.F32:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        else:
            block, size = GGML_QUANT_SIZES[weight_type]
            raw = rng.integers(0, 255, (shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=weight_type)

    add("token_embd.weight", (vocab, d))
    add("output_norm.weight", (d,))
    add("blk.0.attn_norm.weight", (d,))
    add("blk.0.ffn_norm.weight", (d,))
    for name, shape in [("attn_q", (d, d)), ("attn_k", (32, d)), ("attn_v", (32, d)), ("attn_output", (d, d)),
                        ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
        add(f"blk.0.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
