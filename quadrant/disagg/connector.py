"""The engine's KV connector for prefill/decode disaggregation (vLLM's v1 connector, split the same way).

Scheduler side (pure bookkeeping, called on the engine thread): a prefill engine `hold`s a finished
prompt's blocks under a lease instead of freeing them, and gets back the `RemoteKV` that the
response carries; `take_released` hands back the requests whose blocks may now be freed (the
decode side said done, or the lease expired). A decode engine calls `start_load` once the
scheduler has given a waiting request its blocks, and `take_finished_loads` to learn which pulls
have ended (and how).

Worker side (threads, next to the KV tensors): the prefill engine's `KVServer` reads leased blocks;
the decode engine's pulls run on a pool of stream threads, each pulling a share of the layers.
Nothing here frees a block itself: the engine thread does, when it drains these queues.

Where the KV tensors live in another process (--tp/--ep worker processes), the blocks are staged
on the host: a prefill engine copies a finished prompt's blocks out of its workers (their head
shards joined: the wire always carries all the model's heads) and frees them at once, and the lease
holds the copy; a decode engine pulls into a host buffer and, on the engine thread, writes it into
its workers, each keeping its own heads. So the two sides' --tp may differ.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import torch

from quadrant.config import KVTransferConfig
from quadrant.disagg.mooncake import endpoint_for
from quadrant.disagg.leases import Lease, LeaseTable
from quadrant.disagg.protocol import KVLayout, KVTransferError, RemoteKV, logprob_record, prompt_digest
from quadrant.disagg.transport import KVClient, KVServer, Wait
from quadrant.engine.request import Request
from quadrant.layers.attention import LayerKVCache
from quadrant.layers.sampler import TokenLogprob

log = logging.getLogger(__name__)
_MAX_LOADS = 64  # pulls a decode engine runs at once (more wait for a coordinator)


class WorkerBlocks(Protocol):
    """KV blocks of workers in other processes (the engine's executor)."""

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]: ...

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None: ...


@dataclass
class TransferStats:
    """Counters for /metrics (both sides)."""

    bytes: int = 0  # KV bytes pulled (decode) or served (prefill)
    seconds: float = 0.0  # wall time of finished pulls
    transfers: int = 0  # finished pulls
    failures: int = 0  # failed pulls
    lease_expiries: int = 0
    leases_released: int = 0
    active_leases: int = 0
    early_reads: int = 0  # prefill: pulls answered while their prompt was still being computed (overlapped)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class _Load:
    request: Request
    remote: RemoteKV
    local_ids: list[int]
    remote_ids: list[int] | None  # None: the blocks at positions first_block, ... (overlapped)
    first_block: int  # position of the first pulled block in the prompt (the ones before were local hits)
    error: str | None = None
    staging: list[LayerKVCache] | None = None  # staged: the pulled blocks, for the workers
    first: tuple[int, TokenLogprob | None] | None = None  # overlapped: the first token, from the final done

    def gone(self) -> bool:
        """Its request ended meanwhile (aborted, or done on its first token): waits for the transfer stop."""
        return self.request.is_finished


class KVConnector:
    """One engine's side of the KV transfer; `role` decides which half runs."""

    def __init__(self, config: KVTransferConfig, layout: KVLayout, caches: list[LayerKVCache] | None,
                 workers: WorkerBlocks | None = None, wakeup: Callable[[], None] | None = None) -> None:
        """`caches`: the engine's KV tensors, read and written in place; None: they live in worker
        processes, reached through `workers` (blocks staged on the host)."""
        if caches is None and workers is None:
            raise ValueError("a KV connector needs the KV tensors or the workers that hold them")
        if caches is None and config.kv_transport == "mooncake":
            raise KVTransferError("--kv-transport mooncake reads KV tensors in place, and --tp/--ep worker "
                                  "processes keep theirs to themselves: use --kv-transport zmq with them")
        self.config = config
        self.layout = layout
        self.caches = caches
        self.workers = workers
        self.wakeup = wakeup or (lambda: None)  # tells an idle engine loop that there is news
        self.stats = TransferStats()
        self.engine_id = uuid.uuid4().hex[:12]
        self.leases = LeaseTable(config.lease_seconds)
        self._stepping: list[Lease] = []  # expected leases in the step running now (prefill)
        self._lock = threading.Lock()  # (before the server thread, which takes it)
        self.server: KVServer | None = None
        self.client: KVClient | None = None
        # The data plane: zmq frames, or Mooncake's one-sided reads of the registered caches.
        self.mooncake = endpoint_for(config.kv_host, caches) if caches is not None \
            and config.kv_transport == "mooncake" and config.role != "both" else None
        if config.role == "prefill":
            # A pin may outlast a read's own time limit (Mooncake's, about transfer_timeout) and its wait
            # for the engine's earlier reads.
            self.server = KVServer(layout, self._pin, self._unpin, self._release, self._abandon,
                                   config.kv_host, config.kv_port, self.mooncake, 2 * config.transfer_timeout + 10)
            log.info("KV server listening on %s:%d", config.kv_host, self.server.port)
        elif config.role == "decode":
            self.client = KVClient(layout, caches, config.transfer_timeout, self.mooncake)
            # One per load in flight: an overlapped load's coordinator waits (idle, in zmq) for its prompt.
            self._coordinators = ThreadPoolExecutor(_MAX_LOADS, thread_name_prefix="quadrant-kv-load")
            self._streams = ThreadPoolExecutor(config.num_streams, thread_name_prefix="quadrant-kv-stream")
        self._loads: set[int] = set()  # id() of the loads in flight (request ids may be reused)
        self._done: list[_Load] = []
        self._event = threading.Event()
        self._closed = False

    @property
    def kv_port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def holds_blocks(self) -> bool:
        """Whether a lease keeps the prompt's blocks in the cache (else it keeps a host copy)."""
        return self.caches is not None

    # -- prefill side ----------------------------------------------------------------------------
    def expect(self, req: Request) -> None:
        """An overlapped transfer's prompt (req.kv_transfer_id) arrived: decode engines may pull it while
        it is computed. ValueError if the id is in use."""
        assert self.server is not None and req.kv_transfer_id is not None
        self.leases.expect(req.kv_transfer_id, req, prompt_digest(req.prompt_ids), self.caches is not None)
        self._notify()  # pulls parked for a transfer not known till now wait for its prompt from here on

    def cancel(self, req: Request) -> bool:
        """An expected prompt's request ended unfinished. True: a pull reads its blocks, which the lease
        frees afterwards; False: the caller frees them."""
        assert req.kv_transfer_id is not None
        taken = self.leases.cancel(req.kv_transfer_id, req)
        self._notify()  # parked pulls learn it now
        return taken

    def refuse(self, transfer_id: str) -> None:
        """An overlapped prefill was refused before it was queued: its parked pulls are refused too."""
        if self.server is not None:
            self.leases.refuse(transfer_id)
            self._notify()

    def start_step(self, scheduled: list[tuple[Request, int]]) -> None:
        """The engine launches a step (request, tokens it computes): expected prompts among them progress."""
        if self.server is not None and len(self.leases):
            self._stepping = self.leases.start_step(scheduled)
            if self._stepping:
                self._notify()  # a load waiting for its prompt's last step may go on

    def layer_done(self) -> None:
        """One more layer of the running step has written its K/V (the model calls this, in order)."""
        if not self._stepping:
            return
        event = None
        if self.caches is not None and self.caches[0].k.is_cuda:  # written once the GPU gets there
            event = torch.cuda.Event()
            event.record()
        if self.leases.layer_done(self._stepping, event):
            self._notify()  # (only at the layer counts pulls wait for: each wake-up takes the GIL from the step)

    def end_step(self) -> None:
        if self._stepping:
            self.leases.end_step(self._stepping)
            self._stepping = []
            self._notify()

    def _notify(self) -> None:
        if self.server is not None:
            self.server.notify()

    def hold(self, req: Request) -> RemoteKV:
        """Keep a finished prompt's KV for a decode engine; the caller must not free its blocks if
        `holds_blocks` (else it frees them now: the lease has a copy)."""
        assert self.server is not None, "only a prefill engine holds KV for others"
        transfer_id = req.kv_transfer_id or f"{self.engine_id}-{uuid.uuid4().hex}"
        prompt = req.prompt_ids
        blocks = tuple(req.block_table[:-(-len(prompt) // self.layout.block_size)])  # the prompt's, not the output's
        first = req.output_ids[0] if req.output_ids else None
        remote = RemoteKV(transfer_id, self.config.kv_host, self.server.port, blocks, len(prompt),
                          prompt_digest(prompt), first, req.logprobs[0] if req.logprobs else None)
        if self.caches is not None:
            self.leases.add(transfer_id, req, remote)
        else:
            assert self.workers is not None
            data = self.workers.read_kv_blocks(list(blocks))
            self.leases.add(transfer_id, None, remote, [LayerKVCache.of_tensors(t, self.layout.quant_group) for t in data])
        self._notify()  # a parked done (overlapped) gets the first token now
        return remote

    def _pin(self, transfer_id: str, block_ids: list[int] | None, first_block: int, count: int, digest: str,
             layers_end: int) -> tuple[list[LayerKVCache], list[int]] | Wait | None:
        """Where the server reads a lease's blocks: the cache's own, or the lease's copy."""
        pinned = self.leases.pin(transfer_id, block_ids, first_block, count, digest, layers_end)
        if pinned is None or isinstance(pinned, Wait):
            return pinned
        lease, rows = pinned
        if lease.block_ids is None:
            with self._lock:
                self.stats.early_reads += 1
        if lease.copy is None:
            assert self.caches is not None
            return self.caches, rows
        return lease.copy, rows

    def _unpin(self, transfer_id: str) -> None:
        self.leases.unpin(transfer_id)
        self.wakeup()  # a lease that expired while read can be freed now

    def _abandon(self, transfer_id: str) -> None:
        self.leases.abandon(transfer_id)
        self.wakeup()  # a held lease can be freed now

    def _release(self, transfer_id: str) -> RemoteKV | Wait | None:
        released = self.leases.release(transfer_id)
        if isinstance(released, RemoteKV):
            self.wakeup()
        return released

    def take_released(self) -> list[Request]:
        """Requests whose leased blocks the engine thread must free now."""
        return self.leases.take_freeable()

    def next_deadline(self) -> float | None:
        """Seconds until the next lease expires (None: no lease)."""
        deadline = self.leases.next_deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # -- decode side -----------------------------------------------------------------------------
    def start_load(self, req: Request, remote: RemoteKV, local_ids: list[int], remote_ids: list[int] | None,
                   first_block: int) -> None:
        """Pull `remote_ids` (None: the blocks from position `first_block` on) from the prefill engine into
        our `local_ids` in the background."""
        load = _Load(req, remote, local_ids, remote_ids, first_block)
        with self._lock:
            self._loads.add(id(load))
        self._coordinators.submit(self._run_load, load)

    def _run_load(self, load: _Load) -> None:
        assert self.client is not None
        remote, client = load.remote, self.client
        # A request that ended already (aborted, or done on its first token) needs no blocks, but the
        # prefill side's lease is still ended.
        if not load.gone():
            self._pull(load)
        gone = load.gone()
        if remote.overlapped and (gone or load.error is not None):
            self._tell(remote, "abandon")  # an expected prompt is then freed once computed, not after a lease
        elif load.error is None:
            answer = self._tell(remote, "done", give_up=load.gone)
            if remote.overlapped and answer is not None and answer.get("first_token_id") is not None:
                token = answer["first_token_id"]
                try:
                    load.first = int(token), logprob_record(int(token), answer.get("first_token_logprob"))
                except (TypeError, ValueError, KeyError) as e:  # the last prompt token then runs here
                    log.warning("KV done for %s carried a malformed first token: %s", remote.transfer_id, e)
        with self._lock:
            self._loads.discard(id(load))
            self._done.append(load)
        self._event.set()
        self.wakeup()

    def _tell(self, remote: RemoteKV, op: str, give_up: Callable[[], bool] | None = None) -> dict | None:
        """Best effort: `done` (the blocks are here) or `abandon`; a lost one only lets the lease run out."""
        assert self.client is not None
        try:
            self.client.request(remote.host, remote.port, {"op": op, "transfer_id": remote.transfer_id}, give_up)
            return self.client.last_header
        except Exception as e:  # noqa: BLE001
            log.info("KV %s for %s not delivered (%s); its lease will expire", op, remote.transfer_id, e)
            return None

    def _pull(self, load: _Load) -> None:
        """The blocks over the streams, a share of the layers each; a failure is left in load.error."""
        assert self.client is not None
        start = time.perf_counter()
        remote = load.remote
        try:
            n = self.layout.num_layers
            # A share of the layers per stream; overlapped, smaller groups in layer order, each pulled as soon
            # as the prefill engine has written it.
            k = min(self.config.num_streams * (4 if remote.overlapped else 1), n)
            bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
            local_ids = load.local_ids
            if remote.overlapped:  # until the prompt's last step starts, here: not in the shared streams
                self.client.request(remote.host, remote.port, {"op": "wait", "transfer_id": remote.transfer_id,
                                                               "first_block": load.first_block,
                                                               "prompt_digest": remote.prompt_digest}, load.gone)
            if self.caches is None:  # staged: pull into host blocks 0..n-1; the engine thread hands them on
                load.staging = self._host_blocks(len(local_ids))
                local_ids = list(range(len(local_ids)))
            futures = [self._streams.submit(self.client.pull, remote.host, remote.port, remote.transfer_id,
                                            load.remote_ids, local_ids, b, load.first_block, remote.prompt_digest,
                                            load.staging, load.gone)
                       for b in bounds]
            self._wait(futures, FIRST_EXCEPTION)
            for f in futures:
                f.cancel()  # after a failure, the ones not started yet (a cancelled future never counts as done)
            self._wait([f for f in futures if not f.cancelled()], ALL_COMPLETED)
            errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
            if errors:
                raise errors[0]
            moved = sum(f.result() for f in futures)
        except Exception as e:  # noqa: BLE001 - reported to the scheduler, which applies the policy
            load.error = f"{type(e).__name__}: {e}"
            log.warning("KV pull of %s failed: %s", load.request.request_id, load.error)
            with self._lock:
                self.stats.failures += 1
            return
        with self._lock:
            self.stats.bytes += moved
            self.stats.seconds += time.perf_counter() - start
            self.stats.transfers += 1

    def _wait(self, futures: list[Future], return_when: str) -> None:
        """concurrent.futures.wait, but ended by shutdown (which cancels queued pulls without telling waiters)."""
        while not wait(futures, 1.0, return_when).done and not self._closed:
            pass
        if self._closed:
            raise KVTransferError("the engine is shutting down")

    def _host_blocks(self, n: int) -> list[LayerKVCache]:
        """Empty host blocks of this engine's layout, all the model's heads."""
        lay = self.layout
        dtype = getattr(torch, lay.cache_dtype.removeprefix("torch."))
        shape = (n, lay.num_kv_heads, lay.block_size, lay.head_dim)
        scales = [(n, lay.num_kv_heads, lay.block_size // lay.quant_group)] * 2 if lay.quant_group else []
        return [LayerKVCache.of_tensors([torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype),
                                         *(torch.empty(s, dtype=torch.float32) for s in scales)], lay.quant_group)
                for _ in range(lay.num_layers)]

    def take_finished_loads(self) -> list[tuple[Request, str | None, tuple[int, TokenLogprob | None] | None]]:
        """Pulls that ended since the last call: (request, None or the error, the first token if an
        overlapped transfer brought one). Called on the engine thread, which (staged) hands the pulled
        blocks to the workers here."""
        with self._lock:
            done, self._done = self._done, []
            self._event.clear()
        for load in done:
            if load.staging is not None and load.error is None and not load.request.is_finished:
                assert self.workers is not None
                self.workers.write_kv_blocks(load.local_ids, [c.tensors() for c in load.staging])
            load.staging = None
        return [(load.request, load.error, load.first) for load in done]

    @property
    def num_loads_in_flight(self) -> int:
        with self._lock:
            return len(self._loads)

    def wait(self, timeout: float) -> None:
        """Block until a pull ends or `timeout` seconds pass (an engine with nothing else to run)."""
        self._event.wait(timeout)

    # -- both ------------------------------------------------------------------------------------
    def snapshot(self) -> TransferStats:
        with self._lock:
            s = TransferStats(**{k: getattr(self.stats, k)
                                 for k in ("bytes", "seconds", "transfers", "failures", "early_reads")})
        if self.server is not None:
            s.bytes = self.server.bytes_sent
        s.lease_expiries, s.leases_released, s.active_leases = self.leases.expiries, self.leases.released, \
            len(self.leases)
        return s

    def shutdown(self) -> None:
        self._closed = True
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self._coordinators.shutdown(wait=False, cancel_futures=True)
            self._streams.shutdown(wait=False, cancel_futures=True)
            self.client.close()
        if self.mooncake is not None:
            self.mooncake.close()
