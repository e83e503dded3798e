"""Tensor parallelism on the CPU: the multi-process engine against one process on the same cores,
and the bytes its collectives move per token against the analytic count.

    python benchmarks/parallel_cpu.py [--model smollm2:135m] [--tp 3] [--dummy-tp 2]

Two models: the shipped GGUF (SmolLM2-135M: 9 heads, 3 KV heads, so tp=3) as users run it, and a
wider llama shape with random weights (`--load-format dummy`, 16 heads, tp=2). On one machine the
ranks share its cores: tp > 1 can only win where one process leaves cores idle, so this measures
what splitting costs (collectives, per-step messages, smaller matmuls), honestly reported. The
peer is tp=1 of the same engine, in the same run.

Collective bytes: two worker processes run decode steps of the dummy shape with every
torch.distributed collective counted (the tensors handed to all_reduce / all_gather, per rank),
next to the count the layer plan predicts: per step, the embedding's and each layer's two
row-parallel outputs [B, H] summed, and the LM head's [B, V / tp] logits gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from quadrant.benchmark import synthetic_prompt
from quadrant.config import CacheConfig, SchedulerConfig
from quadrant.engine.engine import LLMEngine
from quadrant.sampling_params import SamplingParams

DUMMY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 1024,
         "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def measure(model: str, tp: int, prompt_tokens: int, decode_tokens: int, concurrency: int, **options) -> dict:
    start = time.perf_counter()
    engine = LLMEngine.from_model(model, tensor_parallel_size=tp, cache=CacheConfig(kv_cache_memory=512 * 2**20),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=prompt_tokens), **options)
    load = time.perf_counter() - start
    vocab = engine.model_config.vocab_size
    try:
        greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        list(engine.stream(synthetic_prompt(16, vocab, seed=0), greedy))  # warm-up
        t = time.perf_counter()
        list(engine.stream(synthetic_prompt(prompt_tokens, vocab, seed=1), greedy))
        prefill = prompt_tokens / (time.perf_counter() - t)
        decode = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
        rates = []
        for r in range(3):
            outs = list(engine.stream(synthetic_prompt(16, vocab, seed=2 + r), decode))
            first, last = outs[0].metrics["first_token"], outs[-1].metrics["finished"]
            rates.append((decode_tokens - 1) / (last - first))
        for i in range(concurrency):
            engine.add_request(synthetic_prompt(16, vocab, seed=10 + i), decode)
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        batched = concurrency * decode_tokens / (time.perf_counter() - t)
    finally:
        engine.shutdown()
    return {"load_s": load, "prefill": prefill, "decode": statistics.median(rates), "batched": batched}


# -- collective bytes ------------------------------------------------------------------------------
def _count_collectives(rank: int, config_path: str, port: int, batch: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from quadrant.config import EngineConfig, ParallelConfig
    from quadrant.engine.step import NewRequest, ScheduledRow, StepInput
    from quadrant.engine.worker import Worker
    from quadrant.loader.source import open_config
    from quadrant.parallel.groups import ParallelState

    torch.set_num_threads(1)
    parallel = ParallelConfig(tensor_parallel_size=2)
    config = EngineConfig(config_path, load_format="dummy", cache=CacheConfig(num_blocks=64, block_size=16),
                          parallel=parallel)
    state = ParallelState.initialize(parallel, rank, "cpu", f"tcp://127.0.0.1:{port}")
    worker = Worker(config, open_config(config_path), "dense", state)
    worker.init_cache(64, 1024)
    counted = {"all_reduce": 0, "all_gather": 0}
    real = {name: getattr(dist, name) for name in counted}

    def counting(name):
        def call(*args, **kwargs):
            tensor = args[0] if name == "all_reduce" else args[1]
            counted[name] += tensor.numel() * tensor.element_size()
            return real[name](*args, **kwargs)
        return call

    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    prompt = [1, 2, 3, 4]
    worker.execute(StepInput(new_requests=[NewRequest(str(i), prompt, [], params, None, [i]) for i in range(batch)],
                             rows=[ScheduledRow(str(i), 0, len(prompt)) for i in range(batch)]))
    for name in counted:
        setattr(dist, name, counting(name))
    for step in range(steps):
        from quadrant.engine.step import CachedRequest

        worker.execute(StepInput(cached_requests=[CachedRequest(str(i), [5], []) for i in range(batch)],
                                 rows=[ScheduledRow(str(i), len(prompt) + step, 1) for i in range(batch)]))
    if rank == 0:
        Path(out).write_text(json.dumps({k: v / (steps * batch) for k, v in counted.items()}))
    dist.destroy_process_group()


def collective_bytes(batch: int = 4, steps: int = 8) -> tuple[dict, dict]:
    import multiprocessing as mp
    import socket
    import sys

    # Spawned workers import this module by name (when it is loaded from its path, not run).
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(DUMMY))
        out = str(Path(tmp) / "bytes.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_count_collectives, args=(r, str(cfg), port, batch, steps, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        measured = json.loads(Path(out).read_text())
    h, layers, vocab, tp, fp32 = DUMMY["hidden_size"], DUMMY["num_hidden_layers"], DUMMY["vocab_size"], 2, 4
    analytic = {"all_reduce": (1 + 2 * layers) * h * fp32, "all_gather": -(-vocab // tp) * fp32}
    return measured, analytic


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--tp", type=int, default=3, help="tensor-parallel size for --model")
    p.add_argument("--dummy-tp", type=int, default=2, help="tensor-parallel size for the dummy llama shape")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dummy = Path(tmp) / "config.json"
        dummy.write_text(json.dumps(DUMMY))
        for label, model, tp, options in ((args.model, args.model, args.tp, {}),
                                          ("llama 16x1024 (random)", str(dummy), args.dummy_tp,
                                           {"load_format": "dummy"})):
            one = measure(model, 1, args.prompt_tokens, args.decode_tokens, args.concurrency, **options)
            many = measure(model, tp, args.prompt_tokens, args.decode_tokens, args.concurrency, **options)
            rows.append((label, tp, one, many))
    table = Table(title=f"tensor parallel vs one process, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
                        f"torch {torch.__version__}, {date.today()}")
    for col in ("model", "workload", "tp=1", "tp=N", "ratio"):
        table.add_column(col)
    for label, tp, one, many in rows:
        for key, name in (("prefill", f"prefill {args.prompt_tokens} tok/s"), ("decode", "batch-1 decode tok/s"),
                          ("batched", f"{args.concurrency} concurrent, output tok/s"), ("load_s", "load s")):
            table.add_row(f"{label} (tp={tp})", name, f"{one[key]:.1f}", f"{many[key]:.1f}",
                          f"{many[key] / one[key]:.2f}x")
    measured, analytic = collective_bytes()
    for name in ("all_reduce", "all_gather"):
        table.add_row("llama 16x1024 (random, tp=2)", f"{name} bytes/token/rank", f"{analytic[name]:,.0f} (plan)",
                      f"{measured[name]:,.0f}", f"{measured[name] / analytic[name]:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
