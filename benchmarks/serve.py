"""Serving benchmark: `quadrant serve` against llama.cpp's servers, same GGUF, one run.

    python benchmarks/serve.py [--model smollm2:135m] [--concurrency 1 4 16 64] [--num-prompts 48]
                               [--servers quadrant llama-server llama.cpp] [--llama-server PATH]
                               [--find-links DIR]

Every server runs as a subprocess on 127.0.0.1 with the same threads. The
workload is ShareGPT-like: prompt and output lengths drawn from fixed-seed
log-normal distributions, prompts made of English words, greedy decoding,
requests streamed, at most `concurrency` in flight. The peers:
- `llama-server`: llama.cpp's own C++ server (what Ollama and most users run),
  started per concurrency level with `--parallel` equal to it (continuous
  batching, 2,048 context tokens per slot). Built once from the llama.cpp sources
  in the llama-cpp-python sdist by `benchmarks/build_llama_server.sh` and cached
  outside the repository, or taken from `--llama-server PATH`.
- `llama.cpp`: llama-cpp-python's Python server (one request at a time), from
  llama-cpp-python[server] installed here on demand.
Neither is a runtime or CI dependency. Reports output throughput, TTFT and TPOT
(p50, p99) and failed requests, and each quadrant row's ratio to llama-server's.
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
    try:
        _wait_healthy(url, proc, path)
    except BaseException:
        proc.kill()  # a server that never came up must not outlive the benchmark
        raise


def _wait_healthy(url: str, proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 1200  # quadrant compiles its CPU decode graphs first (minutes when cold)
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
SERVERS = {"quadrant": [], "quadrant-ngram": ["--speculative-method", "ngram"],
           "quadrant-overlap": ["--async-scheduling"], "llama.cpp": [], "llama-server": []}
PEERS = ("llama-server", "llama.cpp")
SLOT_CONTEXT = 2048  # llama-server's context per parallel slot: the longest prompt plus output fits


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


def llama_server_binary(given: str | None) -> str:
    if given:
        return given
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_llama_server.sh")
    print("llama-server: building it once from the llama-cpp-python sdist (cached; minutes the first time)")
    return subprocess.run(["bash", script], check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]


def start_llama_server(binary: str, path: str, port: int, threads: int, parallel: int) -> subprocess.Popen:
    proc = subprocess.Popen([binary, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-tb", str(threads), "--parallel", str(parallel), "-c", str(SLOT_CONTEXT * parallel),
                             "--cont-batching"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", proc, "/health")
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

    # A new connection per request: llama-server (cpp-httplib) closes a kept-alive connection after
    # five requests, and a request sent on it meanwhile fails (7 of 48 at concurrency 1).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
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
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--find-links", default=None, help="folder with a prebuilt llama-cpp-python wheel")
    ap.add_argument("--servers", nargs="+", choices=sorted(SERVERS), default=["quadrant", "llama-server", "llama.cpp"],
                    help="quadrant-ngram: quadrant with n-gram speculative decoding; quadrant-overlap: with "
                         "overlapped scheduling (--async-scheduling)")
    ap.add_argument("--llama-server", default=None, help="a llama-server binary (default: build it once)")
    args = ap.parse_args()
    path = str(store.resolve(args.model, pull_missing=True))
    threads = torch.get_num_threads()
    items = workload(args.num_prompts)
    binary = llama_server_binary(args.llama_server) if "llama-server" in args.servers else ""
    table = {}

    def measure(name: str, proc: subprocess.Popen, port: int, levels: list[int]) -> None:
        try:
            model = path if name in PEERS else args.model
            for c in levels:
                # Warm-up at this level's batch sizes: quadrant compiles a CPU decode graph the first
                # time a batch size needs it (seconds from inductor's cache), llama-server nothing.
                for _ in range(2):
                    asyncio.run(run_level(f"http://127.0.0.1:{port}", model, items[:max(2, min(c, 16))], c))
                table[(name, c)] = asyncio.run(run_level(f"http://127.0.0.1:{port}", model, items, c))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    for name in args.servers:
        if name == "llama-server":  # its slots are fixed at start: one server per level
            for c in args.concurrency:
                port = free_port()
                measure(name, start_llama_server(binary, path, port, threads, c), port, [c])
            continue
        port = free_port()
        proc = (start_llama_cpp(path, port, threads, args.find_links) if name == "llama.cpp"
                else start_quadrant(args.model, port, SERVERS[name]))
        measure(name, proc, port, args.concurrency)
    print(f"\n{time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores, {threads} threads | {args.model} | "
          f"{args.num_prompts} prompts, ShareGPT-like lengths (seed 0), greedy, streamed")
    print(f"{'server':<14} {'conc':>4} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} {'failed':>6}")
    for (name, c), r in table.items():
        print(f"{name:<14} {c:>4} {r['throughput']:>10.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s "
              f"{r['tpot_p50'] * 1000:>7.0f}ms {r['tpot_p99'] * 1000:>7.0f}ms {r['failed']:>6}")
    peer = next((p for p in PEERS if p in args.servers), "quadrant")
    for name in args.servers:
        if name == peer or name in PEERS:
            continue
        for c in args.concurrency:
            q, l = table[(name, c)], table[(peer, c)]
            print(f"{name} vs {peer}, concurrency {c}: throughput ratio {q['throughput'] / l['throughput']:.2f}, "
                  f"p99 TTFT ratio {q['ttft_p99'] / l['ttft_p99']:.2f}")


if __name__ == "__main__":
    main()
