"""Executors: how the engine's steps reach the workers that run the model.

The engine (the driver: scheduler, detokeniser, API) only ever calls an executor:
`execute(StepInput) -> StepOutput`, or `submit(StepInput) -> Future` to schedule the next step
while this one runs (overlapped scheduling: the in-process worker runs submitted steps on a
compute thread of its own). `InProcessExecutor` holds one Worker in the engine's own process. `MultiProcessExecutor` spawns tp x ep worker processes joined by torch.distributed
(gloo on CPU, NCCL on CUDA); the driver sends each step to rank 0 over a pipe, rank 0
broadcasts it to the other ranks, every rank runs its shard of the model, and rank 0 sends the
sampled tokens back. Several machines join one rendezvous (`run_headless_workers` on every node
but the first). A worker on the driver's machine that dies, for whatever reason, fails the step
within about a second (`WorkerDiedError`; a rank on another machine shows when a collective with it
fails), and every worker is torn down: none outlives the process that started it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import torch
import torch.distributed as dist

from quadrant.config import EngineConfig
from quadrant.engine.step import StepInput, StepOutput
from quadrant.engine.worker import Worker
from quadrant.errors import QuadrantError
from quadrant.loader.source import ModelSource, open_config, open_pulled
from quadrant.parallel.groups import ParallelState

log = logging.getLogger(__name__)


class WorkerDiedError(QuadrantError, RuntimeError):
    """A worker process exited or failed: the engine cannot run another step."""


class Executor(Protocol):
    def available_kv_blocks(self) -> int:
        """KV blocks every worker can hold (the smallest over the ranks)."""

    def init_cache(self, num_blocks: int, max_model_len: int) -> None: ...

    def execute(self, step: StepInput) -> StepOutput: ...

    def submit(self, step: StepInput) -> Future[StepOutput]:
        """Start a step and return at once; steps run in the order submitted."""
        ...

    def expert_load(self) -> dict[str, list[int]]: ...

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]:
        """Host copies of KV blocks with all the model's heads, per layer (Worker.read_kv_blocks)."""
        ...

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None: ...

    def reset_expert_stats(self) -> None: ...

    def rebalance_experts(self) -> dict[str, list[int]]: ...

    def shutdown(self) -> None: ...


def _compute_thread_setup(threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread


def completed(value: StepOutput) -> Future[StepOutput]:
    """A step that already ran, as the future submit() would have returned."""
    fut: Future[StepOutput] = Future()
    fut.set_result(value)
    return fut


class InProcessExecutor:
    def __init__(self, config: EngineConfig, source: ModelSource, weight_format: str) -> None:
        self.worker = Worker(config, source, weight_format)
        self._compute: ThreadPoolExecutor | None = None  # the thread submitted steps run on, made on first use

    def available_kv_blocks(self) -> int:
        return self.worker.available_kv_blocks()

    def init_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.worker.init_cache(num_blocks, max_model_len)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def submit(self, step: StepInput) -> Future[StepOutput]:
        if self._compute is None:
            # The compute thread takes the engine thread's thread count (OpenMP's is per thread, and the
            # compiled decode graphs were traced with it).
            threads, device = torch.get_num_threads(), torch.device(self.worker.config.device)
            if device.type == "cuda" and device.index is None:  # a bare "cuda": the GPU the weights are on
                device = next(self.worker.model.parameters()).device
            self._compute = ThreadPoolExecutor(1, "quadrant-compute", initializer=_compute_thread_setup,
                                               initargs=(threads, device))
        return self._compute.submit(self.worker.execute, step)

    def expert_load(self) -> dict[str, list[int]]:
        return self.worker.expert_load()

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]:
        data = self.worker.read_kv_blocks(block_ids)
        assert data is not None
        return data

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None:
        self.worker.write_kv_blocks(block_ids, data)

    def reset_expert_stats(self) -> None:
        self.worker.reset_expert_stats()

    def rebalance_experts(self) -> dict[str, list[int]]:
        return self.worker.rebalance_experts()

    def shutdown(self) -> None:
        if self._compute is not None:
            self._compute.shutdown(wait=True, cancel_futures=True)
            self._compute = None


class MultiProcessExecutor:
    def __init__(self, config: EngineConfig, weight_format: str) -> None:
        self.parallel = config.parallel
        assert self.parallel.node_rank == 0, "the driver runs on node 0; other nodes run run_headless_workers"
        port = self.parallel.master_port or _free_port()
        init_method = f"tcp://{self.parallel.master_addr}:{port}"
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._procs: list[BaseProcess] = []
        self._dead = False
        self._num_calls = 0  # each call is numbered; a reply to an earlier, interrupted call is dropped
        for rank in range(self.parallel.nprocs_per_node):
            proc = ctx.Process(target=_worker_main, name=f"quadrant-worker-{rank}", daemon=True,
                               args=(config, weight_format, rank, init_method, child if rank == 0 else None,
                                     os.getpid()))
            proc.start()
            self._procs.append(proc)
        child.close()
        self._num_blocks = self._receive(0)

    def available_kv_blocks(self) -> int:
        return int(self._num_blocks)

    def init_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._call("init_cache", num_blocks, max_model_len)

    def execute(self, step: StepInput) -> StepOutput:
        return self._call("execute", step)

    def submit(self, step: StepInput) -> Future[StepOutput]:
        # Synchronous: the ranks other than 0 learn sampled tokens only from the driver, so the engine
        # never overlaps steps here (LLMEngine.overlap is off).
        return completed(self.execute(step))

    def expert_load(self) -> dict[str, list[int]]:
        return self._call("expert_load")

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]:
        return self._call("read_kv_blocks", block_ids)

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None:
        self._call("write_kv_blocks", block_ids, data)

    def reset_expert_stats(self) -> None:
        self._call("reset_expert_stats")

    def rebalance_experts(self) -> dict[str, list[int]]:
        return self._call("rebalance_experts")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _call(self, method: str, *args: Any) -> Any:
        if self._dead:
            raise WorkerDiedError("the engine's worker processes are gone")
        self._num_calls += 1
        try:
            self._conn.send((method, args, self._num_calls))
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._fail("rank 0 stopped taking work")
        return self._receive(self._num_calls)

    def _receive(self, call: int) -> Any:
        """Rank 0's answer to call number `call`; raises WorkerDiedError as soon as any local worker is
        gone instead. (A caller interrupted mid-call, Ctrl-C, leaves its reply behind: skipped here.)"""
        sentinels = {p.sentinel: p for p in self._procs}
        while True:
            ready = wait([self._conn, *sentinels], timeout=1.0)
            if self._conn in ready:
                try:
                    status, answered, value = self._conn.recv()
                except (EOFError, OSError):
                    self._fail("rank 0 closed its connection")
                if status == "error":
                    self._fail(value)
                if answered != call:
                    continue
                return value
            for s in ready:
                proc = sentinels[s]  # type: ignore[index]
                proc.join(timeout=1.0)  # reap it, for its exit code
                self._fail(f"{proc.name} exited with code {proc.exitcode}")

    def _fail(self, why: str) -> None:
        self._dead = True
        self.shutdown()
        raise WorkerDiedError(f"a worker process failed: {why}")

    def shutdown(self) -> None:
        if not self._procs:
            return
        if not self._dead:
            try:
                self._conn.send(("shutdown", (), 0))
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=5.0 if not self._dead else 0.5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        self._procs = []
        self._conn.close()


def make_executor(config: EngineConfig, source: ModelSource, weight_format: str) -> Executor:
    if config.parallel.world_size == 1:
        return InProcessExecutor(config, source, weight_format)
    config.parallel.check_model(source.config)  # one clear error before any process starts
    if config.parallel.eplb_interval and weight_format != "dense":
        raise ValueError(f"--eplb-interval moves float expert weights between ranks; this model loads as "
                         f"{weight_format}: use --weight-format dense")
    return MultiProcessExecutor(config, weight_format)


def open_source(config: EngineConfig) -> ModelSource:
    return open_config(config.model) if config.load_format == "dummy" else open_pulled(config.model)


def resolve_weight_format(config: EngineConfig, source: ModelSource) -> str:
    """The format the weights run in: the config's, or for `auto` the checkpoint's natural one."""
    if config.load_format == "dummy":
        return "dense"
    if config.weight_format == "auto":
        return source.default_weight_format(config.device)
    return config.weight_format


def run_headless_workers(config: EngineConfig) -> int:
    """This machine's share of the workers of an engine whose driver runs on node 0; returns when
    they exit (the driver shut them down, or one failed), with the first non-zero exit code."""
    p = config.parallel
    source = open_source(config)
    p.check_model(source.config)
    weight_format = resolve_weight_format(config, source)
    init_method = f"tcp://{p.master_addr}:{p.master_port}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, name=f"quadrant-worker-{p.node_rank * p.nprocs_per_node + i}",
                         args=(config, weight_format, p.node_rank * p.nprocs_per_node + i, init_method, None,
                               os.getpid()))
             for i in range(p.nprocs_per_node)]
    for proc in procs:
        proc.start()
    code = 0
    for proc in procs:
        proc.join()
        code = code or (proc.exitcode or 0)
    return code


# -- the worker process ------------------------------------------------------------------------
def _worker_main(config: EngineConfig, weight_format: str, rank: int, init_method: str,
                 conn: Connection | None, parent: int) -> None:
    """Join the group, load this rank's shard, then run the driver's calls until told to stop."""
    # Ctrl-C and SIGTERM reach the whole process group; the driver drains, then stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    try:
        _serve(config, weight_format, rank, init_method, conn)
    except BaseException as e:  # noqa: BLE001 - any failure ends this worker, loudly, and the driver sees it
        text = f"rank {rank}: {type(e).__name__}: {e}"
        traceback.print_exc()
        if conn is not None:
            try:
                conn.send(("error", 0, text))
            except OSError:
                pass
        os._exit(1)
    os._exit(0)


def _serve(config: EngineConfig, weight_format: str, rank: int, init_method: str, conn: Connection | None) -> None:
    p = config.parallel
    local_rank = rank % p.nprocs_per_node
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        config.device = f"cuda:{local_rank}"
    else:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.nprocs_per_node))
    state = ParallelState.initialize(p, rank, device.type, init_method)
    # Every rank runs the driver's engine config (block size, dtype, formats, redundant experts: they
    # must agree), with the model at this machine's own path.
    shared: list[Any] = [(config, weight_format)]
    dist.broadcast_object_list(shared, src=0, group=state.control_group)
    driver_config, weight_format = shared[0]
    driver_config.model, driver_config.device = config.model, config.device
    config = driver_config
    state.num_redundant_experts = config.parallel.num_redundant_experts
    worker = Worker(config, open_source(config), weight_format, state)
    blocks = torch.tensor([worker.available_kv_blocks()])
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=state.control_group)
    if conn is not None:
        conn.send(("ok", 0, int(blocks)))
    while True:
        method, args, call = _next_call(conn, state)
        if method == "shutdown":
            break
        if method == "idle":
            continue
        result = getattr(worker, method)(*args)
        if conn is not None:
            conn.send(("ok", call, result))
    dist.destroy_process_group()


_IDLE_BROADCAST_S = 60.0  # well inside the group's timeout, which a rank waiting on a broadcast would hit


def _next_call(conn: Connection | None, state: ParallelState) -> tuple[str, tuple, int]:
    """Rank 0 reads the driver's call and broadcasts it; the others receive it. While the driver is
    quiet, rank 0 broadcasts an idle call now and then, so no waiting rank times out."""
    box: list[Any] = [None]
    if conn is not None:
        try:
            box[0] = conn.recv() if conn.poll(_IDLE_BROADCAST_S) else ("idle", (), 0)
        except EOFError:  # the driver is gone without a word: stop with the others
            box[0] = ("shutdown", (), 0)
    if state.world_size > 1:
        dist.broadcast_object_list(box, src=0, group=state.control_group)
    return box[0]


def _die_with_parent(parent: int) -> None:
    """End this worker when the process that started it (pid `parent`) dies, however it dies (no
    orphans). A watch thread, not prctl(PR_SET_PDEATHSIG): that fires when the spawning *thread*
    ends, and servers load their engine on a thread that ends once loading is done."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="quadrant-parent-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
