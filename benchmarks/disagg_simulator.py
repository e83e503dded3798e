"""A discrete-event simulator of prefill/decode disaggregation: goodput of colocated and xPyD deployments.

    python benchmarks/disagg_simulator.py [--gpu] [--check] [--measure] [--num-requests 12000]

DistServe's method: Poisson arrivals, each request a prompt and an output length; an instance runs steps
whose time is linear in the work in them (StepCost); colocated instances mix prompt chunks and decode rows
in one step under a token budget (or run whole prompts in steps that pause decoding: DistServe's vLLM
baseline); xPyD runs prompts on x prefill instances and moves each prompt's KV (bytes / bandwidth +
latency, one transfer at a time into a decode instance) to one of y decode instances. Goodput: the highest
rate at which 90% of requests meet both the TTFT and the TPOT SLO, per GPU (per core on CPU).

CPU check, 2026-12-05 (default table; `--check` recounts the tokens with the engine, `--measure` re-times
the steps): quadrant's engine.step() timed alone on 1 and 2 threads is two linear regimes (steps of up to
16 tokens run the Q4 weights, larger ones bf16 GEMMs at twice the cost per token here: quadrant's
SMALL_BATCH_TOKENS is too low for this CPU), held against benchmarks/disagg_goodput.py (MEASURED_CHECK).
Where prompts dominate (rate 0.5, cold prefix cache) the prediction is close: TTFT p90 2.74 s against 2.70
measured colocated, 8.0 against 8.7 for 1P1D, same attainment for 1P1D (46%), 79% against 67% colocated.
At rates 1 and 2 (prompts cached by the benchmark's repeats) it is optimistic: TPOT p90 0.05-0.11 s against
0.06-0.32 s, and at rate 2 it predicts 100% where 1P1D collapsed (17%; 12% and 17% in two other runs that
day) and colocated did this time (25%; 100% in the two others: it sits on an edge). One fitted term, 4 ms
per decode row for the serving path outside engine.step() (SSE, HTTP, the router, the client, all on the
same two cores), reproduces this run's attainment within 4 points (67/100/21% and 46/100/17%): it tips
the decode batches past 16 rows, onto the slow kernels. 1P1D's TTFT stays under-predicted (router hops).
Under others' load (a CI run) the same benchmark moved by up to 10x: two OpenMP threads wait for whichever
one is descheduled, so the 2-thread server suffers most.

GPU prediction (`--gpu`): Llama-3-8B shape, one H100 per instance, costs from the roofline (the constants
below), ShareGPT-like and LongBench-like lengths of our own, DistServe's SLOs as published and scaled x0.4.
It does not reproduce DistServe's 7.4x. On chatbot lengths colocation wins per GPU: the best xPyD is 0.81x
(1P1D) at DistServe's SLO and 0.75x (2P1D) at x0.4; on summarisation lengths 3P1D over RDMA wins, 1.22x.
Why: on an H100 an 8B prompt of ~550 tokens takes ~18 ms, about one decode step, so the interference that
DistServe measured with OPT-13B to 175B on A100s (prompts several decode steps long) is small: here even
their baseline (whole prompts that pause decoding) keeps up with chunked prefill. DistServe also picked each
phase's parallelism per SLO, which one GPU per instance cannot, and a fixed xPyD split idles whichever side
the mix does not need.
Splitwise's 1.4x is throughput per cost with cheaper GPUs for decode, not modelled. Over 25 Gb/s TCP a
decode instance takes ~30 chatbot prompts/s (72 MB each) and, since quadrant's router relays the first token
from the decode instance, no 0.1 s TTFT is met; returning it from the prefill instance (DistServe) lifts
1P1D over TCP at x0.4 from 0 to ~14 req/s/GPU (Disaggregated.first_token_from_prefill).

Left out, so a measured deployment will differ: preemption (admission reserves each request's whole
context), prefill attention's quadratic term (~1% of an 8B prompt's FLOPs at 550 tokens), overlap within a
step (its terms add, never max: large decode batches are charged up to ~1.5x the roofline), the decode
side's work to receive KV, and on CPU the serving path. Goodput searches resolve to ~5%, and finite runs
flatter fast deployments (chatbot colocated: 44 req/s/GPU with 2,000 requests, 28 with 16,000; 12,000 here).
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward step, linear in the work it does."""

    fixed_s: float  # per step: weights read once, scheduling, launch and sampling overhead
    per_prefill_token_s: float  # each prompt token the step runs
    per_decode_row_s: float  # each decode row (one new token of a running request)
    per_context_token_s: float  # each cached token the decode rows attend over

    def step_s(self, num_prefill_tokens: int, num_decode_rows: int, num_context_tokens: int) -> float:
        return (self.fixed_s + self.per_prefill_token_s * num_prefill_tokens + self.per_decode_row_s * num_decode_rows
                + self.per_context_token_s * num_context_tokens)


@dataclass(frozen=True)
class Engine:
    """One instance (a GPU, or a CPU process): its step costs and its scheduler's limits."""

    cost: StepCost  # steps with decode rows in them
    prefill_cost: StepCost | None = None  # steps of prompt tokens only, where they cost differently (None: cost)
    # steps of at most small_step_tokens tokens, where they run other kernels (quadrant on CPU: 4-bit weights up
    # to 16 tokens, bf16 GEMMs beyond; None: as the others)
    small_step_cost: StepCost | None = None
    small_step_tokens: int = 16
    max_num_batched_tokens: int = 512  # tokens in one step
    max_num_seqs: int = 64  # requests running at once
    chunked_prefill: bool = True  # False: whole prompts, in steps that pause decoding (vLLM 2023, DistServe's baseline)
    # KV cache capacity in tokens (None: unbounded). Admission reserves a request's whole context, prompt and
    # output, so nothing is ever preempted; a prefill instance's KV leaves with the transfer and is not counted.
    max_num_kv_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs must be <= max_num_batched_tokens (every decode row needs a token)")


@dataclass(frozen=True)
class Link:
    """KV transfer from a prefill to a decode instance; one transfer at a time into each decode instance."""

    bytes_per_token: float  # KV of one prompt token: all layers, K and V
    bytes_per_s: float
    latency_s: float  # per transfer: handshake, control messages, router hops

    def seconds(self, num_tokens: int) -> float:
        return self.latency_s + num_tokens * self.bytes_per_token / self.bytes_per_s


@dataclass(frozen=True)
class Colocated:
    """N engines that each run prompts and decode steps; a request goes to the one with the fewest requests."""

    engine: Engine
    num_instances: int = 1

    @property
    def num_gpus(self) -> int:
        return self.num_instances


@dataclass(frozen=True)
class Disaggregated:
    """xPyD: a prompt goes to the prefill engine with the fewest prompt tokens queued, its KV then to the decode
    engine with the fewest requests."""

    prefill: Engine
    decode: Engine
    link: Link
    num_prefill: int = 1  # x
    num_decode: int = 1  # y
    # quadrant's router relays the decode instance's stream, whose first token goes out once the pulled request
    # runs there; DistServe returns the first token from the prefill instance (True)
    first_token_from_prefill: bool = False

    @property
    def num_gpus(self) -> int:
        return self.num_prefill + self.num_decode


Deployment = Colocated | Disaggregated


@dataclass
class Request:
    """One request; the simulator fills in its times."""

    arrival_s: float
    prompt_len: int
    output_len: int  # tokens generated, the first one included
    num_cached_tokens: int = 0  # prompt tokens the prefix cache already holds where the prompt runs
    first_token_s: float = math.nan
    finish_s: float = math.nan

    @property
    def num_new_prompt_tokens(self) -> int:
        return self.prompt_len - self.num_cached_tokens

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first, as DistServe and disagg_goodput.py score it."""
        return (self.finish_s - self.first_token_s) / (self.output_len - 1) if self.output_len > 1 else 0.0


@dataclass(frozen=True)
class SLO:
    ttft_s: float  # time to first token, at most
    tpot_s: float  # mean time per output token after the first, at most
    attainment: float = 0.9  # share of requests that must meet both

    def met(self, r: Request) -> bool:
        return r.ttft <= self.ttft_s and (r.output_len <= 1 or r.tpot <= self.tpot_s)


# -- the simulator -----------------------------------------------------------------------------------

Role = Literal["colocated", "prefill", "decode"]


class _Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[Any], None], arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn, arg))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def run(self) -> None:
        while self._events:
            self.now, _, fn, arg = heapq.heappop(self._events)
            fn(arg)


@dataclass(eq=False)
class _Prompt:
    req: Request
    num_left: int  # prompt tokens still to run


Chunks = list[tuple[_Prompt, int]]  # the prompts a step runs, and how many tokens of each


class _Instance:
    """One engine's scheduler: running rows first, then prompt chunks FIFO under the token budget."""

    def __init__(self, sim: _Sim, engine: Engine, role: Role, on_prompt_done: Callable[[Request], None]) -> None:
        self.sim, self.engine, self.role, self.on_prompt_done = sim, engine, role, on_prompt_done
        self.waiting: deque[Request] = deque()
        self.prefilling: list[_Prompt] = []  # admitted, oldest first
        self.decoding: list[tuple[int, int, Request]] = []  # heap of (decode step it ends at, seq, request)
        self.num_context = 0  # tokens the decode rows attend over
        self.num_decode_steps = 0
        self.num_reserved = 0  # KV tokens reserved by the requests admitted here
        self.busy = False
        self.load = 0  # what dispatch balances: requests here, or prompt tokens left on a prefill instance

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self.kick()

    def admissible(self, req: Request) -> bool:
        """Room for one more: below max_num_seqs and (but on a prefill instance) its whole context, which it
        reserves, within the KV cache."""
        e = self.engine
        if len(self.prefilling) + len(self.decoding) >= e.max_num_seqs:
            return False
        if self.role == "prefill":
            return True
        need = req.prompt_len + req.output_len
        if (e.max_num_kv_tokens is not None and self.num_reserved + need > e.max_num_kv_tokens
                and (self.prefilling or self.decoding)):  # (one larger than the whole cache runs alone)
            return False
        self.num_reserved += need
        return True

    def finish(self, req: Request) -> None:
        req.finish_s = self.sim.now
        self.num_reserved -= req.prompt_len + req.output_len
        self.load -= 1

    def start_decoding(self, req: Request) -> None:
        if req.output_len <= 1:
            self.finish(req)
            return
        heapq.heappush(self.decoding, (self.num_decode_steps + req.output_len - 1, self.sim.next_seq(), req))
        self.num_context += req.prompt_len + 1

    def kick(self) -> None:
        if self.busy:
            return
        e = self.engine
        if self.role == "decode":
            while self.waiting and self.admissible(self.waiting[0]):
                req = self.waiting.popleft()
                if math.isnan(req.first_token_s):
                    req.first_token_s = self.sim.now
                self.start_decoding(req)
        chunks, rows = self._plan()
        if not chunks and not rows:
            return
        num_prefill = sum(take for _, take in chunks)
        if e.small_step_cost is not None and num_prefill + rows <= e.small_step_tokens:
            cost = e.small_step_cost
        else:
            cost = e.prefill_cost if not rows and e.prefill_cost is not None else e.cost
        seconds = cost.step_s(num_prefill, rows, self.num_context if rows else 0)
        self.busy = True
        self.sim.at(self.sim.now + seconds, self._end_step, (chunks, rows))

    def _plan(self) -> tuple[Chunks, int]:
        e = self.engine
        chunks: Chunks = []
        if self.role == "decode":
            return chunks, len(self.decoding)
        if not e.chunked_prefill:
            tokens = 0
            while (self.waiting and (not chunks or tokens + self.waiting[0].num_new_prompt_tokens
                                     <= e.max_num_batched_tokens) and self.admissible(self.waiting[0])):
                prompt = self._admit()
                chunks.append((prompt, prompt.num_left))
                tokens += prompt.num_left
            return chunks, 0 if chunks else len(self.decoding)
        rows = len(self.decoding)
        budget = e.max_num_batched_tokens - rows
        for prompt in self.prefilling:
            if budget <= 0:
                break
            chunks.append((prompt, min(prompt.num_left, budget)))
            budget -= chunks[-1][1]
        while budget > 0 and self.waiting and self.admissible(self.waiting[0]):
            prompt = self._admit()
            chunks.append((prompt, min(prompt.num_left, budget)))
            budget -= chunks[-1][1]
        return chunks, rows

    def _admit(self) -> _Prompt:
        req = self.waiting.popleft()
        self.prefilling.append(_Prompt(req, req.num_new_prompt_tokens))
        return self.prefilling[-1]

    def _end_step(self, plan: tuple[Chunks, int]) -> None:
        chunks, rows = plan
        self.busy = False
        if rows:
            self.num_decode_steps += 1
            self.num_context += rows
            while self.decoding and self.decoding[0][0] <= self.num_decode_steps:
                req = heapq.heappop(self.decoding)[2]
                self.num_context -= req.prompt_len + req.output_len
                self.finish(req)
        for prompt, take in chunks:
            prompt.num_left -= take
            if self.role == "prefill":
                self.load -= take
            if prompt.num_left == 0:
                self.prefilling.remove(prompt)
                req = prompt.req
                if self.role == "prefill":
                    self.on_prompt_done(req)
                else:
                    req.first_token_s = self.sim.now
                    self.start_decoding(req)
        self.kick()


def _least_loaded(pool: list[_Instance]) -> _Instance:
    return min(pool, key=lambda inst: inst.load)  # ties: the first


def simulate(deployment: Deployment, requests: Sequence[Request]) -> list[Request]:
    """Run the requests (copies; arrival_s set) through the deployment; each comes back with its times."""
    sim = _Sim()
    reqs = [Request(r.arrival_s, r.prompt_len, r.output_len, r.num_cached_tokens) for r in requests]
    if isinstance(deployment, Colocated):
        pool = [_Instance(sim, deployment.engine, "colocated", lambda r: None) for _ in range(deployment.num_instances)]

        def arrive(req: Request) -> None:
            inst = _least_loaded(pool)
            inst.load += 1
            inst.add(req)
    else:
        d = deployment
        decoders = [_Instance(sim, d.decode, "decode", lambda r: None) for _ in range(d.num_decode)]
        link_free = [0.0] * d.num_decode

        def transfer(req: Request) -> None:
            if d.first_token_from_prefill:
                req.first_token_s = sim.now
            i = min(range(d.num_decode), key=lambda j: decoders[j].load)
            decoders[i].load += 1
            start = max(sim.now, link_free[i])
            link_free[i] = start + d.link.seconds(req.prompt_len)
            sim.at(link_free[i], decoders[i].add, req)

        prefillers = [_Instance(sim, d.prefill, "prefill", transfer) for _ in range(d.num_prefill)]

        def arrive(req: Request) -> None:
            inst = _least_loaded(prefillers)
            inst.load += req.num_new_prompt_tokens
            inst.add(req)
    for req in reqs:
        sim.at(req.arrival_s, arrive, req)
    sim.run()
    assert all(not math.isnan(r.finish_s) for r in reqs), "a request never finished"
    return reqs


def poisson(lengths: Sequence[tuple[int, ...]], rate: float, seed: int) -> list[Request]:
    """Requests (prompt tokens, output tokens[, cached prompt tokens]) arriving as disagg_goodput.py sends them:
    the first at 0, then random.Random(seed).expovariate(rate) apart."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for item in lengths:
        out.append(Request(t, *item))
        t += rng.expovariate(rate)
    return out


def attainment(results: Sequence[Request], slo: SLO) -> float:
    return sum(slo.met(r) for r in results) / len(results)


def goodput(deployment: Deployment, lengths: Sequence[tuple[int, ...]], slo: SLO, seed: int = 0,
            guess: float | None = None, rel_tol: float = 0.05) -> float:
    """The highest Poisson rate (req/s, whole deployment) at which slo.attainment of the requests meet the SLO:
    bracketed from `guess` (default one per GPU), then bisected to rel_tol. 0 when too few meet it even alone.
    Capped where the requests would all arrive within 5 TTFT SLOs: beyond, a finite run says nothing."""

    def ok(rate: float) -> bool:
        return attainment(simulate(deployment, poisson(lengths, rate, seed)), slo) >= slo.attainment

    alone = poisson(lengths[:200], 1e-6, seed)  # so far apart that none overlaps another
    if attainment(simulate(deployment, alone), slo) < slo.attainment:
        return 0.0
    cap = len(lengths) / (5 * slo.ttft_s)
    step = 2.0 if guess is None else 1.25
    lo, hi = 0.0, min(guess or float(deployment.num_gpus), cap)
    if ok(hi):
        lo = hi
        while True:
            if lo >= cap:
                return cap
            hi = min(lo * step, cap)
            if not ok(hi):
                break
            lo = hi
    else:
        while lo == 0.0 and hi > 1e-3 * deployment.num_gpus:
            lo, hi = (hi / step, hi) if ok(hi / step) else (0.0, hi / step)
        if lo == 0.0:
            return 0.0
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def p90(values: Sequence[float]) -> float:
    """disagg_goodput.py's percentile: the value at index int(0.9 n) of the sorted list."""
    v = sorted(values)
    return v[min(len(v) - 1, int(0.9 * len(v)))] if v else math.nan


# -- CPU: step costs measured on quadrant's engine ----------------------------------------------------

CPU_MODEL = "smollm2:135m"
CPU_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4  # SmolLM2-135M: 30 layers x 3 KV heads x 64, K and V, fp32
CPU_KV_BYTES_PER_S = 1.0e9  # pyzmq transport, SmolLM2 shape (benchmarks/kv_transfer.py, BENCHMARKS.md)
CPU_HOP_S = 0.01  # router's prefill round trip, decode request and pull handshake over 127.0.0.1 (assumed)
# Per decode row, the serving path's work outside engine.step() (SSE encoding, HTTP, the router's relay and the
# benchmark's client, all on the same two cores): fitted to MEASURED_CHECK, not measured.
CPU_STREAM_S = 0.004
# `--measure` on this machine, each run while the other processes used under 1% of the cores (2 cores, AMD EPYC,
# no AVX-512; torch 2.13.0+cpu), SmolLM2-135M Q4_1 GGUF with `quadrant serve`'s defaults: threads -> (steps of
# over 16 tokens: bf16 GEMMs, steps of at most 16: 4-bit weights). Median fit errors 2-3%, 11% (2 threads, small).
CPU_COSTS_DATE = "2026-12-05"
CPU_COSTS: dict[int, tuple[StepCost, StepCost]] = {
    1: (StepCost(0.0466, 0.02257, 0.02131, 1.39e-4), StepCost(0.0255, 0.00742, 0.00710, 9.22e-6)),
    2: (StepCost(0.0412, 0.01174, 0.01052, 7.26e-5), StepCost(0.0183, 0.00374, 0.00556, 6.16e-6)),
}
# disagg_goodput.py's 24 requests as (prompt tokens, tokens greedy decoding produces), from `--check`
CHECK_LENGTHS = [(53, 67), (79, 96), (20, 40), (97, 76), (81, 39), (37, 49), (23, 16), (60, 38), (55, 96), (56, 51),
                 (235, 34), (57, 39), (74, 96), (49, 96), (128, 93), (23, 96), (29, 50), (41, 42), (149, 53), (27, 96),
                 (184, 96), (20, 33), (22, 23), (32, 34)]
# benchmarks/disagg_goodput.py on this machine while other processes used 1.0% of the cores (an earlier run, with a
# blip of load, differed at rate 2: colocated 100% attained, 0.65 s, 0.122 s): (setup, rate, goodput/s, attained,
# TTFT p90 s, TPOT p90 s)
MEASURED_CHECK: dict[str, Any] = {
    "date": "2026-12-05", "note": "others used 1% of the cores",
    "rows": [("colocated (2 cores)", 0.5, 0.34, 0.67, 2.70, 0.156),
             ("colocated (2 cores)", 1.0, 0.99, 1.00, 0.34, 0.064),
             ("colocated (2 cores)", 2.0, 0.26, 0.25, 1.00, 0.268),
             ("1P1D (1 core each)", 0.5, 0.23, 0.46, 8.72, 0.099),
             ("1P1D (1 core each)", 1.0, 0.93, 1.00, 0.53, 0.096),
             ("1P1D (1 core each)", 2.0, 0.15, 0.17, 1.54, 0.315)],
}


def _time_step(engine: Any) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    outputs = engine.step()
    return time.perf_counter() - start, outputs


def measure_steps(model: str = CPU_MODEL, threads: int = 1, seed: int = 0) -> list[tuple[int, int, int, float]]:
    """(prompt tokens, decode rows, context tokens, seconds) of real `engine.step()`s: prompts alone, decode
    batches, and decode batches with a prompt chunk, on `threads` threads, with `quadrant serve`'s scheduler."""
    import torch

    from quadrant.config import SchedulerConfig
    from quadrant.engine.engine import LLMEngine
    from quadrant.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine.from_model(model, scheduler=SchedulerConfig(enable_prefix_caching=False))
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    samples: list[tuple[int, int, int, float]] = []
    engine.add_request(ids(64), SamplingParams(max_tokens=8, temperature=0))  # warm-up: first shapes
    drain()
    for length in (8, 16, 64, 160, 320):
        for _ in range(2):
            engine.add_request(ids(length), SamplingParams(max_tokens=1, temperature=0))
            samples.append((length, 0, 0, _time_step(engine)[0]))
            drain()
    decode = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for batch, prompt, chunk in ((1, 16, 0), (8, 16, 0), (16, 16, 0), (32, 16, 0), (64, 16, 0), (4, 256, 0),
                                 (8, 16, 128), (32, 16, 256)):
        for _ in range(batch):
            engine.add_request(ids(prompt), decode)
        generated: dict[str, int] = {}
        while len(generated) < batch:  # the prompts first
            for o in engine.step():
                generated[o.request_id] = len(o.outputs[0].token_ids)
        for step in range(5):
            if chunk and step == 2:
                engine.add_request(ids(chunk), SamplingParams(max_tokens=1, temperature=0))
            context = sum(prompt + n for n in generated.values())
            seconds, outputs = _time_step(engine)
            samples.append((chunk if chunk and step == 2 else 0, batch, context, seconds))
            for o in outputs:
                if o.request_id in generated:
                    generated[o.request_id] = len(o.outputs[0].token_ids)
        drain()
    engine.shutdown()
    return samples


def fit(samples: Sequence[tuple[int, int, int, float]]) -> StepCost:
    """Least squares of seconds on (1, prompt tokens, rows, context); a feature whose weight comes out negative
    (noise) is dropped and the rest refitted."""
    import numpy as np

    x = np.array([[1.0, p, r, c] for p, r, c, _ in samples])
    y = np.array([s for *_, s in samples])
    keep = [i for i in range(4) if x[:, i].any()]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))
    full = [0.0] * 4
    for i, c in zip(keep, coef):
        full[i] = float(c)
    return StepCost(*full)


def fit_error(cost: StepCost, samples: Sequence[tuple[int, int, int, float]]) -> float:
    """Median relative error of the model over the samples."""
    return statistics.median(abs(cost.step_s(p, r, c) - s) / s for p, r, c, s in samples)


def measure_costs(model: str = CPU_MODEL, threads: int = 1) -> tuple[StepCost, StepCost, dict[str, float]]:
    """(cost of steps over 16 tokens, cost of steps of at most 16, each fit's median relative error): quadrant
    runs a Q4 checkpoint's small steps on its 4-bit weights and larger ones as bf16 GEMMs, two linear regimes."""
    samples = measure_steps(model, threads)
    small = [s for s in samples if s[0] + s[1] <= 16]
    large = [s for s in samples if s[0] + s[1] > 16]
    cost, small_cost = fit(large), fit(small)
    return cost, small_cost, {"over 16 tokens": fit_error(cost, large), "at most 16": fit_error(small_cost, small)}


# -- GPU: Llama-3-8B on H100 SXM from the roofline ----------------------------------------------------

HBM_BYTES_PER_S = 3.35e12  # H100 SXM, published
BF16_FLOPS = 989e12  # H100 SXM dense bf16, published
WEIGHT_STREAM_EFF = 0.74  # quadrant's batch-1 decode of this shape vs its roofline (BENCHMARKS.md, H200)
ATTENTION_EFF = 0.92  # quadrant's split-KV decode attention vs copy bandwidth (BENCHMARKS.md, H200)
PREFILL_MFU = 0.5  # prompt GEMMs at half of peak, what tuned engines reach on 8B prefills (assumed)
STEP_OVERHEAD_S = 0.5e-3  # scheduling, sampling and graph launch per step (assumed)
GPU_HOP_S = 2e-3  # router: the prefill round trip and the decode request, per request (assumed)
RDMA_BYTES_PER_S = 200e9 / 8 * 0.9  # one 200 Gb/s RDMA NIC at 90% of line rate (assumed)
RDMA_LATENCY_S = 50e-6  # registration-free one-sided reads, a few per transfer (assumed)
TCP_BYTES_PER_S = 25e9 / 8 * 0.7  # 25 Gb/s Ethernet, TCP streams at 70% of line rate (assumed)
TCP_LATENCY_S = 1e-3  # connection reuse, control messages, kernel copies (assumed)
LLAMA3_8B_PARAMS = 8.03e9
LLAMA3_8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # 32 layers x 8 KV heads x 128, K and V, bf16
# KV cache tokens per GPU: 90% of the 80 GB the weights leave (the rest: activations, fragmentation)
H100_KV_TOKENS = int(0.9 * (80e9 - 2 * LLAMA3_8B_PARAMS) / LLAMA3_8B_KV_BYTES_PER_TOKEN)
# DistServe's SLOs (their evaluation scripts): chatbot on OPT-13B (ShareGPT, A100s) and summarisation on
# OPT-66B (LongBench). x0.4 is the tightest point of their SLO-scale sweep: the Llama-3-8B shape on an H100
# prefills 5.1x (FLOPs over peak) and decodes 2.6x (weight bytes over HBM bandwidth) faster than OPT-13B on
# an A100, so x0.4 is about as tight for it as x1 was for theirs.
DISTSERVE_CHATBOT_SLO = SLO(ttft_s=0.25, tpot_s=0.1)
TIGHT_CHATBOT_SLO = SLO(ttft_s=0.25 * 0.4, tpot_s=0.1 * 0.4)
TIGHT_SUMMARY_SLO = SLO(ttft_s=15 * 0.4, tpot_s=0.15 * 0.4)


def llama3_8b_h100(chunked_prefill: bool = True, max_num_batched_tokens: int = 2048) -> Engine:
    token_s = 2 * LLAMA3_8B_PARAMS / (BF16_FLOPS * PREFILL_MFU)  # a token is a token to the GEMMs, prompt or row
    decode = StepCost(fixed_s=STEP_OVERHEAD_S + 2 * LLAMA3_8B_PARAMS / (HBM_BYTES_PER_S * WEIGHT_STREAM_EFF),
                      per_prefill_token_s=token_s, per_decode_row_s=token_s,
                      per_context_token_s=LLAMA3_8B_KV_BYTES_PER_TOKEN / (HBM_BYTES_PER_S * ATTENTION_EFF))
    # A prompt-only step is compute-bound: its weight reads hide under the GEMMs.
    prefill = StepCost(fixed_s=STEP_OVERHEAD_S, per_prefill_token_s=token_s, per_decode_row_s=0.0,
                       per_context_token_s=0.0)
    return Engine(decode, prefill, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=512,
                  chunked_prefill=chunked_prefill, max_num_kv_tokens=H100_KV_TOKENS)


GPU_LINKS = {
    "RDMA 200 Gb/s": Link(LLAMA3_8B_KV_BYTES_PER_TOKEN, RDMA_BYTES_PER_S, RDMA_LATENCY_S + GPU_HOP_S),
    "TCP 25 Gb/s": Link(LLAMA3_8B_KV_BYTES_PER_TOKEN, TCP_BYTES_PER_S, TCP_LATENCY_S + GPU_HOP_S),
}
GPU_RATIOS = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))


def sharegpt_like(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Chatbot (prompt, output) tokens: log-normal, prompt median 400 (mean ~550: the conversation so far),
    output median 150 (mean ~230), within a 2,048-token context. Our fit, not DistServe's trace."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = int(min(1536, max(8, rng.lognormvariate(math.log(400), 0.9))))
        out.append((prompt, int(min(2048 - prompt, max(2, rng.lognormvariate(math.log(150), 0.9))))))
    return out


def longbench_like(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Summarisation (prompt, output) tokens: prompt median 1,800 (200 to 3,800), output median 100 (at most
    400). Our fit, not DistServe's trace."""
    rng = random.Random(seed)
    return [(int(min(3800, max(200, rng.lognormvariate(math.log(1800), 0.5)))),
             int(min(400, max(2, rng.lognormvariate(math.log(100), 0.7))))) for _ in range(n)]


def _gpu_row(job: tuple[str, str, Deployment, dict[str, tuple[list[tuple[int, int]], SLO]], dict[str, float] | None,
                          int]) -> dict[str, Any]:
    name, link_name, dep, columns, faster, seed = job
    row: dict[str, Any] = {"deployment": name, "link": link_name, "gpus": dep.num_gpus}
    for column, (lengths, slo) in columns.items():
        if faster is not None:  # a slower link does no better: start there
            guess = faster[column] * dep.num_gpus
        elif slo is TIGHT_CHATBOT_SLO:  # a tighter SLO does no better
            guess = row[next(iter(columns))] * dep.num_gpus
        else:  # a search on a fifth of the requests (shorter, so a little high)
            guess = goodput(dep, lengths[:len(lengths) // 5], slo, seed, rel_tol=0.2)
        row[column] = goodput(dep, lengths, slo, seed, guess=guess) / dep.num_gpus if guess else 0.0
    return row


def gpu_rows(num_requests: int = 12000, seed: int = 0) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows): goodput per GPU of colocated and xPyD deployments on each workload and SLO, the
    deployments searched in parallel, one process a core."""
    chat, summary = sharegpt_like(num_requests, seed), longbench_like(num_requests // 4, seed)
    columns = {"chatbot, SLO 0.25 s / 0.1 s (DistServe's)": (chat, DISTSERVE_CHATBOT_SLO),
               "chatbot, SLO x0.4: 0.1 s / 0.04 s": (chat, TIGHT_CHATBOT_SLO),
               "summarisation, SLO x0.4: 6 s / 0.06 s": (summary, TIGHT_SUMMARY_SLO)}
    first: list[tuple[str, str, Deployment]] = [
        ("colocated x4, chunked prefill (2,048-token steps)", "-", Colocated(llama3_8b_h100(), 4)),
        ("colocated x4, whole prompts first (DistServe's vLLM baseline)", "-",
         Colocated(llama3_8b_h100(chunked_prefill=False), 4)),
    ]
    (fast_name, fast_link), (slow_name, slow_link) = GPU_LINKS.items()
    first += [(f"{x}P{y}D", fast_name, Disaggregated(llama3_8b_h100(), llama3_8b_h100(), fast_link, x, y))
              for x, y in GPU_RATIOS]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        rows = list(pool.map(_gpu_row, [(*d, columns, None, seed) for d in first]))
        rows += pool.map(_gpu_row, [(f"{x}P{y}D", slow_name, Disaggregated(llama3_8b_h100(), llama3_8b_h100(),
                                                                           slow_link, x, y), columns, faster, seed)
                                    for (x, y), faster in zip(GPU_RATIOS, rows[2:])])
    return list(columns), rows


# -- CPU check: the simulator against benchmarks/disagg_goodput.py ------------------------------------

CHECK_SLO = SLO(ttft_s=2.0, tpot_s=0.15)  # disagg_goodput.py's defaults
CHECK_RATES = (0.5, 1.0, 2.0)
CHECK_SEED = 1  # disagg_goodput.py's arrivals: random.Random(1).expovariate(rate)


def check_lengths(model: str = CPU_MODEL, num_prompts: int = 24) -> list[tuple[int, int]]:
    """disagg_goodput.py's requests as token counts: each prompt tokenised, and the tokens greedy decoding
    really produces for it within max_tokens = min(n, 96) (EOS may come first)."""
    import torch

    from quadrant.engine.engine import LLMEngine
    from quadrant.sampling_params import SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import workload  # benchmarks/serve.py

    torch.set_num_threads(2)
    engine = LLMEngine.from_model(model)
    ids = {}
    for i, (prompt, n) in enumerate(workload(num_prompts)):
        ids[engine.add_request(prompt, SamplingParams(max_tokens=min(n, 96), temperature=0), str(i))] = i
    lengths = [(0, 0)] * num_prompts
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                lengths[ids[o.request_id]] = (len(o.prompt_token_ids), len(o.outputs[0].token_ids))
    engine.shutdown()
    return lengths


def cpu_deployments(costs: dict[int, tuple[StepCost, StepCost]], stream_s: float = 0.0) -> dict[str, Deployment]:
    """disagg_goodput.py's two setups: one server on 2 threads, or a prefill and a decode worker on 1 each;
    `stream_s` more per decode row."""

    def engine(threads: int) -> Engine:
        cost, small = (replace(c, per_decode_row_s=c.per_decode_row_s + stream_s) for c in costs[threads])
        return Engine(cost, small_step_cost=small)

    link = Link(CPU_KV_BYTES_PER_TOKEN, CPU_KV_BYTES_PER_S, CPU_HOP_S)
    return {"colocated (2 cores)": Colocated(engine(2)),
            "1P1D (1 core each)": Disaggregated(engine(1), engine(1), link)}


def check_requests(lengths: Sequence[tuple[int, int]], rate: float) -> list[Request]:
    """disagg_goodput.py sends the same prompts at every rate to one server, after a warm-up with the first 8:
    `quadrant serve` caches prefixes, so a prompt it has seen runs only its last, partial 16-token block."""
    reqs = poisson(lengths, rate, CHECK_SEED)
    for i, r in enumerate(reqs):
        if rate != CHECK_RATES[0] or i < 8:
            r.num_cached_tokens = (r.prompt_len - 1) // 16 * 16
    return reqs


def check_rows(costs: dict[int, tuple[StepCost, StepCost]], lengths: Sequence[tuple[int, int]],
               stream_s: float = 0.0) -> list[dict[str, Any]]:
    rows = []
    for name, dep in cpu_deployments(costs, stream_s).items():
        for rate in CHECK_RATES:
            done = simulate(dep, check_requests(lengths, rate))
            met = sum(CHECK_SLO.met(r) for r in done)
            rows.append({"setup": name, "rate": rate, "goodput": met / max(r.finish_s for r in done),
                         "attainment": met / len(done), "ttft_p90": p90([r.ttft for r in done]),
                         "tpot_p90": p90([r.tpot for r in done if r.output_len > 1])})
    return rows


def print_check(console: Any, costs: dict[int, tuple[StepCost, StepCost]], costs_date: str,
                lengths: Sequence[tuple[int, int]]) -> None:
    from rich.table import Table

    sim = {(r["setup"], r["rate"]): r for r in check_rows(costs, lengths)}
    fitted = {(r["setup"], r["rate"]): r for r in check_rows(costs, lengths, CPU_STREAM_S)}
    m = MEASURED_CHECK
    table = Table(title=f"CPU check: {CPU_MODEL}, disagg_goodput.py's {len(lengths)} requests per rate, SLO TTFT <= "
                        f"{CHECK_SLO.ttft_s} s and TPOT <= {CHECK_SLO.tpot_s} s; measured {m['date']} ({m['note']}) "
                        f"against simulated with engine.step() costs (measured {costs_date}) and with "
                        f"{CPU_STREAM_S * 1e3:.0f} ms more per decode row (the serving path, fitted)")
    table.add_column("setup")
    for col in ("rate/s", "attained meas", "sim", f"+{CPU_STREAM_S * 1e3:.0f} ms", "TTFT p90 s meas", "sim",
                f"+{CPU_STREAM_S * 1e3:.0f} ms", "TPOT p90 s meas", "sim", f"+{CPU_STREAM_S * 1e3:.0f} ms",
                "goodput/s meas", "sim", f"+{CPU_STREAM_S * 1e3:.0f} ms"):
        table.add_column(col, justify="right")
    for setup, rate, good, attained, ttft, tpot in m["rows"]:
        s, f = sim[(setup, rate)], fitted[(setup, rate)]
        table.add_row(setup, f"{rate:.2f}", f"{attained:.0%}", f"{s['attainment']:.0%}", f"{f['attainment']:.0%}",
                      f"{ttft:.2f}", f"{s['ttft_p90']:.2f}", f"{f['ttft_p90']:.2f}", f"{tpot:.3f}",
                      f"{s['tpot_p90']:.3f}", f"{f['tpot_p90']:.3f}", f"{good:.2f}", f"{s['goodput']:.2f}",
                      f"{f['goodput']:.2f}")
    console.print(table)
    # DistServe's goodput needs more than 24 requests: the 24, ten times over, prompts cached (as at rates 1 and 2)
    warm = [(p, o, (p - 1) // 16 * 16) for p, o in lengths] * 10
    for label, stream_s in (("engine.step() costs", 0.0), (f"+{CPU_STREAM_S * 1e3:.0f} ms a row", CPU_STREAM_S)):
        deployments = cpu_deployments(costs, stream_s)
        best = {name: goodput(dep, warm, CHECK_SLO, CHECK_SEED) for name, dep in deployments.items()}
        console.print(f"simulated goodput ({label}), DistServe's definition (the highest rate with 90% of requests "
                      "within SLO; 240 requests, prompts cached): "
                      + ", ".join(f"{name} {g:.2f} req/s ({g / 2:.2f} per core)" for name, g in best.items()))


def print_gpu(console: Any, columns: list[str], rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="GPU prediction: Llama-3-8B shape on H100 SXM, from the roofline (no GPU run); goodput per "
                        "GPU (req/s with 90% of requests within SLO) and its ratio to the best colocated deployment")
    for col in ("deployment", "KV link", "GPUs"):
        table.add_column(col)
    for col in columns:
        table.add_column(f"{col}\nreq/s/GPU", justify="right")
        table.add_column("x colocated", justify="right")
    best = {c: max(r[c] for r in rows if r["link"] == "-") for c in columns}
    for r in rows:
        cells = []
        for c in columns:
            cells += [f"{r[c]:.2f}", f"{r[c] / best[c]:.2f}x" if best[c] else "-"]
        table.add_row(r["deployment"], r["link"], str(r["gpus"]), *cells)
    gap = ["", ""] * (len(columns) - 1)
    table.add_row("DistServe (published): OPT-13B..175B on A100s, vs vLLM", "NVLink / IB", "-",
                  "", "up to 7.4x", *gap)
    table.add_row("DistServe simulator README: OPT-13B ShareGPT, 4 A100s, SLO 0.2 s / 0.1 s", "NVLink", "4", "1.56",
                  "", *gap)
    table.add_row("Splitwise (published): 1.4x throughput at 20% lower cost, 2.35x at the same cost and power",
                  "IB", "-", "", "1.4x / 2.35x", *gap)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="re-measure the CPU step costs on this machine (minutes)")
    p.add_argument("--check", action="store_true",
                   help="the CPU table alone, the workload's token counts recomputed with the engine")
    p.add_argument("--gpu", action="store_true", help="the GPU table alone")
    p.add_argument("--num-requests", type=int, default=12000, help="chatbot requests per simulated rate (GPU)")
    args = p.parse_args(argv)
    from rich.console import Console

    console = Console(width=220)
    if args.check or args.measure or not args.gpu:
        costs, costs_date = CPU_COSTS, CPU_COSTS_DATE
        if args.measure:
            costs, costs_date = {}, str(date.today())
            for threads in (1, 2):
                cost, small_cost, errors = measure_costs(threads=threads)
                costs[threads] = (cost, small_cost)
                print(f"{threads} thread(s), steps over 16 tokens: {cost}\n  at most 16: {small_cost}\n  median "
                      "relative error: " + ", ".join(f"{k} {v:.0%}" for k, v in errors.items()))
        lengths = CHECK_LENGTHS
        if args.check:
            lengths = check_lengths()
            print(f"(prompt, output) tokens: {lengths}")
        print_check(console, costs, costs_date, lengths)
    if args.gpu or not (args.check or args.measure):
        print_gpu(console, *gpu_rows(args.num_requests))


if __name__ == "__main__":
    main()
