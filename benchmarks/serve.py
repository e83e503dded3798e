"""Serving benchmark: `quadrant serve` against llama.cpp's OpenAI server, same GGUF, one run.

    python benchmarks/serve.py [--model smollm2:135m] [--concurrency 1 4 16] [--num-prompts 48]
                               [--find-links DIR]

Both servers run as subprocesses on 127.0.0.1 with the same threads. The
workload is ShareGPT-like: prompt and output lengths drawn from fixed-seed
log-normal distributions, prompts made of English words, greedy decoding,
requests streamed, at most `concurrency` in flight. llama.cpp's server comes
from llama-cpp-python[server], installed here on demand (never a runtime or CI
dependency). Reports output throughput, TTFT and TPOT (p50, p99), failures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import torch

from quadrant.loader import store

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain city story music garden history science "
         "language ocean forest window kitchen teacher market letter animal energy question answer").split()


@dataclass
class Result:
    ttft: float
    tpot: float
    tokens: int
    ok: bool


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt_words = int(min(400, max(12, rng.lognormvariate(4.0, 0.8))))
        out_tokens = int(min(200, max(16, rng.lognormvariate(4.2, 0.6))))
        text = "Summarise and continue: " + " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        items.append((text, out_tokens))
    return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


# Server name -> the `quadrant serve` flags it adds (llama.cpp: its own server).
SERVERS = {"quadrant": [], "quadrant-ngram": ["--speculative-method", "ngram"], "llama.cpp": []}


def start_quadrant(model: str, port: int, extra: list[str] = ()) -> subprocess.Popen:  # type: ignore[assignment]
    proc = subprocess.Popen([sys.executable, "-m", "quadrant", "serve", model, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", proc, "/health")
    return proc


def start_llama_cpp(path: str, port: int, threads: int, find_links: str | None) -> subprocess.Popen:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        cmd = [sys.executable, "-m", "pip", "install", "llama-cpp-python[server]==0.3.36"]
        if find_links:
            cmd += ["--find-links", find_links]
        subprocess.run(cmd, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", "4096",
                             # by default a new request interrupts the running one; queue them instead
                             "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", proc, "/v1/models")
    return proc


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    # Usage, where the server sends it, counts tokens exactly (a speculative step streams several per chunk).
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage = None
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return Result(0, 0, 0, False)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    tokens += 1
                    first = first or time.perf_counter()
    except httpx.HTTPError:
        return Result(0, 0, 0, False)
    end = time.perf_counter()
    tokens = usage or tokens
    if first is None:
        return Result(end - start, 0, 0, True)
    return Result(first - start, (end - first) / max(1, tokens - 1), tokens, True)


async def run_level(url: str, model: str, items: list[tuple[str, int]], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(client, prompt, n):
        async with sem:
            return await one(client, url, model, prompt, n)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(client, p, n) for p, n in items))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "throughput": sum(r.tokens for r in ok) / wall,
        "ttft_p50": pct([r.ttft for r in ok], 0.5), "ttft_p99": pct([r.ttft for r in ok], 0.99),
        "tpot_p50": pct([r.tpot for r in ok if r.tokens > 1], 0.5),
        "tpot_p99": pct([r.tpot for r in ok if r.tokens > 1], 0.99),
        "failed": len(results) - len(ok),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    ap.add_argument("--servers", nargs="+", choices=sorted(SERVERS), default=["quadrant", "llama.cpp"],
                    help="quadrant-ngram: quadrant with n-gram speculative decoding")
    args = ap.parse_args()
    path = str(store.resolve(args.model, pull_missing=True))
    threads = torch.get_num_threads()
    items = workload(args.num_prompts)
    table = {}
    for name in args.servers:
        port = free_port()
        proc = (start_quadrant(args.model, port, SERVERS[name]) if name != "llama.cpp"
                else start_llama_cpp(path, port, threads, args.find_links))
        try:
            model = path if name == "llama.cpp" else args.model
            asyncio.run(run_level(f"http://127.0.0.1:{port}", model, items[:4], 2))  # warm-up
            for c in args.concurrency:
                table[(name, c)] = asyncio.run(run_level(f"http://127.0.0.1:{port}", model, items, c))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"\n{time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores, {threads} threads | {args.model} | "
          f"{args.num_prompts} prompts, ShareGPT-like lengths (seed 0), greedy, streamed")
    print(f"{'server':<14} {'conc':>4} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} {'failed':>6}")
    for (name, c), r in table.items():
        print(f"{name:<14} {c:>4} {r['throughput']:>10.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s "
              f"{r['tpot_p50'] * 1000:>7.0f}ms {r['tpot_p99'] * 1000:>7.0f}ms {r['failed']:>6}")
    peer = "llama.cpp" if "llama.cpp" in args.servers else "quadrant"
    for name in args.servers:
        if name == peer:
            continue
        for c in args.concurrency:
            q, l = table[(name, c)], table[(peer, c)]
            print(f"{name} vs {peer}, concurrency {c}: throughput ratio {q['throughput'] / l['throughput']:.2f}, "
                  f"p99 TTFT ratio {q['ttft_p99'] / l['ttft_p99']:.2f}")


if __name__ == "__main__":
    main()
