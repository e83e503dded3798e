"""Time to first token for a model loaded on demand: quadrant serve loads `second` (the same GGUF under
another name) on its first request; the peer is llama.cpp loading the same GGUF and answering its
first token (llama-cpp-python, in process). Warm TTFT beside both.

    python benchmarks/cold_load.py [--model smollm2:135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import httpx
import torch

from quadrant.loader import store

from cpu_vs_llamacpp import LLAMA_CPP_VERSION, ensure_llama_cpp  # type: ignore[import-not-found]
from serve import free_port, wait_healthy  # type: ignore[import-not-found]

ASK = [{"role": "user", "content": "What is the capital of France?"}]


def first_token_seconds(url: str, model: str) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=600, json={
            "model": model, "messages": ASK, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def quadrant_side(model: str, repeats: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(repeats):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "quadrant", "serve", model, "--port", str(port),
                                 "--models", f"second={model}", "--no-serve-pulled"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, "/health")
            cold.append(first_token_seconds(url, "second"))
            warm.append(first_token_seconds(url, "second"))
        finally:
            proc.terminate()
            proc.wait(60)
    return statistics.median(cold), statistics.median(warm)


def llama_side(llama_cpp, path: str, threads: int, repeats: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        for _chunk in llm.create_chat_completion(ASK, max_tokens=4, temperature=0, stream=True):
            if _chunk["choices"][0]["delta"].get("content"):
                break
        cold.append(time.perf_counter() - start)
        llm.reset()
        start = time.perf_counter()
        for _chunk in llm.create_chat_completion(ASK, max_tokens=4, temperature=0, stream=True):
            if _chunk["choices"][0]["delta"].get("content"):
                break
        warm.append(time.perf_counter() - start)
        del llm
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    args = ap.parse_args()
    path = str(store.resolve(args.model, pull_missing=True))
    threads = torch.get_num_threads()
    ours = quadrant_side(args.model, args.repeats)
    peer = llama_side(ensure_llama_cpp(args.find_links), path, threads, args.repeats)
    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {threads} threads | torch "
          f"{torch.__version__} | llama-cpp-python {LLAMA_CPP_VERSION} | model {args.model} | median of {args.repeats}")
    print(f"{'time to first token, s':<40} {'quadrant':>10} {'llama.cpp':>10} {'ratio':>7}")
    for name, q, p in (("cold: model loaded on demand", ours[0], peer[0]), ("warm", ours[1], peer[1])):
        print(f"{name:<40} {q:>10.2f} {p:>10.2f} {q / p:>7.2f}")


if __name__ == "__main__":
    main()
