"""`quadrant serve --speculative-method ngram` through the official openai client: streamed and whole
answers identical to plain greedy decoding, usage counting every token once, acceptance in /metrics.

Dense fp32 weights on both sides: torch's CPU int4 kernel rounds differently with the number of
rows it multiplies, so the quantised default plan is not bit-identical between a one-token step
and a verifying row (or a prefix-cache hit's shorter prefill), and near-ties could flip."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

from quadrant import SamplingParams  # noqa: E402
from quadrant.engine.engine import LLM  # noqa: E402

from tests.serve.conftest import start_server  # noqa: E402

ITEMS = "apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine"
PROMPT = f"The list: {ITEMS}. The same list again: apple, banana, cherry,"


@pytest.fixture(scope="module")
def spec_server(default_gguf_path, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("spec-serve"), "--speculative-method", "ngram",
                     "--num-speculative-tokens", "4", "--weight-format", "dense")
    yield s
    assert s.stop() == 0, s.log()


def test_speculative_server_answers_as_plain_decoding(spec_server, default_gguf_path):
    plain = LLM(str(default_gguf_path), weight_format="dense").generate(PROMPT, SamplingParams(max_tokens=40, temperature=0.0),
                                                 use_tqdm=False)[0].outputs[0]
    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="none")
    whole = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=40, temperature=0.0)
    assert whole.choices[0].text == plain.text
    assert whole.usage.completion_tokens == len(plain.token_ids)
    stream = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=40, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})
    chunks, usage = [], None
    for event in stream:
        if event.choices:
            chunks.append(event.choices[0].text)
        if event.usage is not None:
            usage = event.usage
    assert "".join(chunks) == plain.text
    assert usage is not None and usage.completion_tokens == len(plain.token_ids)
    metrics = httpx.get(spec_server.url + "/metrics").text
    length = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("quadrant_spec_decode_acceptance_length "))
    accepted = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('quadrant_spec_decode_tokens{what="accepted_tokens"}'))
    assert length > 1.5 and accepted >= 10
