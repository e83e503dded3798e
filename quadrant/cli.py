"""The `quadrant` command: parse, build configs, call the library.

Bad input of any kind (a missing model, a corrupt file, an out-of-range flag)
ends with one `error: ...` line on stderr and a non-zero exit, never a
traceback (QUADRANT_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from typing import TYPE_CHECKING

from quadrant import envs
from quadrant.errors import QuadrantError

if TYPE_CHECKING:
    from quadrant.config import KVTransferConfig, ParallelConfig

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1, "": 1}
    t = text.strip().lower()
    number = t.rstrip("kmgib")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MiB or 2GiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value)


def engine_kwargs(args: argparse.Namespace) -> dict:
    from quadrant.config import CacheConfig, SchedulerConfig, SpeculativeConfig

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return dict(
        dtype=dtype,
        device=device,
        weight_format=args.weight_format,
        cache=CacheConfig(kv_cache_memory=args.kv_cache_memory, cache_dtype=args.kv_cache_dtype,
                          quant_group=args.kv_quant_group),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs),
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        cuda_graphs=not args.enforce_eager,
        cpu_compile=not args.enforce_eager,
        async_scheduling=args.async_scheduling,
        parallel=parallel_config(args),
        speculative=SpeculativeConfig(args.speculative_method or "none", args.num_speculative_tokens,
                                      args.speculative_model, args.speculative_draft_layers,
                                      tree_branches=args.speculative_tree_branches),
    )


def _run_worker_node(args: argparse.Namespace) -> int:
    from quadrant.config import EngineConfig
    from quadrant.engine.executor import run_headless_workers

    config = EngineConfig(args.model, **engine_kwargs(args))
    print(f"node {args.node_rank}: {config.parallel.nprocs_per_node} workers joining "
          f"{args.master_addr}:{args.master_port}", file=sys.stderr)
    return run_headless_workers(config)


def parallel_config(args: argparse.Namespace) -> "ParallelConfig":
    from quadrant.config import ParallelConfig

    return ParallelConfig(args.tensor_parallel_size, args.expert_parallel_size, args.nnodes, args.node_rank,
                          args.master_addr, args.master_port, args.num_redundant_experts, args.eplb_interval)


def cmd_pull(args: argparse.Namespace) -> None:
    from quadrant.loader import store

    m = store.pull(args.model)
    print(f"{m.name}: {_human_bytes(m.size)}, sha256 {m.sha256[:12]} verified, at {m.path}")


def cmd_list(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from quadrant.loader import store

    table = Table(box=None)
    for col in ("NAME", "ID", "SIZE", "PULLED"):
        table.add_column(col)
    for m in store.list_models():
        when = datetime.fromtimestamp(m.pulled_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(m.name, m.sha256[:12], _human_bytes(m.size), when)
    Console().print(table)


def cmd_ps(args: argparse.Namespace) -> None:
    """The models a running server has loaded (its /api/ps)."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    url = f"http://{args.host}:{args.port}/api/ps"
    headers = {"Authorization": f"Bearer {args.api_key or envs.api_key()}"} if (args.api_key or envs.api_key()) else {}
    try:
        models = httpx.get(url, headers=headers, timeout=10).raise_for_status().json()["models"]
    except httpx.HTTPError as e:
        raise QuadrantError(f"no quadrant server answered at {url}: {e}") from None
    table = Table(box=None)
    for col in ("NAME", "ID", "SIZE", "MEMORY", "CONTEXT", "RUNNING", "UNTIL"):
        table.add_column(col)
    for m in models:
        until = "forever" if m["expires_at"].startswith("9999") else \
            datetime.fromisoformat(m["expires_at"]).astimezone().strftime("%H:%M:%S")
        table.add_row(m["name"], (m.get("digest") or "")[:12], _human_bytes(m.get("size") or 0),
                      _human_bytes(m.get("memory_bytes") or 0), str(m.get("context_length", "")),
                      str(m.get("running_requests", 0)), until)
    Console().print(table)


def cmd_show(args: argparse.Namespace) -> None:
    from quadrant.loader import store
    from quadrant.loader.source import open_model

    info = open_model(store.resolve(args.model)).describe()
    template = info.pop("chat template")
    params = info.get("parameters")
    if params:
        info["parameters"] = f"{params / 1e6:.1f}M" if params < 1e9 else f"{params / 1e9:.2f}B"
    if info.get("size on disk"):
        info["size on disk"] = _human_bytes(info["size on disk"])
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"  {key:<{width}}  {value if value is not None else '-'}")
    print("  chat template:" if template else "  chat template: -")
    if template:
        for line in template.strip().splitlines():
            print(f"    {line}")


def cmd_rm(args: argparse.Namespace) -> None:
    from quadrant.loader import store

    store.remove(args.model)
    print(f"deleted {store.canonical_name(args.model)}")


def cmd_run(args: argparse.Namespace) -> None:
    from quadrant.engine.engine import LLMEngine
    from quadrant.sampling_params import SamplingParams

    prompt = args.prompt if args.prompt is not None else (sys.stdin.read() if not sys.stdin.isatty() else None)
    if not prompt:
        raise QuadrantError('give a prompt: quadrant run MODEL "your question"')
    _check_max_tokens(args.max_tokens)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    # One answer is over before a compiled decode graph would be: run's steps stay eager.
    engine = LLMEngine.from_model(args.model, **{**engine_kwargs(args), "cpu_compile": False})
    tok = engine.require_tokenizer()
    if tok.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = engine.chat_prompt(messages)
    else:
        prompt_ids = engine.encode(prompt)
    start = time.perf_counter()
    first = None
    count = 0
    for out in engine.stream(prompt_ids, params):
        first = first or time.perf_counter()
        count = len(out.outputs[0].token_ids)
        sys.stdout.write(out.outputs[0].text_delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and first is not None:
        end = time.perf_counter()
        decode = (count - 1) / (end - first) if count > 1 else 0.0
        print(
            f"load {engine.load_seconds:.2f}s | prompt {len(prompt_ids)} tokens, {len(prompt_ids) / (first - start):.1f} tok/s"
            f" | {count} tokens generated, {decode:.1f} tok/s",
            file=sys.stderr,
        )


def cmd_bench(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from quadrant.benchmark import run_benchmark

    r = run_benchmark(args.model, args.prompt_tokens, args.decode_tokens, args.concurrency, engine_kwargs(args))
    table = Table(title=f"quadrant bench {args.model} ({torch.get_num_threads()} threads)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("load to first token", f"{r.load_to_first_token_s:.2f} s")
    table.add_row(f"prompt processing ({args.prompt_tokens} tokens)", f"{r.prompt_tokens_per_s:.1f} tok/s")
    table.add_row(f"time to first token ({args.prompt_tokens}-token prompt)", f"{r.ttft_s * 1000:.0f} ms")
    table.add_row("decode, batch 1", f"{r.decode_tokens_per_s:.1f} tok/s")
    table.add_row(f"decode, {r.concurrency} concurrent (aggregate)", f"{r.concurrent_tokens_per_s:.1f} tok/s")
    table.add_row("peak resident memory", f"{r.peak_rss_gib:.2f} GiB")
    if r.speculation is not None:
        s = r.speculation
        table.add_row("speculation: acceptance rate", f"{s['acceptance_rate']:.2f}")
        table.add_row("speculation: tokens per verifying step", f"{s['acceptance_length']:.2f}")
        table.add_row("speculation: verifications / back-offs", f"{s['verifications']:.0f} / {s['backoffs']:.0f}")
    Console().print(table)
    if args.plot:
        from quadrant.benchmark import concurrency_sweep, plot_sweep

        levels = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.concurrency]
        points = concurrency_sweep(args.model, levels, args.decode_tokens, args.prompt_tokens, engine_kwargs(args))
        sweep = Table(title="concurrency sweep (all requests at once)")
        for name in ("concurrent", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"):
            sweep.add_column(name, justify="right")
        for p in points:
            sweep.add_row(str(p.concurrency), f"{p.tokens_per_s:.1f}",
                          *(f"{_quantile(v, q) * 1000:.0f}" for v in (p.ttft_s, p.tpot_s) for q in (0.5, 0.99)))
        Console().print(sweep)
        for path in plot_sweep(points, args.plot, f"quadrant bench {args.model}"):
            print(f"wrote {path}")


def _check_max_tokens(max_tokens: int) -> None:
    # SamplingParams takes 0 (score the prompt only); an answer wants at least one token.
    if max_tokens < 1:
        raise QuadrantError("max_tokens must be an integer >= 1")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _smoothing_arg(text: str) -> float | str | None:
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return float(text)
    except ValueError:
        raise QuadrantError(f"--smoothing takes auto, off or a number in (0, 1), got {text!r}") from None


def cmd_quantize(args: argparse.Namespace) -> None:
    from quadrant.quant.quantize import quantize_model

    r = quantize_model(args.model, args.format, args.output, allow_requantize=args.allow_requantize,
                       group_size=args.group_size, smoothing=_smoothing_arg(args.smoothing), method=args.method,
                       rotate=args.rotate, tune_steps=args.tune_steps, thorough=args.thorough)
    print(f"{r.path}: {r.format}, {r.num_quantized} weights quantised, {_human_bytes(r.bytes_out)} written "
          f"({_human_bytes(r.bytes_in)} as float32)")


def cmd_upcycle(args: argparse.Namespace) -> None:
    from quadrant.upcycle import upcycle

    path = upcycle(args.model, args.output, args.experts, args.top_k, args.seed)
    print(f"{path}: Mixtral layout, {args.experts} experts (top-{args.top_k}), each a copy of the dense FFN")


def _tokenizer(ref: str):  # type: ignore[no-untyped-def]
    from quadrant.loader.source import open_pulled

    return open_pulled(ref).tokenizer()


def _set_arg(text: str) -> tuple[str, object]:
    """--set table.key=value; the value parsed as TOML (numbers, booleans, strings, lists)."""
    from quadrant.train.config import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes table.key=value, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from quadrant.train.data import prepare

    out = prepare(args.inputs, args.output, _tokenizer(args.tokenizer), args.tokenizer, args.format, args.text_key)
    import json

    m = json.loads((out / "manifest.json").read_text())
    print(f"{out}: {m['num_tokens']:,} tokens in {m['num_documents']:,} documents ({m['format']})")


def cmd_train(args: argparse.Namespace) -> None:
    from quadrant.train.config import load_config
    from quadrant.train.trainer import Trainer

    if args.eagle is not None:
        _train_eagle(args)
        return
    if args.config is None:
        raise QuadrantError("quadrant train needs a config (.toml), or --eagle MODEL -o DIR")
    eagle_only = [flag for flag, value in (("--output", args.output), ("--epochs", args.epochs),
                                           ("--passages", args.passages)) if value is not None]
    if eagle_only:
        raise QuadrantError(f"{', '.join(eagle_only)} only apply to --eagle; a config sets its own training")
    config = load_config(args.config, dict(args.set or []))
    tokenizer = _tokenizer(config.tokenizer) if config.checkpoint.export else None
    Trainer(config, tokenizer).run()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Stop gloo's threads before the interpreter tears down (left running, a process can abort at
        # exit with "terminate called without an active exception" after a successful run).
        dist.destroy_process_group()


def _train_eagle(args: argparse.Namespace) -> None:
    from quadrant.train.eagle import EagleTrainConfig, train_eagle

    if args.config is not None or args.set:
        raise QuadrantError("--eagle takes no training config: its options are --output, --epochs and --passages")
    if args.output is None:
        raise QuadrantError("--eagle needs --output DIR, the head's new folder")
    options = {"epochs": args.epochs, "num_passages": args.passages}
    train_eagle(EagleTrainConfig(args.eagle, args.output, **{k: v for k, v in options.items() if v is not None}))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from quadrant.train import checkpoint as ckpt

    path = ckpt.latest(args.checkpoint) or args.checkpoint  # a checkpoint folder, or the folder holding them
    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    out = ckpt.export(path, args.output, tokenizer, getattr(torch, args.dtype))
    print(f"{out}: exported from {path}")


def cmd_chat(args: argparse.Namespace) -> None:
    from quadrant.interactive import chat_loop

    _check_max_tokens(args.max_tokens)
    chat_loop(args.model, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens,
              engine_kwargs=engine_kwargs(args))


def _kv_transfer_config(args: argparse.Namespace) -> "KVTransferConfig":
    from quadrant.config import KVTransferConfig

    kv_host = args.kv_host or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host)
    return KVTransferConfig(role=args.role, kv_host=kv_host, kv_port=args.kv_port, lease_seconds=args.kv_lease_seconds,
                            num_streams=args.kv_streams, load_failure_policy=args.kv_load_failure_policy,
                            kv_transport=args.kv_transport)


def _changed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The flags of `parser` whose values in `args` differ from their defaults, as command-line words."""
    words: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[-1], str(value)]
    return words


def cmd_router(args: argparse.Namespace) -> None:
    import logging

    from quadrant.disagg.router import router_config_from_args, run_router

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if run_router(router_config_from_args(args)):
        raise QuadrantError("the router stopped with an error; see the log above")


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from quadrant.loader import store
    from quadrant.loader.source import open_model
    from quadrant.serve.app import ServerConfig, serve

    if args.disagg:
        from quadrant.disagg.launch import launch_disagg

        if args.role != "both":
            raise QuadrantError("--disagg starts its own prefill and decode workers; leave out --role")
        open_model(store.resolve(args.model, pull_missing=True))  # pull once, before the workers start
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        worker_args = _changed_flags(args.engine_parser, args)
        if args.kv_transport != "zmq":  # both roles must agree on it
            worker_args += ["--kv-transport", args.kv_transport]
        if launch_disagg(args.model, args.disagg, args.host, args.port, worker_args):
            raise QuadrantError("the disaggregated deployment stopped with an error; see the log above")
        return

    from quadrant.serve.model_pool import parse_keep_alive

    extra = {}
    for item in args.models:
        name, _, ref = item.partition("=")
        if not name:
            raise QuadrantError(f"--models takes NAME=MODEL or a catalogue name, got {item!r}")
        extra[name] = ref or name
        open_model(store.resolve(extra[name], pull_missing=True))  # a bad one fails now, in one line
    try:
        keep_alive = parse_keep_alive(args.keep_alive, 300.0)
    except ValueError as e:
        raise QuadrantError(f"--keep-alive: {e}") from None
    config = ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        extra_models=extra,
        serve_pulled=args.serve_pulled and args.role == "both",
        keep_alive=keep_alive,
        max_loaded_models=args.max_loaded_models,
        host=args.host,
        port=args.port,
        api_key=args.api_key or envs.api_key(),
        max_queued_requests=args.max_queued_requests,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        engine_kwargs={**engine_kwargs(args), "kv_transfer": _kv_transfer_config(args), "cpu_compile_at_start": True},
    )
    open_model(store.resolve(args.model, pull_missing=True))  # a bad model fails here, in one line
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    code = serve(config)
    if code:
        raise QuadrantError(f"the model {args.model} failed to load; see the log above")


def build_parser() -> argparse.ArgumentParser:
    from quadrant import __version__
    from quadrant.quant.registry import QUANT_FORMATS, WEIGHT_FORMATS

    p = argparse.ArgumentParser(prog="quadrant", description="Run, serve, quantise and train language models.")
    engine = argparse.ArgumentParser(add_help=False)
    g = engine.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (auto: cuda when there is one)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activation dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--weight-format", choices=["auto", *WEIGHT_FORMATS], default="auto",
                   help="auto: compact weights for decode, bf16 for prefill on CPU (quantised GGUF)")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache budget, e.g. 512MiB (default: one full context)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per forward pass")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto",
                   help="8-bit KV cache: fp8 (GPU) or int8 (CPU), one scale per --kv-quant-group tokens")
    g.add_argument("--kv-quant-group", type=int, default=16, help="tokens per KV scale (per sequence and head)")
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="auto: triton on GPU, torch on CPU")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights of the model's shape; MODEL may name a shipped architecture "
                        "(llama-3-8b, smollm2-135m) or a config.json")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (GPU) or compiled graphs (CPU) for decode steps")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlapped scheduling: prepare step N+1 and stream step N-1 out while step N runs "
                        "(one-process engines without speculation; default off)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1,
                   help="worker processes that split attention and dense MLPs (must divide the heads)")
    g.add_argument("--ep", "--expert-parallel-size", dest="expert_parallel_size", type=int, default=1,
                   help="worker processes that split the MoE experts (must divide the experts); tp x ep in all")
    g.add_argument("--nnodes", type=int, default=1, help="machines running the workers (torchrun-style)")
    g.add_argument("--node-rank", type=int, default=0,
                   help="this machine's rank; 0 runs the driver, the others only their workers")
    g.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (node 0)")
    g.add_argument("--master-port", type=int, default=0, help="rendezvous port (0: any free one, one node only)")
    g.add_argument("--num-redundant-experts", type=int, default=0,
                   help="extra expert slots over the --ep ranks, for copies of the hottest experts")
    g.add_argument("--eplb-interval", type=int, default=0,
                   help="engine steps between expert rebalances by measured load (0: never)")
    g.add_argument("--speculative-method", choices=["ngram", "draft", "eagle"], default=None,
                   help="speculative decoding: ngram (prompt lookup), draft (a draft model) or eagle (a draft "
                        "head from `quadrant train --eagle`, given as --speculative-model)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens drafted per step")
    g.add_argument("--speculative-model", default=None,
                   help="the draft model (default: the target itself, usually with --speculative-draft-layers), "
                        "or the EAGLE head's folder")
    g.add_argument("--speculative-draft-layers", type=int, default=None,
                   help="keep only the draft model's first N layers")
    g.add_argument("--speculative-tree-branches", type=int, default=1,
                   help="draft token trees, verified at once (for GPUs, where extra tokens in a step are "
                        "nearly free; 1: chains). ngram: up to N distinct continuations; eagle: the head "
                        "expands its N likeliest nodes at each depth by their N likeliest tokens (EAGLE-2)")
    p.add_argument("--version", action="version", version=f"quadrant {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("pull", help="download a model into the store")
    s.add_argument("model", help="catalogue name, e.g. smollm2:135m")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("list", aliases=["ls"], help="list pulled models")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("ps", help="models a running server has loaded")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("show", help="describe a model")
    s.add_argument("model", help="name, .gguf file or model folder")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("rm", help="remove a pulled model")
    s.add_argument("model")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("run", help="generate an answer to one prompt, streamed", parents=[engine])
    s.add_argument("model", help="name (pulled on first use), .gguf file or model folder")
    s.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--system", default=None, help="system message")
    s.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    s.add_argument("--verbose", action="store_true", help="print load time and tokens/s to stderr")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help="interactive chat in the terminal", parents=[engine])
    s.add_argument("model", help="name (pulled on first use), .gguf file or model folder")
    s.add_argument("--system", default=None, help="system message")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--max-tokens", type=int, default=1024)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server", parents=[engine])
    s.add_argument("model", help="name (pulled on first use), .gguf file or model folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set QUADRANT_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    s.add_argument("--max-queued-requests", type=int, default=256, help="beyond this backlog, answer 429")
    s.add_argument("--max-body-bytes", type=parse_size, default=4 * 2**20)
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    m = s.add_argument_group("more models (loaded on first request, unloaded when idle)")
    m.add_argument("--models", nargs="+", default=[], metavar="NAME=MODEL",
                   help="more models clients may name (NAME=path or catalogue name; a bare name serves it as itself)")
    m.add_argument("--no-serve-pulled", dest="serve_pulled", action="store_false",
                   help="serve only MODEL and --models, not every pulled model")
    m.add_argument("--keep-alive", default="5m", help="how long an idle on-demand model stays loaded (30s, 5m, 1h; "
                                                     "-1: for good); a request's keep_alive wins")
    m.add_argument("--max-loaded-models", type=int, default=3,
                   help="models loaded at once, MODEL included; a new one unloads the least recently used idle one")
    d = s.add_argument_group("prefill/decode disaggregation")
    d.add_argument("--role", choices=["prefill", "decode", "both"], default="both",
                   help="prefill: run prompts and serve their KV to decode workers; decode: pull the KV, then "
                        "decode; both (default): a colocated server")
    d.add_argument("--kv-host", default=None, help="prefill: address of its KV server (default: --host, or "
                                                   "127.0.0.1 when --host is 0.0.0.0); with --kv-transport mooncake, "
                                                   "on both roles the address Mooncake advertises")
    d.add_argument("--kv-port", type=int, default=0, help="prefill: port of its KV server (0: any free one)")
    d.add_argument("--kv-lease-seconds", type=float, default=60.0,
                   help="prefill: how long a finished prompt's KV waits for a decode worker")
    d.add_argument("--kv-streams", type=int, default=2, help="decode: parallel connections per KV pull")
    d.add_argument("--kv-transport", choices=["zmq", "mooncake"], default="zmq",
                   help="how KV blocks move, the same on both sides: zmq (built in) or Mooncake Transfer Engine's "
                        "one-sided reads (pip install mooncake-transfer-engine-non-cuda; RDMA where built for it)")
    d.add_argument("--kv-load-failure-policy", choices=["recompute", "fail"], default="recompute",
                   help="decode: when a KV pull fails, recompute the prompt here or fail the request")
    d.add_argument("--disagg", metavar="xPyD", default=None,
                   help="start x prefill and y decode workers and a router on --port, on this machine (e.g. 1P1D)")
    s.set_defaults(func=cmd_serve, engine_parser=engine)

    s = sub.add_parser("router", help="the OpenAI front door of prefill and decode workers")
    from quadrant.disagg.router_config import add_router_arguments

    add_router_arguments(s)
    s.set_defaults(func=cmd_router)

    s = sub.add_parser("bench", help="measure load time, prompt and decode speed, memory", parents=[engine])
    s.add_argument("model", help="name, .gguf file or model folder")
    s.add_argument("--prompt-tokens", type=int, default=512)
    s.add_argument("--decode-tokens", type=int, default=128)
    s.add_argument("--concurrency", type=int, default=16)
    s.add_argument("--plot", metavar="DIR", default=None,
                   help="also sweep concurrency 1..N and write throughput.png and latency.png (TTFT/TPOT) into DIR")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("quantize", help="write a quantised copy of a model (safetensors folder)")
    s.add_argument("model", help="name, .gguf file or model folder")
    s.add_argument("--format", required=True, choices=QUANT_FORMATS,
                   help="int8: 8-bit weights; w8a8: + 8-bit activations; w4a16: 4-bit weights (groups of 128); "
                        "w4a8: 4-bit weights + 8-bit activations")
    s.add_argument("-o", "--output", required=True, help="new folder to write (must not exist)")
    s.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="inputs per 4-bit scale (narrower where the width requires)")
    s.add_argument("--smoothing", default="auto",
                   help="SmoothQuant for w8a8/w4a8, calibrated on a shipped text: auto (each layer's best "
                        "strength; w4a8 only where the stream is not rotated), a strength in (0, 1), or off")
    s.add_argument("--method", default="auto", choices=["auto", "gptq", "rtn"],
                   help="rounding of the weights: gptq (error-compensating, calibrated on a shipped "
                        "text), rtn (nearest grid point); auto: gptq for the 4-bit formats where the model has a tokenizer")
    s.add_argument("--rotate", default="auto", choices=["auto", "on", "off"],
                   help="rotate the residual stream first (an exact change of basis that spreads activation "
                        "outliers; the LM head is then stored apart from the embeddings); auto: for w8a8 and w4a8")
    s.add_argument("--tune-steps", type=int, default=None,
                   help="after GPTQ, tune the 4-bit scales, mins and norm gains against the float model on the "
                        "calibration texts for this many steps (0: off; default: 28, or 60 with --thorough, "
                        "for 4-bit models up to 1B parameters)")
    s.add_argument("--thorough", action="store_true",
                   help="the slower tuning recipe: 60 fp32 steps at a lower rate (~1 point of perplexity better "
                        "on the default model, ~3x the tuning time)")
    s.add_argument("--allow-requantize", action="store_true",
                   help="quantise an already quantised model (e.g. a Q4_1 GGUF): the errors add up")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("upcycle", help="turn a dense llama-family model into a Mixtral-layout MoE")
    s.add_argument("model", help="name, .gguf file or model folder")
    s.add_argument("-o", "--output", required=True, help="new folder to write (must not exist)")
    s.add_argument("--experts", type=int, default=4, help="experts per layer, each a copy of the dense FFN")
    s.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    s.add_argument("--seed", type=int, default=0, help="seed of the random router")
    s.set_defaults(func=cmd_upcycle)

    s = sub.add_parser("data", help="training data: `data prepare` tokenises a corpus into shards")
    data = s.add_subparsers(dest="data_command", required=True)
    s = data.add_parser("prepare", help="tokenise text/JSONL/chat JSONL into token shards with a manifest")
    s.add_argument("inputs", nargs="+", help="files or folders (.txt/.md: one document per file; .jsonl: one per line)")
    s.add_argument("-o", "--output", required=True, help="new folder to write (must not exist)")
    s.add_argument("--tokenizer", default="smollm2:135m", help="model whose tokenizer to use")
    s.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "chat"],
                   help="chat: JSONL of {\"messages\": [...]}, rendered with the chat template, loss on "
                        "assistant tokens only")
    s.add_argument("--text-key", default="text", help="JSONL field holding the text")
    s.set_defaults(func=cmd_data_prepare)

    s = sub.add_parser("train", help="train a model from a TOML config (torchrun for several processes), "
                                     "or an EAGLE draft head for a model (--eagle)")
    s.add_argument("config", nargs="?", help="training config (.toml)")
    s.add_argument("--set", action="append", type=_set_arg, metavar="TABLE.KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    s.add_argument("--eagle", metavar="MODEL", default=None,
                   help="train an EAGLE draft head for MODEL on its own answers (use it with "
                        "--speculative-method eagle --speculative-model DIR)")
    s.add_argument("-o", "--output", default=None, help="--eagle: the head's folder (must not exist)")
    s.add_argument("--epochs", type=int, default=None, help="--eagle: passes over the conversations")
    s.add_argument("--passages", type=int, default=None, help="--eagle: chat prompts built from the shipped texts")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="write a training checkpoint as a model folder that run/serve load")
    s.add_argument("checkpoint", help="a checkpoint (step-N folder) or the folder holding them (newest wins)")
    s.add_argument("-o", "--output", required=True, help="new folder to write (must not exist)")
    s.add_argument("--tokenizer", default="smollm2:135m", help="model whose tokenizer to ship with it")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "node_rank", 0) > 0:  # a worker machine: its share of the processes, no driver
            return _run_worker_node(args)
        args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QuadrantError, ValueError, MemoryError, OSError) as e:
        if envs.debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is not installed; run scripts/install.sh", file=sys.stderr)
        return EXIT_ERROR
    return 0
