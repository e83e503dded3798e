"""quadrant against llama.cpp on the CPU, same GGUF, same threads, side by side in one run.

    python benchmarks/cpu_vs_llamacpp.py [--model smollm2:135m] [--find-links DIR]

llama.cpp runs through llama-cpp-python, installed here on demand (it is never
a runtime or CI dependency; from source it builds in about 8 minutes on 2
cores, or `--find-links` points pip at a prebuilt wheel). quadrant is measured
first, so its peak resident memory is its own. Prints one table with the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

from quadrant.benchmark import run_benchmark, synthetic_prompt
from quadrant.loader import store

LLAMA_CPP_VERSION = "0.3.36"


def ensure_llama_cpp(find_links: str | None):
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
        if find_links:
            cmd += ["--find-links", find_links]
        print("installing llama-cpp-python (a source build takes ~8 minutes)...", file=sys.stderr)
        subprocess.run(cmd, check=True)
        return importlib.import_module("llama_cpp")


def bench_llama_cpp(llama_cpp, path: str, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    vocab = llm.n_vocab()
    llm.eval(synthetic_prompt(8, vocab, seed=99))
    llm.sample(top_k=1)
    load_to_first = time.perf_counter() - start

    llm.reset()
    t = time.perf_counter()
    llm.eval(synthetic_prompt(prompt_tokens, vocab, seed=1))
    prompt_tps = prompt_tokens / (time.perf_counter() - t)

    rates = []
    for r in range(repeats):
        llm.reset()
        llm.eval(synthetic_prompt(16, vocab, seed=2 + r))
        t = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([llm.sample(top_k=1)])  # greedy, one token per step, as quadrant's batch-1 decode
        rates.append(decode_tokens / (time.perf_counter() - t))
    return {"load": load_to_first, "prompt": prompt_tps, "decode": statistics.median(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per engine; the median counts")
    args = ap.parse_args()

    path = str(store.resolve(args.model, pull_missing=True))
    threads = torch.get_num_threads()
    ours = [run_benchmark(args.model, args.prompt_tokens, args.decode_tokens, args.concurrency, progress=False)
            for _ in range(args.repeats)]
    q = {
        "load": statistics.median(r.load_to_first_token_s for r in ours),
        "prompt": statistics.median(r.prompt_tokens_per_s for r in ours),
        "decode": statistics.median(r.decode_tokens_per_s for r in ours),
        "concurrent": statistics.median(r.concurrent_tokens_per_s for r in ours),
        "rss": ours[0].peak_rss_gib,  # later runs share the process, so only the first is quadrant's own
    }
    peer = bench_llama_cpp(ensure_llama_cpp(args.find_links), path, threads, args.prompt_tokens,
                           args.decode_tokens, args.repeats)

    rows = [
        ("decode tok/s, batch 1", q["decode"], peer["decode"], "ratio >= 0.5"),
        (f"prompt tok/s, {args.prompt_tokens}-token prompt", q["prompt"], peer["prompt"], "ratio >= 0.5"),
        (f"decode tok/s, {args.concurrency} concurrent (aggregate) vs llama.cpp batch 1", q["concurrent"],
         peer["decode"], "ratio >= 2"),
        ("load to first token, s", q["load"], peer["load"], "ours < 5 s"),
        ("peak resident memory, GiB (quadrant)", q["rss"], float("nan"), "ours < 1.5"),
    ]
    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {threads} threads | torch {torch.__version__}"
          f" | llama-cpp-python {LLAMA_CPP_VERSION} | model {args.model} | median of {args.repeats}")
    print(f"{'workload':<72} {'quadrant':>10} {'llama.cpp':>10} {'ratio':>7}  goal")
    for name, ours_v, peer_v, goal in rows:
        ratio = ours_v / peer_v if peer_v == peer_v and peer_v else float("nan")
        print(f"{name:<72} {ours_v:>10.2f} {peer_v:>10.2f} {ratio:>7.2f}  {goal}")


if __name__ == "__main__":
    main()
