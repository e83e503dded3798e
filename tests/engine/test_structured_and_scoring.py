"""Structured outputs and prompt scoring in the engine, on the default model (real weights).

Constrained outputs follow their regex or schema whether or not speculation drafts them;
the sampler's masks hold for greedy and sampled rows alike; prompt logprobs match
transformers' on the same GGUF, chunked or not, and max_tokens=0 only scores.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from quadrant import SamplingParams
from quadrant.config import SchedulerConfig, SpeculativeConfig
from quadrant.engine.engine import LLMEngine
from quadrant.engine.structured import GrammarError, StructuredOutputs, allowed_tokens
from quadrant.engine.step import WorkerRequest
from quadrant.layers.sampler import sample
from quadrant.sampling_params import StructuredOutput

transformers = pytest.importorskip("transformers")


def run(engine: LLMEngine, prompts: list, params: SamplingParams) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def engine(default_gguf_path):
    return LLMEngine.from_model(str(default_gguf_path))


def test_bitmask_unpacking_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int64, generator=g).to(torch.int32)
    got = allowed_tokens(masks, 100)
    want = torch.tensor([[(int(masks[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(100)] for r in range(3)])
    assert torch.equal(got, want)


def test_sampler_keeps_to_the_allowed_tokens():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(3, 50, dtype=torch.bool)
    allowed[0, [3, 7]] = True  # greedy row: the best of 3 and 7, whatever the argmax
    allowed[1, 10:20] = True  # sampled row
    params = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=1.5, seed=0),
              SamplingParams(temperature=0.0)]  # row 2 allows nothing: it fails
    reqs = [WorkerRequest(str(i), [1], [], p, torch.Generator().manual_seed(i), []) for i, p in enumerate(params)]
    for _ in range(20):
        tokens, records = sample(logits, reqs, None, allowed)
        assert tokens[0] == (3 if logits[0, 3] > logits[0, 7] else 7)
        assert tokens[1] is not None and 10 <= tokens[1] < 20
        assert tokens[2] is None
    # Logprobs are the model's raw distribution, not the masked one.
    assert records[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[tokens[0]].item(), abs=1e-6)


def test_regex_and_schema_outputs_are_exact_with_and_without_speculation(default_gguf_path, engine):
    prompt = "Repeat after me: ping pong ping pong ping pong ping pong ping pong"
    regex = StructuredOutput("regex", r"( ?(ping|pong)){6,12}\.")
    params = SamplingParams(max_tokens=40, temperature=0.0, structured=regex)
    plain = run(engine, [prompt], params)[0].outputs[0]
    assert re.fullmatch(r"( ?(ping|pong)){6,12}\.", plain.text), plain.text
    spec = LLMEngine.from_model(str(default_gguf_path), speculative=SpeculativeConfig("ngram", 4, draft_cost=0.0))
    drafted = run(spec, [prompt], params)[0].outputs[0]
    assert drafted.token_ids == plain.token_ids  # greedy: speculation changes nothing
    assert spec.spec_stats.num_accepted_tokens > 0  # and it did draft inside the grammar
    schema = {"type": "object", "properties": {"word": {"enum": ["ping", "pong"]}, "times": {"type": "integer",
              "minimum": 1, "maximum": 9}}, "required": ["word", "times"], "additionalProperties": False}
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=3,
                             structured=StructuredOutput("json_schema", json.dumps(schema)))
    for out in (run(engine, [prompt], sampled)[0], run(spec, [prompt], sampled)[0]):
        for c in out.outputs:
            value = json.loads(c.text)
            assert value["word"] in ("ping", "pong") and 1 <= value["times"] <= 9
    assert spec.kv.pool.num_free == spec.kv.pool.num_blocks


def test_bad_specs_are_grammar_errors(engine):
    assert engine.structured is not None
    for spec in (StructuredOutput("json_schema", "{"), StructuredOutput("json_schema", '{"type": "nope"}'),
                 StructuredOutput("regex", "(a"), StructuredOutput("choice", "[]"),
                 StructuredOutput("grammar", "root ::= undefined_rule")):
        with pytest.raises(GrammarError):
            engine.structured.compile(spec)


def test_a_refused_token_fails_only_its_request():
    # A stand-in for llguidance's matcher with the three methods accept() reads: one that refuses token 5.
    matcher = type("M", (), {"is_stopped": lambda self: False, "consume_token": lambda self, t: t != 5,
                             "get_error": lambda self: "token 5 is not allowed"})()
    assert StructuredOutputs.accept(matcher, [1, 2]) is None
    assert "token 5" in StructuredOutputs.accept(matcher, [1, 5])


@pytest.fixture(scope="module")
def hf_reference(default_gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32).eval()
    return model


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # token i + 1 scored at position i


# "dense" runs the GGUF's weights dequantised, as transformers does: the same numbers to fp32
# rounding. "auto", the CPU speed plan, keeps the embedding in bf16 and the LM head in 8 bits.
@pytest.mark.parametrize("weight_format,chunk,tolerance", [("dense", 2048, 2e-4), ("dense", 7, 2e-4),
                                                           ("auto", 2048, 0.15)],
                         ids=["dense-whole", "dense-chunked-7", "auto"])
def test_prompt_logprobs_match_transformers(default_gguf_path, hf_reference, weight_format, chunk, tolerance):
    engine = LLMEngine.from_model(str(default_gguf_path), weight_format=weight_format,
                                  scheduler=SchedulerConfig(max_num_batched_tokens=chunk))
    texts = ["The capital of France is Paris, and the capital of Italy is Rome.", "Once upon a time, there was"]
    ids = [engine.encode(t) for t in texts]
    # Prefix caching stays on: the second copy of the first prompt must still be scored in full.
    outs = run(engine, [ids[0], ids[1], ids[0]], SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0.0))
    for out, prompt in zip(outs, [ids[0], ids[1], ids[0]]):
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
        records = out.prompt_logprobs
        assert records[0] is None and len(records) == len(prompt)
        got = torch.tensor([r.logprob for r in records[1:]])
        want = hf_prompt_logprobs(hf_reference, prompt)
        assert (got - want).abs().max().item() < tolerance, (got - want).abs().max()
        assert all(len(r.top) == 2 and r.top[0][1] >= r.logprob - 1e-5 for r in records[1:])
        assert [r.token_id for r in records[1:]] == prompt[1:]
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


def hf_embedding(model, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0].float()
    pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return pooled / pooled.norm()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_match_transformers(default_gguf_path, hf_reference, pooling):
    # Chunks of 5 tokens: each prompt's pooled state is gathered over several steps, batched together.
    engine = LLMEngine.from_model(str(default_gguf_path), weight_format="dense",
                                  scheduler=SchedulerConfig(max_num_batched_tokens=5))
    texts = ["Paris is the capital of France.", "Embeddings turn text into vectors.", "hi"]
    ids = [engine.encode(t) for t in texts]
    outs = run(engine, ids, SamplingParams(max_tokens=0, pooling=pooling))
    for out, prompt in zip(outs, ids):
        got = torch.tensor(out.embedding)
        assert out.outputs[0].token_ids == [] and got.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(got, hf_embedding(hf_reference, prompt, pooling), atol=2e-5)
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
