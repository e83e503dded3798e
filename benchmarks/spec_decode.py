"""Speculative decoding at batch 1 on the CPU: quadrant plain and with each proposer, against
llama.cpp plain and with its own prompt-lookup decoding, same GGUF, same threads, one run.

    python benchmarks/spec_decode.py [--model smollm2:135m] [--max-tokens 128] [--repeats 3]
                                     [--draft-layers 10] [--eagle-head DIR] [--find-links DIR]
                                     [--methods ngram ngram-tree draft eagle eagle-tree] [--tree-branches 3]

Three chat workloads: copy/edit (rewrite a passage with one name changed), code (rename a
variable in a function and explain it) and open chat (a question with no text to copy). Each
engine answers greedily; decode tokens/s is (tokens - 1) / (total time - time to the first token),
the time to the first token measured by the same call with one token (so prompt speed, where
quadrant already leads, does not flatter the figure). llama.cpp runs through llama-cpp-python
(installed on demand, never a dependency; `--find-links` points pip at a prebuilt wheel), with
`LlamaPromptLookupDecoding` at num_pred_tokens 2 (its documented CPU setting) and 10 (its default).
Prints tokens/s, acceptance length and the ratios to plain quadrant and to llama.cpp.

ngram-tree drafts token trees of up to `--tree-branches` continuations in the same k tokens, verified
through the compiled decode graphs like chains (each node a masked decode row). On two cores an extra
row costs a quarter to half a step, so the branches only fill rows a graph pads anyway: its
acceptance length against ngram's, more than its speed, is the figure that carries over to a GPU.
eagle-tree: the EAGLE head grows trees (EAGLE-2), `--tree-branches` nodes expanded per depth, the same
way bounded by the padded rows on CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_llamacpp import LLAMA_CPP_VERSION, ensure_llama_cpp  # noqa: E402

from quadrant import SamplingParams  # noqa: E402
from quadrant.engine.engine import LLM  # noqa: E402
from quadrant.loader import store  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"

CODE = '''def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    result: list[int] = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result
'''


def workloads() -> dict[str, list[dict[str, str]]]:
    alice = (DATA / "alice_ch1-2.txt").read_text()
    passage = alice[alice.index("Alice was beginning"):][:700]
    return {
        "copy/edit": [{"role": "user", "content": "Rewrite this passage with 'Alice' replaced by 'Ada', changing "
                                                  f"nothing else:\n\n{passage}"}],
        "code": [{"role": "user", "content": f"Here is a Python function:\n\n```python\n{CODE}```\n\nRewrite it with "
                                             "the variable `result` renamed to `merged`, and explain it."}],
        "open chat": [{"role": "user", "content": "What are three good habits for staying healthy? Answer in a few "
                                                  "sentences."}],
    }


@dataclass
class Result:
    tokens: int
    decode_tps: float
    acceptance_length: float | None = None  # quadrant with speculation


Generate = Callable[[list[dict[str, str]], int], int]  # (conversation, max tokens) -> tokens answered


def quadrant_engine(model: str, **options) -> tuple[Generate, Callable[[], float | None], Callable[[], None]]:
    """(generate, acceptance length since the last reset, reset) for one quadrant configuration."""
    llm = LLM(model, **options)
    # CPU: time compiled steps, not the background compile; verification steps of 1 + k tokens run
    # through the graphs of up to 1 + k rows.
    llm.engine.compile_decode(list(range(1, 2 + options.get("num_speculative_tokens", 0))))

    def generate(conversation: list[dict[str, str]], n: int) -> int:
        return len(llm.chat(conversation, SamplingParams(max_tokens=n, temperature=0.0),
                            use_tqdm=False)[0].outputs[0].token_ids)

    def length() -> float | None:
        return llm.engine.spec_stats.acceptance_length if llm.engine.proposer is not None else None

    def reset() -> None:
        llm.engine.spec_stats.__init__()  # type: ignore[misc]

    return generate, length, reset


def llama_cpp_engine(llama_cpp, path: str, lookup: int | None) -> Generate:
    threads = torch.get_num_threads()
    draft = None
    if lookup is not None:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
    llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          draft_model=draft, verbose=False)

    def generate(conversation: list[dict[str, str]], n: int) -> int:
        llm.reset()  # no prompt cache between calls: each one prefills, as quadrant's does
        answer = llm.create_chat_completion(conversation, max_tokens=n, temperature=0.0, top_k=1)
        return int(answer["usage"]["completion_tokens"])

    return generate


def interleaved(engines: dict[str, Generate], lengths: dict[str, Callable[[], float | None]],
                resets: dict[str, Callable[[], None]], messages: dict, max_tokens: int,
                repeats: int) -> dict[str, dict[str, Result]]:
    """Each workload's repeats go round the engines in turn (this VM's speed drifts by a third
    between minutes, so engines timed one after another would compare different machines).
    Decode tokens/s = (tokens - 1) / (time - time to the first token); the median counts."""
    out: dict[str, dict[str, Result]] = {name: {} for name in engines}
    for workload, conversation in messages.items():
        rates: dict[str, list[float]] = {name: [] for name in engines}
        counts: dict[str, int] = {}
        for name, generate in engines.items():
            generate(conversation, 1)  # warm-up
            if name in resets:
                resets[name]()  # count this workload's verifications only
        for _ in range(repeats):
            for name, generate in engines.items():
                t = time.perf_counter()
                generate(conversation, 1)
                first = time.perf_counter() - t
                t = time.perf_counter()
                counts[name] = generate(conversation, max_tokens)
                total = time.perf_counter() - t
                rates[name].append((counts[name] - 1) / max(total - first, 1e-9))
        for name in engines:
            length = lengths[name]() if name in lengths else None
            out[name][workload] = Result(counts[name], statistics.median(rates[name]), length)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs per workload; the median counts")
    ap.add_argument("--num-speculative-tokens", type=int, default=7,
                    help="the longest chain; 7 fills the 8-row compiled CPU graph")
    ap.add_argument("--draft-layers", type=int, default=10, help="the draft: the target's first N layers")
    ap.add_argument("--eagle-head", default=None,
                    help="an EAGLE head folder (`quadrant train --eagle MODEL -o DIR`): adds quadrant eagle")
    ap.add_argument("--methods", nargs="+", default=["ngram", "draft", "eagle"],
                    choices=["ngram", "ngram-tree", "draft", "eagle", "eagle-tree"],
                    help="proposers to run beside plain decoding (eagle and eagle-tree need --eagle-head)")
    ap.add_argument("--tree-branches", type=int, default=3,
                    help="ngram-tree: continuations per draft tree; eagle-tree: nodes expanded per depth")
    ap.add_argument("--draft-cost", type=float, default=None,
                    help="a verifying token's cost in one-token steps for every proposer (0: always draft k, "
                         "to compare acceptance lengths as a GPU would see them); default: measured")
    ap.add_argument("--skip-peer", action="store_true", help="quadrant only (no llama-cpp-python)")
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    args = ap.parse_args()

    path = str(store.resolve(args.model, pull_missing=True))
    messages = workloads()
    k = args.num_speculative_tokens
    configs = {
        "plain": ("quadrant plain", {}),
        "ngram": (f"quadrant ngram k={k}", {"speculative_method": "ngram", "num_speculative_tokens": k}),
        "ngram-tree": (f"quadrant ngram tree({args.tree_branches}) k={k}",
                       {"speculative_method": "ngram", "num_speculative_tokens": k,
                        "speculative_tree_branches": args.tree_branches}),
        "draft": (f"quadrant draft ({args.draft_layers} layers) k={k}",
                  {"speculative_method": "draft", "num_speculative_tokens": k,
                   "speculative_draft_layers": args.draft_layers}),
        "eagle": (f"quadrant eagle k={k}", {"speculative_method": "eagle", "num_speculative_tokens": k,
                                            "speculative_model": args.eagle_head}),
        "eagle-tree": (f"quadrant eagle tree({args.tree_branches}) k={k}",
                       {"speculative_method": "eagle", "num_speculative_tokens": k,
                        "speculative_model": args.eagle_head, "speculative_tree_branches": args.tree_branches}),
    }
    if args.draft_cost is not None:
        for m, (_, options) in configs.items():
            if m != "plain":
                options["speculative_draft_cost"] = args.draft_cost
    methods = [m for m in args.methods if not m.startswith("eagle") or args.eagle_head]
    engines: dict[str, Generate] = {}
    lengths: dict[str, Callable[[], float | None]] = {}
    resets: dict[str, Callable[[], None]] = {}
    for m in ["plain", *[m for m in methods if m != "plain"]]:
        name, options = configs[m]
        engines[name], length, resets[name] = quadrant_engine(path, **options)
        if m != "plain":
            lengths[name] = length
    if not args.skip_peer:
        llama_cpp = ensure_llama_cpp(args.find_links)
        engines["llama.cpp plain"] = llama_cpp_engine(llama_cpp, path, None)
        for n in (2, 10):
            engines[f"llama.cpp prompt lookup n={n}"] = llama_cpp_engine(llama_cpp, path, n)
    results = interleaved(engines, lengths, resets, messages, args.max_tokens, args.repeats)
    ours = {name: r for name, r in results.items() if name.startswith("quadrant")}
    peers = {name: r for name, r in results.items() if name.startswith("llama.cpp")}
    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | llama-cpp-python {LLAMA_CPP_VERSION} | model {args.model} | batch 1, "
          f"greedy, up to {args.max_tokens} tokens | median of {args.repeats}")
    print(f"{'engine':<36} {'workload':<10} {'tokens':>6} {'decode tok/s':>12} {'acc len':>7} "
          f"{'x plain':>7} {'x llama.cpp':>11} {'x best lookup':>13}")
    plain = ours["quadrant plain"]
    for engine, rows in {**ours, **peers}.items():
        for name, r in rows.items():
            peer = peers.get("llama.cpp plain", {}).get(name)
            lookups = [p[name].decode_tps for e, p in peers.items() if "lookup" in e]
            to_peer = f"{r.decode_tps / peer.decode_tps:.2f}" if peer else "-"  # "-": no peer ran (--skip-peer)
            to_lookup = f"{r.decode_tps / max(lookups):.2f}" if lookups else "-"
            print(f"{engine:<36} {name:<10} {r.tokens:>6} {r.decode_tps:>12.1f} "
                  f"{(f'{r.acceptance_length:.2f}' if r.acceptance_length else '-'):>7} "
                  f"{r.decode_tps / plain[name].decode_tps:>7.2f} {to_peer:>11} {to_lookup:>13}")


if __name__ == "__main__":
    main()
