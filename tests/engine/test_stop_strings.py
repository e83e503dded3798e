"""Stop strings on the default model's real tokenizer: matched across token boundaries, never emitted,
and streamed deltas that add up to the final text."""

from __future__ import annotations

import pytest

from quadrant import SamplingParams
from quadrant.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def engine(default_gguf_path):
    return LLMEngine.from_model(str(default_gguf_path))


def run(engine, prompt_ids, params):
    engine.add_request(prompt_ids, params, request_id="q")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def test_stop_string_across_token_boundary(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "Write two sentences about the sea."}])
    base = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0))[-1].outputs[0]
    tok = engine.tokenizer
    # Find a token boundary in the middle of the text and make a stop string straddling it.
    pieces = [tok.decode(base.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(base.token_ids))]
    boundary = next(len(pieces[i]) for i in range(8, len(pieces)) if len(pieces[i]) >= 20 and pieces[i][-1].isalpha()
                    and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = base.text[boundary - 2 : boundary + 2]
    assert base.text.find(stop) >= 0
    outs = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=["@@never@@", stop]))
    final = outs[-1].outputs[0]
    assert final.text == base.text[: base.text.find(stop)]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    streamed = "".join(o.outputs[0].text_delta for o in outs)
    assert streamed == final.text and stop not in streamed
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_eos_ends_with_stop_and_no_special_text(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    final = run(engine, prompt, SamplingParams(max_tokens=64, temperature=0.0))[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason in engine.eos_token_ids
    assert "Paris" in final.text and "<|im_end|>" not in final.text
