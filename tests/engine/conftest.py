"""Fixtures for engine tests: a tiny random llama saved as safetensors, prompts (two sharing a
40-token prefix) and transformers' greedy continuations of them as the reference."""

from __future__ import annotations

import pytest
import torch

from quadrant import SamplingParams
from quadrant.config import CacheConfig, SchedulerConfig
from quadrant.engine.engine import LLMEngine
from tests.tiny_models import save_tiny_llama

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def tiny_llama(tmp_path_factory, num_layers: int):
    """(folder, transformers model) of a tiny random llama with `num_layers` layers, no EOS."""
    path = tmp_path_factory.mktemp(f"tiny-llama-{num_layers}")
    model = save_tiny_llama(path, hidden_size=64, intermediate_size=128, num_layers=num_layers, max_positions=512)
    model.generation_config.eos_token_id = None
    return str(path), model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    lengths = (3, 17, 33, 8, 61)
    own = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    return [own[0], shared + own[1], own[2], shared + own[3], own[4]]  # two share a 40-token prefix


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return [hf_greedy(tiny[1], p, GREEDY.max_tokens) for p in prompts]


def run_all(engine: LLMEngine, prompts, params=GREEDY, arrivals=None) -> list[list[int]]:
    """Run prompts to completion; `arrivals[i]` is the step at which prompt i is added (default 0)."""
    arrivals = arrivals or [0] * len(prompts)
    results: dict[str, list[int]] = {}
    step = 0
    while len(results) < len(prompts):
        for i, p in enumerate(prompts):
            if arrivals[i] == step:
                engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert step < 10_000
    return [results[str(i)] for i in range(len(prompts))]


def fail_step(monkeypatch, runner, n: int) -> None:
    """Make `runner`'s n-th step (counting from 1) raise RuntimeError("boom"); the others run."""
    real, calls = runner.execute, {"n": 0}

    def execute(step):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("boom")
        return real(step)

    monkeypatch.setattr(runner, "execute", execute)


def make_engine(path, num_blocks=256, block_size=4, budget=512, prefix=True, max_num_seqs=64, cache_dtype="auto",
                quant_group=4, **options):
    """`options`: other EngineConfig fields (attention_backend, cuda_graphs, ...)."""
    return LLMEngine.from_model(path, cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                                        cache_dtype=cache_dtype, quant_group=quant_group),
                                scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                                          enable_prefix_caching=prefix), **options)


