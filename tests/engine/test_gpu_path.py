"""The GPU path's engine pieces, on the GPU when there is one, else on CPU (kernels under the
interpreter): the triton attention backend, decode steps through the static, padded CUDA-graph buffers, the 8-bit KV cache
and --load-format dummy. Greedy tokens are checked against transformers as in test_engine."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant import SamplingParams  # noqa: E402
from quadrant.engine.engine import LLMEngine  # noqa: E402
from quadrant.loader.source import shipped_configs  # noqa: E402

from tests.engine.conftest import GREEDY, run_all  # noqa: E402
from tests.engine.conftest import make_engine as make_cpu_engine  # noqa: E402
from tests.kernel_device import KERNEL_DEVICE  # noqa: E402


def make_engine(path, **options):  # type: ignore[no-untyped-def]
    """The engine on the device the Triton kernels run on (a GPU compiles them, a CPU interprets them)."""
    return make_cpu_engine(path, device=KERNEL_DEVICE, **options)


@pytest.mark.parametrize("regime", ["graphs", "eager", "small-budget", "overlapped"])
def test_triton_backend_matches_transformers(tiny, prompts, reference, regime):
    path, _ = tiny
    if regime == "graphs":  # decode steps through DecodeGraphs' padded buffers (5 running -> size 8)
        engine = make_engine(path, attention_backend="triton")
        assert engine.runner.graphs is not None and engine.runner.graphs.sizes[:4] == [1, 2, 4, 8]
    elif regime == "eager":
        engine = make_engine(path, attention_backend="triton", cuda_graphs=False)
        assert engine.runner.graphs is None
    elif regime == "overlapped":  # steps on the compute thread; on a GPU a bare "cuda" device (an H100 found
        # the thread setting no current device: set_device refuses a device without an index)
        engine = make_engine(path, attention_backend="triton", async_scheduling=True)
    else:  # many prefill chunks over a cached prefix, decodes mixed in, preemption by a small pool
        engine = make_engine(path, num_blocks=40, budget=7, attention_backend="triton")
    assert run_all(engine, prompts) == reference
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
    assert (engine.num_overlapped_steps > 0) == (regime == "overlapped")


def _next_token_logprobs(engine: LLMEngine, prompts: list[list[int]]) -> list[dict[int, float]]:
    """For each prompt: {token: logprob} of the 5 likeliest next tokens (a prefill, then one decode)."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=5)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    done = {}
    while len(done) < len(prompts):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].logprobs
    return [dict(rec.top) for i in range(len(prompts)) for rec in done[str(i)]]


@pytest.mark.parametrize("cache_dtype,backend", [("int8", "torch"), ("int8", "triton"), ("fp8", "triton")])
def test_8bit_kv_cache_tracks_the_full_precision_cache(tiny, prompts, reference, cache_dtype, backend):
    """Teacher-forced on transformers' greedy continuations (prefixes of 0, 9 and 18 of its tokens,
    each then decoding one step over the cached context): the 8-bit cache (groups of 4 tokens)
    keeps the top-1 token in at least 90% of positions, and the top-1 logprob moves by under
    0.05 nats on average for int8, 0.15 for fp8 (3 mantissa bits)."""
    path, _ = tiny
    forced = [p + ref[:k] for p, ref in zip(prompts, reference) for k in (0, 9, 18)]
    engine = make_engine(path, cache_dtype=cache_dtype, attention_backend=backend, cuda_graphs=False)
    assert engine.runner.kv_caches[0].k.dtype == (torch.int8 if cache_dtype == "int8" else torch.float8_e4m3fn)
    quant = _next_token_logprobs(engine, forced)
    full = _next_token_logprobs(make_engine(path), forced)
    same = [max(f, key=f.get) == max(q, key=q.get) for f, q in zip(full, quant)]
    assert sum(same) >= 0.9 * len(same)
    shift = [abs(max(f.values()) - max(q.values())) for f, q in zip(full, quant)]
    assert sum(shift) / len(shift) < (0.05 if cache_dtype == "int8" else 0.15), shift


def test_8bit_cache_memory_is_about_half_of_bf16(tiny):
    from quadrant.config import CacheConfig, ModelConfig

    cfg = ModelConfig.from_hf_config(json.loads(open(f"{tiny[0]}/config.json").read()))
    bf16 = CacheConfig(block_size=16).bytes_per_block(cfg, torch.bfloat16)
    int8 = CacheConfig(block_size=16, cache_dtype="int8", quant_group=16).bytes_per_block(cfg, torch.bfloat16)
    # head_dim 16: 16 bytes of codes + 4/16 bytes of scale per token and head, against 32 bytes.
    assert int8 / bf16 == pytest.approx((16 + 4 / 16) / 32)


def test_bad_kv_quant_group_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="kv quant group"):
        make_engine(tiny[0], cache_dtype="int8", quant_group=3)


def test_dummy_load_runs_a_shipped_architecture_and_a_config_file(tiny, tmp_path):
    assert {"llama-3-8b", "smollm2-135m"} <= set(shipped_configs())
    engine = LLMEngine.from_model(f"{tiny[0]}/config.json", load_format="dummy")
    assert engine.tokenizer is None
    out = list(engine.stream([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    assert len(out[-1].outputs[0].token_ids) == 4
    with pytest.raises(Exception, match="not a shipped architecture"):
        LLMEngine.from_model("no-such-arch", load_format="dummy")
