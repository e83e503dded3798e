"""Each architecture against Hugging Face transformers on a tiny random config loaded from safetensors.

Tolerances: fp32 logits within 1e-4 of the reference, relative to the largest
reference logit (both compute in fp32; differences come only from the order of
floating-point operations), and 32 greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant.engine.engine import LLMEngine  # noqa: E402
from quadrant.config import CacheConfig, SchedulerConfig  # noqa: E402
from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.loader.source import open_model  # noqa: E402
from quadrant.sampling_params import SamplingParams  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-tied-mha": lambda: transformers.LlamaConfig(
        **{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True, attention_bias=True, rope_theta=500000.0),
    "llama3-rope": lambda: transformers.LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0),
    "mistral-window": lambda: transformers.MistralConfig(**COMMON, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        final_logit_softcapping=30.0),
}
HF_CLASSES = {"gemma3": "Gemma3ForCausalLM", "mistral-window": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}


def _make_hf(name: str, tmp_path):
    torch.manual_seed(0)
    cls = getattr(transformers, HF_CLASSES.get(name, "LlamaForCausalLM"))
    return make_random_hf(cls, CONFIGS[name](), tmp_path, norm_center=0.0 if name == "gemma3" else 1.0)


def make_random_hf(cls, config, tmp_path, norm_center: float = 1.0):
    """A transformers model of `config` with random weights, saved as safetensors in tmp_path."""
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        # Larger-than-default weights give peaked logits, so greedy choices are not near-ties.
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + norm_center)
            else:
                p.normal_(0.0, 0.15)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # a checkpoint buffer (DeepSeek-style routers)
                b.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_greedy_match_transformers(name, tmp_path):
    check_logits_and_greedy(_make_hf(name, tmp_path), tmp_path)


def check_logits_and_greedy(hf, tmp_path) -> None:
    """quadrant loaded from tmp_path (where `hf` was saved) against `hf`: logits of a packed batch,
    then 32 greedy tokens per prompt through the engine's paged KV cache."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (21, 5, 13)]

    source = open_model(tmp_path)
    ours = source.load_model(torch.float32)
    # Three prompts packed into one flattened batch, no KV cache.
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    meta = AttentionMetadata.for_packed_sequences([len(p) for p in prompts])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, pos, meta))
        start = 0
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0]
            assert _rel_err(logits[start:start + len(p)], ref) < 1e-4
            start += len(p)

    # Greedy decoding through the paged KV cache, the prompt prefilled in small chunks.
    engine = LLMEngine.from_model(str(tmp_path), cache=CacheConfig(block_size=4, num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=6))
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    hf.generation_config.eos_token_id = None  # run all 32 steps, as ignore_eos does
    for p in prompts:
        engine.add_request(p, params, request_id="r")
        while engine.has_unfinished_requests():
            outs = engine.step()
        got = outs[0].outputs[0].token_ids
        want = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                           attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert got == want
    assert engine.kv.pool.num_free == 64  # every block returned
