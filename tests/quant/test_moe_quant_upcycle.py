"""Upcycling a dense model into a MoE, and quantised experts.

- An upcycled model computes what the dense one did: every expert is the dense FFN and
  Mixtral's renormalised top-k weights sum to one (fp32 logits within 1e-5 relative, the
  rounding of that sum), and transformers' Mixtral reads the folder to the same logits.
- Quantised experts: a quantised MoE folder loads back to what quantising in memory gives
  (1e-5). On the upcycled model every expert is the dense FFN, so its quantised experts must
  compute what the dense model's quantised MLP does: the same kernels in every format,
  up to the routing weights' rounding, which the int8 LM head's bf16 input can turn into one
  bf16 step (1e-2).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant.engine.engine import LLMEngine  # noqa: E402
from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.layers.moe import Experts  # noqa: E402
from quadrant.quant.quantize import quantize_model  # noqa: E402
from quadrant.upcycle import UpcycleError, upcycle  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402

TOL = {"int8": 1e-2, "w8a8": 1e-2, "w4a16": 1e-2, "w4a8": 1e-2}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    save_tiny_llama(path, std=0.05, norm_jitter=0.05)
    return path


@pytest.fixture(scope="module")
def moe(dense, tmp_path_factory):
    return upcycle(str(dense), tmp_path_factory.mktemp("up") / "moe", num_experts=4, top_k=2, progress=False)


def _logits(path, fmt: str = "dense") -> torch.Tensor:
    engine = LLMEngine.from_model(str(path), weight_format=fmt)
    ids = torch.arange(40) % 256
    with torch.inference_mode():
        return engine.model.compute_logits(engine.model(ids, torch.arange(40), AttentionMetadata.for_packed_sequences([40])))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_upcycled_moe_starts_as_the_dense_model(dense, moe):
    engine = LLMEngine.from_model(str(moe))
    assert engine.model_config.num_experts == 4 and any(isinstance(m, Experts) for m in engine.model.modules())
    ours = _logits(moe)
    assert _rel(ours, _logits(dense)) < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe).eval()
    with torch.no_grad():
        ref = hf(torch.arange(40)[None] % 256).logits[0]
    assert _rel(ours, ref) < 1e-4


def test_upcycle_refusals(dense, moe, tmp_path):
    with pytest.raises(UpcycleError, match="already exists"):
        upcycle(str(dense), moe, progress=False)
    with pytest.raises(UpcycleError, match="dense llama-family"):
        upcycle(str(moe), tmp_path / "again", progress=False)
    with pytest.raises(UpcycleError, match="top-k"):
        upcycle(str(dense), tmp_path / "k", num_experts=2, top_k=3, progress=False)


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "w4a16", "w4a8"])
def test_quantized_experts(dense, moe, tmp_path, fmt):
    out = tmp_path / fmt
    quantize_model(str(moe), fmt, out, progress=False, rotate="off")  # rotated folders: test_rotate.py
    folder = _logits(out, "auto")
    engine = LLMEngine.from_model(str(out))
    experts = [m for m in engine.model.modules() if isinstance(m, Experts)]
    assert experts and all(m.expert_kernels and m.w13 is None for m in experts)  # packed per expert on CPU
    assert _rel(folder, _logits(moe, fmt)) < 1e-5  # the folder holds exactly the in-memory grid
    assert _rel(folder, _logits(dense, fmt)) < TOL[fmt]


def test_router_statistics_count_every_routed_token(moe):
    from quadrant import SamplingParams

    engine = LLMEngine.from_model(str(moe))
    list(engine.stream(list(range(1, 30)), SamplingParams(max_tokens=5, ignore_eos=True)))
    load = engine.expert_load()
    assert len(load) == 2 and all(len(c) == 4 for c in load.values())
    # Every token run through the model went to top-2 experts in each layer.
    assert all(sum(c) == 2 * engine.num_computed_tokens for c in load.values())


def test_router_statistics_skip_graph_padding_rows(moe):
    """Three requests decode through the padded CUDA-graph buffers (size 4; eager off CUDA): the
    padding row is routed but must not be counted."""
    from quadrant import SamplingParams
    from quadrant.config import CacheConfig

    engine = LLMEngine.from_model(str(moe), attention_backend="triton", cache=CacheConfig(num_blocks=64))
    assert engine.runner.graphs is not None
    for i in range(3):
        engine.add_request(list(range(1 + i, 9 + i)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert all(sum(c) == 2 * engine.num_computed_tokens for c in engine.expert_load().values())


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_smoothing_folds_leave_the_float_model_unchanged(dense, moe, which):
    """SmoothQuant only moves scale between activations and weights: applied to a float model it
    must not change the logits (1e-4 relative: the rescaled products round differently)."""
    from quadrant.loader.source import open_model
    from quadrant.loader.weights import load_weights
    from quadrant.quant.calibrate import Smoother

    source = open_model(dense if which == "dense" else moe)
    model = source.load_model(torch.float32, "cpu", "dense")
    smoother = Smoother(model, list(range(1, 200)), alpha=0.8)
    assert smoother.scales and (which == "dense" or (smoother.ffn_readers and smoother.expert_down))
    # o_proj's input scales go into v_proj's rows (2 query heads per kv head here: shared scales)
    assert "model.layers.0.self_attn.o_proj.weight" in smoother.scales
    assert "model.layers.0.self_attn.v_proj.weight#rows" in smoother.scales
    fresh = source._build(torch.float32, "cpu")
    load_weights(fresh, ((n, smoother.apply(n, t)) for n, t in source.weights()))
    ids = torch.arange(40) % 256
    meta = AttentionMetadata.for_packed_sequences([40])
    with torch.inference_mode():
        ref = model.compute_logits(model(ids, torch.arange(40), meta))
        ours = fresh.eval().compute_logits(fresh(ids, torch.arange(40), meta))
    assert _rel(ours, ref) < 1e-4
