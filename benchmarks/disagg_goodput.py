"""Goodput under TTFT/TPOT SLOs: one colocated server against a 1P1D deployment on the same cores.

    python benchmarks/disagg_goodput.py [--model smollm2:135m] [--rates 0.5 1 2] [--num-prompts 24]
                                        [--ttft-slo 2.0] [--tpot-slo 0.15]

DistServe's method: requests arrive as a Poisson process at a given rate (ShareGPT-like prompt and
output lengths from benchmarks/serve.py's workload, greedy, streamed); a request attains its SLO
when both its time to first token and its mean time per output token are within the limits; goodput
is the rate of requests that attain it (req/s), and SLO attainment its share. The colocated server
gets both cores; `quadrant serve --disagg 1P1D` runs a prefill and a decode worker with one core
each (OMP_NUM_THREADS=1) behind the router, as the peers' disaggregated deployments split a node.
On two cores this measures what splitting costs and buys when the two phases cannot each have a
machine; the GPU claims (DistServe 7.4x, Splitwise 1.4x) need a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import subprocess
import sys
import time
from datetime import date

import httpx

from serve import Result, free_port, one, wait_healthy, workload  # benchmarks/serve.py


def start(model: str, port: int, disagg: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "quadrant", "serve", model, "--port", str(port)]
    if disagg:
        cmd += ["--disagg", "1P1D"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", proc, "/health")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def run_rate(url: str, model: str, items: list[tuple[str, int]], rate: float, seed: int) -> list[Result]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(items))) as client:
        tasks = []
        for prompt, n in items:
            tasks.append(asyncio.create_task(one(client, url, model, prompt, n)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def score(results: list[Result], wall: float, ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in results if r.ok]
    attained = [r for r in ok if r.ttft <= ttft_slo and (r.tokens <= 1 or r.tpot <= tpot_slo)]
    ttfts = sorted(r.ttft for r in ok)
    tpots = sorted(r.tpot for r in ok if r.tokens > 1)

    def p(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"goodput": len(attained) / wall, "attainment": len(attained) / len(results), "failed": len(results) - len(ok),
            "ttft_p90": p(ttfts, 0.9), "tpot_p90": p(tpots, 0.9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="arrival rates, requests/s")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.15, help="seconds per output token")
    args = ap.parse_args()
    items = [(p, min(n, 96)) for p, n in workload(args.num_prompts)]
    rows = []
    for name, disagg in (("colocated (2 cores)", False), ("1P1D (1 core each)", True)):
        port = free_port()
        proc = start(args.model, port, disagg)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_rate(url, args.model, items[:8], 4.0, 0))  # warm-up: first shapes, thread pools
            for rate in args.rates:
                t0 = time.perf_counter()
                results = asyncio.run(run_rate(url, args.model, items, rate, 1))
                rows.append({"setup": name, "rate": rate,
                             **score(results, time.perf_counter() - t0, args.ttft_slo, args.tpot_slo)})
        finally:
            stop(proc)
    print(f"\nGoodput, {args.model}, {args.num_prompts} requests per rate, SLO TTFT <= {args.ttft_slo} s and "
          f"TPOT <= {args.tpot_slo} s ({date.today()}, {platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'setup':<22} {'rate/s':>7} {'goodput/s':>10} {'attained':>9} {'TTFT p90':>9} {'TPOT p90':>9} {'failed':>7}")
    for r in rows:
        print(f"{r['setup']:<22} {r['rate']:>7.2f} {r['goodput']:>10.2f} {r['attainment']:>9.0%} "
              f"{r['ttft_p90']:>9.2f} {r['tpot_p90']:>9.3f} {r['failed']:>7}")


if __name__ == "__main__":
    main()
