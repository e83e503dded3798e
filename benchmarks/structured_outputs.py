"""Structured-output overhead: batch-1 decode tokens/s with and without a JSON schema, quadrant
(llguidance masks) beside llama.cpp (its GBNF grammar from the same schema), same GGUF, same run.

    python benchmarks/structured_outputs.py [--model smollm2:135m] [--tokens 128] [--repeats 3]

llama.cpp runs through llama-cpp-python (installed on demand, as benchmarks/cpu_vs_llamacpp.py
does). The schema asks for a long array of short strings, so both engines write --tokens tokens
under the constraint; decode tokens/s is timed from the first streamed token to the last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

from quadrant import SamplingParams
from quadrant.engine.engine import LLMEngine
from quadrant.loader import store
from quadrant.sampling_params import StructuredOutput

from cpu_vs_llamacpp import LLAMA_CPP_VERSION, ensure_llama_cpp  # type: ignore[import-not-found]

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 60}
MESSAGES = [{"role": "user", "content": "List sixty city names as a JSON array of strings."}]


def quadrant_rate(engine: LLMEngine, tokens: int, constrained: bool) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=not constrained,
                            structured=StructuredOutput("json_schema", json.dumps(SCHEMA)) if constrained else None)
    stamps = []
    for out in engine.stream(engine.chat_prompt(MESSAGES), params):
        stamps += [time.perf_counter()] * len(out.outputs[0].token_ids_delta)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def llama_rate(llm, grammar, tokens: int) -> float:
    stamps = []
    for chunk in llm.create_chat_completion(MESSAGES, max_tokens=tokens, temperature=0.0, top_k=1, stream=True,
                                            grammar=grammar):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    args = ap.parse_args()
    path = str(store.resolve(args.model, pull_missing=True))
    threads = torch.get_num_threads()

    engine = LLMEngine.from_model(path)
    engine.compile_decode([1])  # batch-1 decode runs compiled, as in `quadrant serve`
    quadrant_rate(engine, 16, True)  # warm-up: compiles the grammar once (it is cached afterwards)
    ours = {c: statistics.median(quadrant_rate(engine, args.tokens, c) for _ in range(args.repeats))
            for c in (False, True)}
    del engine

    llama_cpp = ensure_llama_cpp(args.find_links)
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    peer = {c: statistics.median(llama_rate(llm, grammar if c else None, args.tokens) for _ in range(args.repeats))
            for c in (False, True)}

    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {threads} threads | torch "
          f"{torch.__version__} | llama-cpp-python {LLAMA_CPP_VERSION} | model {args.model} | "
          f"{args.tokens} tokens, median of {args.repeats}")
    print(f"{'decode tok/s, batch 1':<34} {'quadrant':>10} {'llama.cpp':>10} {'ratio':>7}")
    for name, c in (("free text", False), ("JSON schema", True)):
        print(f"{name:<34} {ours[c]:>10.2f} {peer[c]:>10.2f} {ours[c] / peer[c]:>7.2f}")
    print(f"{'schema / free (overhead)':<34} {ours[True] / ours[False]:>10.2f} {peer[True] / peer[False]:>10.2f}")


if __name__ == "__main__":
    main()
