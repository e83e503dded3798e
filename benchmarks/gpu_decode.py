"""GPU decode: quadrant against the weight-streaming roofline and Hugging Face transformers, in one run.

    python benchmarks/gpu_decode.py                  # all workloads, H100-sized (about 6-8 minutes)
    python benchmarks/gpu_decode.py --only batch1    # or: small, throughput, attention (--sweep), profile, verify,
                                                     #     drafting
    python benchmarks/gpu_decode.py --smoke          # tiny shapes: checks the script itself (CPU works)

Random weights of real architectures (--load-format dummy with the configs shipped in
quadrant/model_configs), bf16. Measured in the same run:
1. copy bandwidth: a device-to-device copy of 2 GiB, best of 10; the roofline for batch-1
   decode is bandwidth / bytes streamed per token (every weight except the input embedding
   table, of which one row is read, plus the KV cache).
2. Llama-3-8B shape, batch 1, 128-token prompt, 256 output tokens: quadrant (CUDA graphs,
   Triton attention) against the roofline and against transformers' generate.
3. SmolLM2-135M shape, batch 1: launch overhead decides this one.
4. throughput: 1,000 prompts of ShareGPT-like lengths (fixed-seed log-normal input and
   output lengths), Llama-3-8B shape, all submitted at once: output tokens/s.
5. decode attention alone (the paged split-KV kernel) at 8k-32k context, batch 32-128,
   bf16, fp8 and int8 caches: achieved bandwidth (bytes actually read) against the copy bandwidth.
6. profile (asked for by name): torch.profiler over batch-1 decode steps of the SmolLM2-135M shape.
7. verify (asked for by name): a speculative verification step (8 drafts per row, a chain or a token
   tree) against the one-token decode step, Llama-3-8B shape, batch 1, 8 and 64.
8. drafting (asked for by name): an EAGLE head's propose call (a chain of 8 drafts, or an EAGLE-2
   tree of 8 nodes) against the one-token decode step, same shape and batches.
Prints one table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quadrant import SamplingParams
from quadrant.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from quadrant.engine.engine import LLMEngine
from quadrant.loader.source import SHIPPED_CONFIGS

SMOKE_CONFIG = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
}


@dataclass
class Row:
    workload: str
    ours: float
    peer: float | None
    peer_name: str
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None


@dataclass
class Context:
    device: str
    smoke: bool
    bandwidth: float = 0.0  # bytes/s
    rows: list[Row] = field(default_factory=list)
    smoke_config: str | None = None  # config.json of the tiny smoke-test model
    overlap: bool = False  # overlapped scheduling in the throughput run (and beside the plain batch-1 runs)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def copy_bandwidth(ctx: Context) -> float:
    """Device-to-device copy: each byte is read once and written once."""
    n = (64 << 20) if ctx.smoke else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(10):
        ctx.sync()
        t = time.perf_counter()
        dst.copy_(src)
        ctx.sync()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n / best


def streamed_bytes(engine: LLMEngine) -> int:
    """Bytes a batch-1 decode step must read: all weights but the (untied) input embedding table."""
    model = engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if not engine.model_config.tie_word_embeddings:
        total -= embed.numel() * embed.element_size()
    return total


def engine_for(ctx: Context, model: str, max_num_seqs: int = 8, kv_memory: int | None = None,
               fraction: float | None = None, budget: int = 2048, overlap: bool = False,
               speculative: SpeculativeConfig | None = None) -> LLMEngine:
    if ctx.smoke_config:
        model = ctx.smoke_config
    return LLMEngine.from_model(
        model, dtype="bfloat16" if ctx.device.startswith("cuda") else "float32", device=ctx.device,
        load_format="dummy",
        cache=CacheConfig(kv_cache_memory=kv_memory, memory_fraction=fraction),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        async_scheduling=overlap, speculative=speculative or SpeculativeConfig(),
    )


def _smoke_config() -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps(SMOKE_CONFIG))
    return str(path)


def decode_rate(engine: LLMEngine, prompt_len: int, output_len: int, seed: int = 0) -> float:
    """Batch-1 decode tokens/s: output tokens after the first, over the time after the first."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt, params, request_id=f"warm{seed}")  # warm-up: kernels compiled, allocator primed
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request(prompt, params, request_id=f"run{seed}")
    first = last = 0.0
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            if n > produced:
                now = time.perf_counter()
                first = first or now
                last, produced = now, n
    return (produced - 1) / (last - first)


def transformers_rate(ctx: Context, config_name: str, prompt_len: int, output_len: int) -> float | None:
    """transformers' generate on the same shape (bf16, random weights, SDPA): output tokens/s."""
    try:
        import transformers
    except ImportError:
        return None
    cfg = json.loads(Path(ctx.smoke_config or SHIPPED_CONFIGS / f"{config_name}.json").read_text())
    cfg.pop("_comment", None)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    dtype = torch.bfloat16 if ctx.device.startswith("cuda") else torch.float32
    with torch.device(ctx.device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt_len), device=ctx.device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm-up
        ctx.sync()
        t = time.perf_counter()
        model.generate(ids, **kw)
        ctx.sync()
        elapsed = time.perf_counter() - t
    del model
    _free(ctx)
    return output_len / elapsed


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_batch1(ctx: Context, name: str, label: str) -> None:
    prompt_len, output_len = (16, 16) if ctx.smoke else (128, 256)
    engine = engine_for(ctx, name, max_num_seqs=1, kv_memory=(64 << 20) if ctx.smoke else (4 << 30))
    rate = decode_rate(engine, prompt_len, output_len)
    roofline = ctx.bandwidth / streamed_bytes(engine)
    del engine
    _free(ctx)
    ctx.rows.append(Row(f"{label}, batch 1, {prompt_len}+{output_len}", rate, roofline, "roofline", "tok/s",
                        f"{streamed_bytes_note(roofline, ctx)}"))
    hf = transformers_rate(ctx, name, prompt_len, output_len)
    ctx.rows.append(Row(f"{label}, batch 1", rate, hf, "transformers generate", "tok/s"))
    if ctx.overlap:  # the same decode with the next step scheduled while one runs
        engine = engine_for(ctx, name, max_num_seqs=1, kv_memory=(64 << 20) if ctx.smoke else (4 << 30),
                            overlap=True)
        overlapped = decode_rate(engine, prompt_len, output_len)
        del engine
        _free(ctx)
        ctx.rows.append(Row(f"{label}, batch 1, overlapped scheduling", overlapped, rate, "the same, not overlapped",
                            "tok/s"))


def streamed_bytes_note(roofline: float, ctx: Context) -> str:
    return f"{ctx.bandwidth / roofline / 1e9:.2f} GB read per token"


def sharegpt_like(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs: log-normal, medians about 150 and 180 tokens, capped at 1024,
    a stand-in for ShareGPT's length distribution (no data set is fetched)."""
    rng = random.Random(seed)
    return [(min(1024, max(4, int(rng.lognormvariate(5.0, 0.9)))), min(1024, max(4, int(rng.lognormvariate(5.2, 0.8)))))
            for _ in range(n)]


def bench_throughput(ctx: Context) -> None:
    n = 16 if ctx.smoke else 1000
    engine = engine_for(ctx, "llama-3-8b", max_num_seqs=8 if ctx.smoke else 256,
                        fraction=None if ctx.smoke else 0.85, kv_memory=(64 << 20) if ctx.smoke else None,
                        budget=512 if ctx.smoke else 8192, overlap=ctx.overlap)
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    work = sharegpt_like(n)
    if ctx.smoke:
        work = [(min(p, 64), min(o, 16)) for p, o in work]
    for i, (p, o) in enumerate(work):
        engine.add_request([rng.randrange(vocab) for _ in range(p)],
                           SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True), request_id=str(i))
    ctx.sync()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    ctx.sync()
    elapsed = time.perf_counter() - t
    output = sum(o for _, o in work)
    steps = engine.num_steps
    del engine
    _free(ctx)
    ctx.rows.append(Row(f"Llama-3-8B shape, {n} ShareGPT-like prompts", output / elapsed, 16_215.0,
                        "SGLang published (H100)", "output tok/s",
                        f"{elapsed:.1f} s wall, {steps} steps ({elapsed / max(steps, 1) * 1e3:.1f} ms each)"
                        + (", overlapped scheduling" if ctx.overlap else "")))


TILES = [(64, 8, 2), (128, 8, 2), (128, 4, 3), (64, 4, 3)]  # (tokens, warps, stages) swept


def bench_attention(ctx: Context, sweep: bool = False) -> None:
    """The split-KV decode kernel alone; --sweep also times every tile in TILES (with every code
    conversion for 8-bit caches) and names the best."""
    from quadrant.kernels.paged_decode import CONVERSIONS, decode_conversion, decode_tile, num_sms, paged_decode, plan_splits
    from quadrant.kernels.kv_store import quant_mode

    dev = torch.device(ctx.device)
    heads, kv_heads, dim, block = 32, 8, 128, 16
    shapes = [(2, 256), (2, 512)] if ctx.smoke else [(32, 8192), (128, 8192), (32, 32768), (64, 32768)]
    cache_dtypes = [torch.bfloat16, torch.float8_e4m3fn, torch.int8] if dev.type == "cuda" else [torch.float32,
                                                                                                   torch.int8]
    for batch, ctx_len in shapes:
        for cache_dtype in cache_dtypes:
            quant = cache_dtype in (torch.int8, torch.float8_e4m3fn)
            blocks_per_seq = ctx_len // block
            num_blocks = batch * blocks_per_seq
            k = torch.empty(num_blocks, kv_heads, block, dim, device=dev, dtype=torch.bfloat16 if dev.type == "cuda"
                            else torch.float32).normal_()
            k = (k * 20).round().clamp(-127, 127).to(cache_dtype) if cache_dtype == torch.int8 else k.to(cache_dtype)
            v = torch.empty_like(k)
            v.copy_(k)
            scales = (torch.full((num_blocks, kv_heads, 1), 0.01, device=dev),) * 2 if quant else (None, None)
            tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32)[:num_blocks].view(batch, blocks_per_seq)
            tables = tables.to(torch.int32).contiguous()
            lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=dev)
            q = torch.randn(batch, heads, dim, device=dev, dtype=k.dtype if not quant else
                            (torch.bfloat16 if dev.type == "cuda" else torch.float32))
            splits, chunk = plan_splits([ctx_len] * batch, kv_heads, num_sms(dev))
            chunk_t = torch.tensor([chunk], dtype=torch.int32, device=dev)
            read = 2 * k.numel() * k.element_size() + (2 * scales[0].numel() * 4 if quant else 0)
            default = (*decode_tile(block, k.element_size(), dev), decode_conversion(quant_mode(cache_dtype), dev, q.dtype))
            convs = CONVERSIONS if quant and dev.type == "cuda" else (0,)
            variants = [default] + [(*t, c) for t in TILES for c in convs if (*t, c) != default] \
                if sweep and not ctx.smoke else [default]
            rates = {}
            for tile in variants:
                def call() -> None:
                    paged_decode(q, k, v, tables, lens, dim**-0.5, splits, chunk_t, scales[0], scales[1],
                                 block if quant else 0, tile=tile[:3], convert=tile[3])

                try:
                    call()
                except Exception as e:  # a swept tile that does not compile (shared memory): skip it, say why
                    if tile == default:
                        raise
                    print(f"tile {tile}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                ctx.sync()
                reps = 1 if ctx.smoke else 20
                t = time.perf_counter()
                for _ in range(reps):
                    call()
                ctx.sync()
                rates[tile] = read / ((time.perf_counter() - t) / reps) / 1e9
            name = str(cache_dtype).replace("torch.", "")
            note = f"{splits} splits of {chunk}, (tokens, warps, stages, conversion) {default}"
            if len(rates) > 1:
                best = max(rates, key=rates.get)
                note += f"; best tile {best}: {rates[best]:,.0f} GB/s; " + ", ".join(
                    f"{t}: {r:,.0f}" for t, r in rates.items())
            ctx.rows.append(Row(f"decode attention, batch {batch}, {ctx_len} ctx, {name} KV", rates[default],
                                ctx.bandwidth / 1e9, "copy bandwidth", "GB/s", note))
            del k, v, scales
            _free(ctx)


def median_time(ctx: Context, call: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Seconds of `call`, synchronised: the median of `repeats` after `warmup` untimed calls."""
    times = []
    for i in range(repeats + warmup):
        ctx.sync()
        t = time.perf_counter()
        call()
        ctx.sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_drafting(ctx: Context) -> None:
    """EAGLE drafting's price: a head for the Llama-3-8B shape (random weights, so acceptance is not
    measured here; a 32k-token draft vocabulary, as EAGLE-3's), one propose call for B requests at
    512-token contexts in steady state (one token to catch up): a chain of k drafts (k head forwards)
    and an EAGLE-2 tree (4 nodes expanded a depth, the k best kept), against the target's one-token
    decode step (CUDA graphs). Drafting pays once the tokens a verification accepts repay it and the
    verification step (`--only verify`)."""
    import tempfile

    from quadrant.engine.request import Request
    from quadrant.engine.spec.eagle import EagleProposer
    from quadrant.engine.step import NewRequest, ScheduledRow, StepInput
    from quadrant.train.eagle import init_head

    ctx_len, k, width = (24, 4, 2) if ctx.smoke else (512, 8, 4)
    kv_memory = (64 << 20) if ctx.smoke else (8 << 30)
    target = engine_for(ctx, "llama-3-8b", max_num_seqs=64, kv_memory=kv_memory, budget=4096)
    vocab = target.model_config.vocab_size
    folder = Path(tempfile.mkdtemp()) / "head"
    init_head(target.model, target.model_config, torch.arange(min(vocab, 32768)), "llama-3-8b shape").save(folder)
    del target
    _free(ctx)
    engine = engine_for(ctx, "llama-3-8b", max_num_seqs=64, kv_memory=kv_memory, budget=4096,
                        speculative=SpeculativeConfig("eagle", k, model=str(folder), tree_branches=width))
    runner, proposer = engine.runner, engine.proposer
    assert isinstance(proposer, EagleProposer)
    block = engine.config.cache.block_size
    per_request = -(-(ctx_len + 1) // block)
    rng = random.Random(3)
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    for batch in (1, 8) if ctx.smoke else (1, 8, 64):
        if batch * per_request > engine.kv.pool.num_blocks:
            continue
        ids = [f"draft-{batch}-{i}" for i in range(batch)]
        prompts = [[rng.randrange(vocab) for _ in range(ctx_len)] for _ in ids]
        news = [NewRequest(rid, p, [], params, None, list(range(i * per_request, (i + 1) * per_request)))
                for i, (rid, p) in enumerate(zip(ids, prompts))]
        runner.execute(StepInput(new_requests=news, rows=[ScheduledRow(rid, 0, ctx_len) for rid in ids]))
        plain = StepInput(rows=[ScheduledRow(rid, ctx_len - 1, 1) for rid in ids])  # the last prompt token again
        step = median_time(ctx, lambda: runner.execute(plain))
        asks = [(Request(rid, p, params), k) for rid, p in zip(ids, prompts)]
        for name, branches in (("chain", 1), (f"tree ({width} a depth)", width)):
            proposer.branches = branches
            proposer.propose(asks)  # the head's catch-up over the prompts, untimed
            t = median_time(ctx, lambda: proposer.propose(asks))
            forwards = proposer.last_forwards[1] if proposer.last_forwards else 0
            ctx.rows.append(Row(f"EAGLE drafting, {name}, k={k}, batch {batch}", t * 1e3, step * 1e3,
                                "one-token decode step", "ms", f"{forwards} head forwards a call"))
        proposer.retain(set())
        runner.execute(StepInput(finished_request_ids=ids))
    del engine, runner, proposer
    _free(ctx)


def bench_verify(ctx: Context) -> None:
    """Speculative verification's price: a decode step of B requests whose rows carry k drafts (a chain,
    or a token tree of k nodes in three branches) against the plain one-token step (CUDA graphs where
    they run: the engine drafts trees, so its graphs take tree masks and cover 1 + k rows for up to
    max_batch_size drafting requests), Llama-3-8B shape, 512-token contexts; trees also eagerly (the
    varlen kernel). The runner's step alone, median of 20 after warm-up; a ratio of r means verifying
    pays once a row's accepted drafts average more than r - 1."""
    from quadrant.engine.step import NewRequest, ScheduledRow, StepInput

    ctx_len, k = (24, 4) if ctx.smoke else (512, 8)
    engine = engine_for(ctx, "llama-3-8b", max_num_seqs=64, kv_memory=(64 << 20) if ctx.smoke else (8 << 30),
                        budget=4096, speculative=SpeculativeConfig("ngram", k, tree_branches=3))
    runner = engine.runner
    block = engine.config.cache.block_size
    per_request = -(-(ctx_len + k + 1) // block)
    rng = random.Random(2)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    chain = ([rng.randrange(vocab) for _ in range(k)], None)
    third = k // 3
    tree_parents = [-1] + list(range(k - 2 * third - 1)) + [-1] + [k - 2 * third + i for i in range(third - 1)] + \
        [-1] + [k - third + i for i in range(third - 1)]  # three branches, the first the longest
    tree = ([rng.randrange(vocab) for _ in range(k)], tree_parents)

    def timed(step: StepInput) -> float:
        return median_time(ctx, lambda: runner.execute(step))

    for batch in (1, 8) if ctx.smoke else (1, 8, 64):
        if batch * per_request > engine.kv.pool.num_blocks:
            continue
        ids = [f"verify-{batch}-{i}" for i in range(batch)]
        news = [NewRequest(rid, [rng.randrange(vocab) for _ in range(ctx_len)], [], params, None,
                           list(range(i * per_request, (i + 1) * per_request))) for i, rid in enumerate(ids)]
        runner.execute(StepInput(new_requests=news, rows=[ScheduledRow(rid, 0, ctx_len) for rid in ids]))  # prefill

        def step(drafts: tuple[list[int], list[int] | None]) -> StepInput:  # the last prompt token again, then drafts
            tokens, parents = drafts
            return StepInput(rows=[ScheduledRow(rid, ctx_len - 1, 1 + len(tokens), tokens, None, parents) for rid in ids])

        plain = timed(step(([], None)))
        graphs = runner.graphs
        fits = graphs is not None and graphs.fits(batch * (1 + k), per_request)
        for name, drafts, eager in (("chain", chain, False), ("tree (3 branches)", tree, False),
                                    ("tree (3 branches), eager", tree, True)):
            if eager and not fits:
                continue  # the row above already ran eagerly
            runner.graphs = None if eager else graphs
            try:
                t = timed(step(drafts))
            finally:
                runner.graphs = graphs
            how = "graphs" if fits and not eager else "eager"
            ctx.rows.append(Row(f"verify {k} drafts, {name}, batch {batch}", t * 1e3, plain * 1e3,
                                "one-token decode step", "ms", f"{batch * (1 + k)} tokens a step, {how}"))
        runner.execute(StepInput(finished_request_ids=ids))
    del engine, runner
    _free(ctx)


def profile_decode(ctx: Context, name: str, steps: int = 64) -> None:
    """Where a batch-1 decode step's time goes: torch.profiler over `steps` steps, the top kernels
    and host functions by time, and the wall time per step (printed, not a row)."""
    from torch.profiler import ProfilerActivity, profile

    engine = engine_for(ctx, name, max_num_seqs=1, kv_memory=(64 << 20) if ctx.smoke else (4 << 30))
    params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True)
    engine.add_request(list(range(1, 129)), params, request_id="profile")
    for _ in range(16):  # prefill and the graphs' first replays
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        ctx.sync()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        ctx.sync()
        wall = (time.perf_counter() - t) / steps
    del engine
    _free(ctx)
    sort = "cuda_time_total" if ctx.device.startswith("cuda") else "cpu_time_total"
    print(f"profile {name}: {wall * 1e3:.3f} ms per decode step (profiled; {1 / wall:,.0f} tok/s)")
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="+",
                    choices=["batch1", "small", "throughput", "attention", "profile", "verify", "drafting"],
                    default=["batch1", "small", "throughput", "attention"])
    ap.add_argument("--sweep", action="store_true", help="attention: also time the other kernel tiles")
    ap.add_argument("--overlap", action="store_true",
                    help="throughput with overlapped scheduling; batch1/small also time it beside the plain run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script, not the GPU")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    ctx = Context(args.device, args.smoke, smoke_config=_smoke_config() if args.smoke else None, overlap=args.overlap)
    ctx.bandwidth = copy_bandwidth(ctx)
    stages = {"batch1": lambda: bench_batch1(ctx, "llama-3-8b", "Llama-3-8B shape"),
              "small": lambda: bench_batch1(ctx, "smollm2-135m", "SmolLM2-135M shape"),
              "throughput": lambda: bench_throughput(ctx), "attention": lambda: bench_attention(ctx, args.sweep),
              "profile": lambda: profile_decode(ctx, "smollm2-135m"), "verify": lambda: bench_verify(ctx),
              "drafting": lambda: bench_drafting(ctx)}
    for name, stage in stages.items():
        if name in args.only:
            done = len(ctx.rows)
            stage()
            for r in ctx.rows[done:]:  # as they come: a run cut short still reports what it measured
                print(f"{r.workload}: {r.ours:,.1f} {r.unit} vs {r.peer_name} {r.peer}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    table = Table(title=f"quadrant GPU decode ({device}, torch {torch.__version__}, {date.today()}); "
                        f"copy bandwidth {ctx.bandwidth / 1e9:.0f} GB/s")
    for col in ("workload", "quadrant", "peer", "peer figure", "ratio", "note"):
        table.add_column(col, justify="left" if col in ("workload", "peer", "note") else "right")
    for r in ctx.rows:
        table.add_row(r.workload, f"{r.ours:,.1f} {r.unit}", r.peer_name,
                      "-" if r.peer is None else f"{r.peer:,.1f}", "-" if r.ratio is None else f"{r.ratio:.2f}x", r.note)
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"ratio": r.ratio} for r in ctx.rows], indent=1))


if __name__ == "__main__":
    main()
