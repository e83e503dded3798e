"""Time to first token through the 1P1D router: KV pulled layer by layer while the prompt is computed
(the router sends the prompt to both workers at once) against the decode step started after the
prefill step (`--no-kv-overlap`), on the same two workers, in one run.

    python benchmarks/disagg_overlap.py [--model smollm2:135m] [--lengths 256 1024 2048] [--repeats 4]
                                        [--weight-format dense]

One prefill and one decode worker (`quadrant serve --role ...`, one core each as a node's split would
give them) and two routers in front of both, one per mode. Every request is a new prompt of English
words (no prefix-cache hits on either worker), greedy, streamed, 8 output tokens, one at a time; the
modes alternate request by request, so a slower minute of the machine weighs on both. Reports the
median TTFT per prompt length and mode, their ratio, and how many layer ranges the prefill worker
served while their prompt was still being computed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
from datetime import date

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve import WORDS, free_port, one, wait_healthy  # benchmarks/serve.py


def start(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *args, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", proc, "/health")
    return proc


def early_reads(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "quadrant_kv_transfer" and s.labels.get("what") == "early_reads":
                return s.value
    return 0.0


def prompt(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(tokens * 0.9)))  # about one token per word, short of it


async def measure(routers: dict[str, str], model: str, lengths: list[int], repeats: int) -> dict[tuple[int, str], list]:
    rng = random.Random(0)
    out: dict[tuple[int, str], list] = {}
    async with httpx.AsyncClient() as client:
        for n in lengths:
            for i in range(repeats + 1):  # the first round warms both paths up and is not counted
                modes = list(routers) if i % 2 else list(reversed(routers))
                for mode in modes:
                    r = await one(client, routers[mode], model, prompt(rng, n), 8)
                    if not r.ok:
                        raise RuntimeError(f"a {mode} request failed")
                    if i:
                        out.setdefault((n, mode), []).append(r.ttft)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048], help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--weight-format", default=None, help="the workers' --weight-format (default: the model's)")
    args = ap.parse_args()
    extra = ["--weight-format", args.weight_format] if args.weight_format else []
    ports = {name: free_port() for name in ("prefill", "decode", "overlapped", "sequential")}
    procs = []
    try:
        procs.append(start(["quadrant", "serve", args.model, "--role", "prefill", *extra], ports["prefill"]))
        procs.append(start(["quadrant", "serve", args.model, "--role", "decode", *extra], ports["decode"]))
        workers = ["--prefill", f"http://127.0.0.1:{ports['prefill']}", "--decode", f"http://127.0.0.1:{ports['decode']}"]
        procs.append(start(["quadrant.disagg.router", *workers, "--health-interval", "0.5"], ports["overlapped"]))
        procs.append(start(["quadrant.disagg.router", *workers, "--no-kv-overlap"], ports["sequential"]))
        routers = {mode: f"http://127.0.0.1:{ports[mode]}" for mode in ("overlapped", "sequential")}
        prefill_url = f"http://127.0.0.1:{ports['prefill']}"
        before = early_reads(prefill_url)
        ttfts = asyncio.run(measure(routers, args.model, args.lengths, args.repeats))
        early = early_reads(prefill_url) - before
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    print(f"\n{date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} cores  "
          f"model {args.model}  weights {args.weight_format or 'auto'}  {args.repeats} requests per cell")
    print(f"{'prompt tokens':>13} | {'sequential TTFT (ms)':>20} | {'overlapped TTFT (ms)':>20} | {'sequential / overlapped':>23}")
    print("-" * 86)
    for n in args.lengths:
        seq = statistics.median(ttfts[(n, "sequential")]) * 1e3
        ovl = statistics.median(ttfts[(n, "overlapped")]) * 1e3
        print(f"{n:>13} | {seq:>20.1f} | {ovl:>20.1f} | {seq / ovl:>22.2f}x")
    print(f"layer ranges read while their prompt was still computed: {early:.0f}")


if __name__ == "__main__":
    main()
