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
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import torch

from quadrant.config import KVTransferConfig
from quadrant.disagg.mooncake import endpoint_for
from quadrant.disagg.protocol import KVLayout, KVTransferError, RemoteKV, prompt_digest
from quadrant.disagg.transport import KVClient, KVServer
from quadrant.engine.request import Request
from quadrant.layers.attention import LayerKVCache

log = logging.getLogger(__name__)


class WorkerBlocks(Protocol):
    """KV blocks of workers in other processes (the engine's executor)."""

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]: ...

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None: ...


@dataclass
class _Lease:
    request: Request | None  # whose blocks to free when the lease ends (None: they are free already)
    block_ids: tuple[int, ...]  # the prompt's blocks, in order
    prompt_digest: str  # of the prompt they hold: a pull must name it
    deadline: float
    readers: int = 0  # pulls reading the blocks right now: the lease cannot expire under them
    copy: list[LayerKVCache] | None = None  # staged: host copies of the blocks, in the prompt's order


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

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


class LeaseTable:
    """Prefill side: blocks of finished prompts, waiting for the decode side (thread-safe)."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._to_free: list[Request] = []
        self.expiries = 0
        self.released = 0

    def add(self, transfer_id: str, req: Request | None, remote: RemoteKV,
            copy: list[LayerKVCache] | None = None) -> None:
        with self._lock:
            self._leases[transfer_id] = _Lease(req, remote.block_ids, remote.prompt_digest,
                                               time.monotonic() + self.lease_seconds, copy=copy)

    def pin(self, transfer_id: str, block_ids: list[int], first_block: int, digest: str) -> _Lease | None:
        """Only the lease's own blocks, in their order, for the prompt they hold may be read."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or digest != lease.prompt_digest or first_block < 0 \
                    or list(lease.block_ids[first_block:first_block + len(block_ids)]) != block_ids:
                return None
            lease.readers += 1
            return lease

    def unpin(self, transfer_id: str) -> None:
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is not None:
                lease.readers -= 1

    def release(self, transfer_id: str) -> bool:
        """The decode side has the blocks: free them (on the engine thread's next drain)."""
        with self._lock:
            lease = self._leases.pop(transfer_id, None)
            if lease is None:
                return False
            self._free(lease)
            self.released += 1
            return True

    def _free(self, lease: _Lease) -> None:
        if lease.request is not None:
            self._to_free.append(lease.request)

    def take_freeable(self, now: float | None = None) -> list[Request]:
        """Requests whose blocks may be freed now: released, or expired (and not being read)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for tid, lease in list(self._leases.items()):
                if lease.deadline <= now and lease.readers == 0:
                    del self._leases[tid]
                    self._free(lease)
                    self.expiries += 1
                    log.warning("KV lease %s expired: no decode engine pulled its blocks in time", tid)
            out, self._to_free = self._to_free, []
            return out

    def next_deadline(self) -> float | None:
        """The next expiry that housekeeping can act on (a lease being read waits for its reader)."""
        with self._lock:
            return min((lease.deadline for lease in self._leases.values() if not lease.readers), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)


@dataclass
class _Load:
    request: Request
    remote: RemoteKV
    local_ids: list[int]
    remote_ids: list[int]
    error: str | None = None
    staging: list[LayerKVCache] | None = None  # staged: the pulled blocks, for the workers


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
        self.server: KVServer | None = None
        self.client: KVClient | None = None
        # The data plane: zmq frames, or Mooncake's one-sided reads of the registered caches.
        self.mooncake = endpoint_for(config.kv_host, caches) if caches is not None \
            and config.kv_transport == "mooncake" and config.role != "both" else None
        if config.role == "prefill":
            # A pin may outlast a read's own time limit (Mooncake's, about transfer_timeout) and its wait
            # for the engine's earlier reads.
            self.server = KVServer(layout, caches, self._pin, self._unpin, self._release,
                                   config.kv_host, config.kv_port, self.mooncake, 2 * config.transfer_timeout + 10)
            log.info("KV server listening on %s:%d", config.kv_host, self.server.port)
        elif config.role == "decode":
            self.client = KVClient(layout, caches, config.transfer_timeout, self.mooncake)
            self._coordinators = ThreadPoolExecutor(4, thread_name_prefix="quadrant-kv-load")
            self._streams = ThreadPoolExecutor(config.num_streams, thread_name_prefix="quadrant-kv-stream")
        self._loads: set[int] = set()  # id() of the loads in flight (request ids may be reused)
        self._done: list[_Load] = []
        self._lock = threading.Lock()
        self._event = threading.Event()

    @property
    def kv_port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def holds_blocks(self) -> bool:
        """Whether a lease keeps the prompt's blocks in the cache (else it keeps a host copy)."""
        return self.caches is not None

    # -- prefill side ----------------------------------------------------------------------------
    def hold(self, req: Request) -> RemoteKV:
        """Keep a finished prompt's KV for a decode engine; the caller must not free its blocks if
        `holds_blocks` (else it frees them now: the lease has a copy)."""
        assert self.server is not None, "only a prefill engine holds KV for others"
        transfer_id = f"{self.engine_id}-{uuid.uuid4().hex}"
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
        return remote

    def _pin(self, transfer_id: str, block_ids: list[int], first_block: int,
             digest: str) -> tuple[list[LayerKVCache], list[int]] | None:
        """Where the server reads a lease's blocks: the cache's own, or the lease's copy."""
        lease = self.leases.pin(transfer_id, block_ids, first_block, digest)
        if lease is None:
            return None
        if lease.copy is None:
            assert self.caches is not None
            return self.caches, block_ids
        return lease.copy, list(range(first_block, first_block + len(block_ids)))

    def _unpin(self, transfer_id: str) -> None:
        self.leases.unpin(transfer_id)
        self.wakeup()  # a lease that expired while read can be freed now

    def _release(self, transfer_id: str) -> bool:
        released = self.leases.release(transfer_id)
        if released:
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
    def start_load(self, req: Request, remote: RemoteKV, local_ids: list[int], remote_ids: list[int]) -> None:
        """Pull `remote_ids` from the prefill engine into our `local_ids` in the background."""
        load = _Load(req, remote, local_ids, remote_ids)
        with self._lock:
            self._loads.add(id(load))
        self._coordinators.submit(self._run_load, load)

    def _run_load(self, load: _Load) -> None:
        assert self.client is not None
        remote, client = load.remote, self.client
        # A request that ended already (aborted, or done on its first token) needs no blocks, but the
        # prefill side's lease is still released.
        if not load.request.is_finished:
            self._pull(load)
        if load.error is None:
            try:  # best effort: the blocks are here; a lost `done` only lets the lease run out
                client.request(remote.host, remote.port, {"op": "done", "transfer_id": remote.transfer_id})
            except Exception as e:  # noqa: BLE001
                log.info("KV done for %s not delivered (%s); its lease will expire", remote.transfer_id, e)
        with self._lock:
            self._loads.discard(id(load))
            self._done.append(load)
        self._event.set()
        self.wakeup()

    def _pull(self, load: _Load) -> None:
        """The blocks over the streams, a share of the layers each; a failure is left in load.error."""
        assert self.client is not None
        start = time.perf_counter()
        remote = load.remote
        try:
            first_block = len(remote.block_ids) - len(load.remote_ids)  # the leading blocks were local hits
            n = self.layout.num_layers
            k = min(self.config.num_streams, n)
            bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
            local_ids = load.local_ids
            if self.caches is None:  # staged: pull into host blocks 0..n-1; the engine thread hands them on
                load.staging = self._host_blocks(len(load.remote_ids))
                local_ids = list(range(len(load.remote_ids)))
            futures = [self._streams.submit(self.client.pull, remote.host, remote.port, remote.transfer_id,
                                            load.remote_ids, local_ids, b, first_block, remote.prompt_digest,
                                            load.staging)
                       for b in bounds]
            wait(futures)
            moved = sum(f.result() for f in futures)  # the first failure raises here
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

    def _host_blocks(self, n: int) -> list[LayerKVCache]:
        """Empty host blocks of this engine's layout, all the model's heads."""
        lay = self.layout
        dtype = getattr(torch, lay.cache_dtype.removeprefix("torch."))
        shape = (n, lay.num_kv_heads, lay.block_size, lay.head_dim)
        scales = [(n, lay.num_kv_heads, lay.block_size // lay.quant_group)] * 2 if lay.quant_group else []
        return [LayerKVCache.of_tensors([torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype),
                                         *(torch.empty(s, dtype=torch.float32) for s in scales)], lay.quant_group)
                for _ in range(lay.num_layers)]

    def take_finished_loads(self) -> list[tuple[Request, str | None]]:
        """Pulls that ended since the last call: (request, None) or (request, the error). Called on the
        engine thread, which (staged) hands the pulled blocks to the workers here."""
        with self._lock:
            done, self._done = self._done, []
            self._event.clear()
        for load in done:
            if load.staging is not None and load.error is None and not load.request.is_finished:
                assert self.workers is not None
                self.workers.write_kv_blocks(load.local_ids, [c.tensors() for c in load.staging])
            load.staging = None
        return [(load.request, load.error) for load in done]

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
            s = TransferStats(**{k: getattr(self.stats, k) for k in ("bytes", "seconds", "transfers", "failures")})
        if self.server is not None:
            s.bytes = self.server.bytes_sent
        s.lease_expiries, s.leases_released, s.active_leases = self.leases.expiries, self.leases.released, \
            len(self.leases)
        return s

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self._coordinators.shutdown(wait=False, cancel_futures=True)
            self._streams.shutdown(wait=False, cancel_futures=True)
            self.client.close()
        if self.mooncake is not None:
            self.mooncake.close()
