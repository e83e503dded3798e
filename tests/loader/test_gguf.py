"""The default GGUF (real weights, Q4_1/Q8_0) against transformers' own GGUF loader.

transformers dequantises the same blocks to fp32 and undoes llama.cpp's Q/K
permutation itself, so matching logits (1e-4 relative, fp32 op-order noise)
checks our dequantisation, name map and un-permutation together.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from quadrant.errors import ModelLoadError
from quadrant.layers.attention import AttentionMetadata
from quadrant.loader.source import open_model


def test_default_model_config(default_gguf_path):
    src = open_model(default_gguf_path)
    c = src.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192 and c.rope_theta == 100000.0
    info = src.describe()
    assert info["quantization"] == "Q4_1" and info["license"] == "apache-2.0"
    assert 130e6 < info["parameters"] < 140e6
    assert "<|im_start|>" in info["chat template"]


def assert_logits_match_transformers(path, ids: list[int]) -> None:
    """Our fp32 load of a GGUF against transformers' dequantised load of the same file."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ours = open_model(path).load_model(torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got = ours.compute_logits(ours(torch.tensor(ids), torch.arange(len(ids)),
                                       AttentionMetadata.for_packed_sequences([len(ids)])))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_default_model_logits_match_transformers(default_gguf_path):
    assert_logits_match_transformers(default_gguf_path, [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 198, 2683, 8453])


def test_truncated_gguf_is_a_clear_error(default_gguf_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(default_gguf_path, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(os.path.getsize(default_gguf_path) // 2))
    with pytest.raises(ModelLoadError, match="truncated|not a valid GGUF"):
        open_model(bad)


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1000))
    with pytest.raises(ModelLoadError):
        open_model(bad)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError):
        open_model(tmp_path / "empty.gguf")


def test_loading_never_holds_two_copies(default_gguf_path):
    """Peak memory while loading stays under two fp32 copies of the weights (we stream them)."""
    import subprocess
    import sys

    code = f"""
import resource, torch
from quadrant.loader.source import open_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = open_model({str(default_gguf_path)!r}).load_model(torch.float32)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    grown, weights = map(int, out.split())
    # One full copy plus the mapped file, the tokenizer and one dequantised tensor; a second
    # copy of the weights would put this over 2x.
    assert grown < 2 * weights, (grown, weights)


def test_gemma3_catalogue_model_matches_transformers(gemma_gguf_path):
    """gemma3:270m: pulled from four chunk packages (sha256 of the whole file checked by pull), its
    Q4_K/Q5_0/Q8_0/Q6_K tensors dequantised, its logits those of transformers on the same file."""
    from quadrant.loader import store

    stored = store.find_stored("gemma3:270m")
    assert stored is not None and stored.sha256 == store.CATALOGUE["gemma3:270m"].sha256
    assert stored.size == gemma_gguf_path.stat().st_size == 253113024
    source = open_model(gemma_gguf_path)
    # Most of its elements are the 262k-token embedding, stored Q8_0.
    assert source.config.architecture == "gemma3" and source.describe()["quantization"] == "Q8_0"
    ids = source.tokenizer().encode("The capital of France is Paris, and the capital of Italy is")
    assert_logits_match_transformers(gemma_gguf_path, ids)
