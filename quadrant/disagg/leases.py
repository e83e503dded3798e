"""The prefill side's leases: prompts whose KV waits for a decode engine, and what may be read of them.

A lease starts in one of two ways. Held: a finished prompt's blocks (or, for --tp/--ep engines, a host
copy of them) wait until the decode side says done or `lease_seconds` pass. Expected (overlapped
transfers): the router named the transfer when it sent the prompt, so the lease exists while the
prompt is computed and the engine reports its progress (`start_step`, `layer_done`, `end_step`). In
the step that finishes the prompt, a positional pull is ready once the layers it asks for are written,
while later layers still run. (Earlier chunks are not read early: until that step the request could
still be preempted and its blocks reused.) An expected lease does not expire (its request frees the
blocks): it turns into a held one when the request finishes, right after that step, or ends with it
(scheduler.finish cancels it whatever the reason). A decode engine that no longer wants a transfer
abandons it: an expected lease then ends as soon as its prompt is done.

Thread-safe: the engine thread updates, the KV server thread reads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from quadrant.disagg.protocol import RemoteKV
from quadrant.disagg.transport import Wait
from quadrant.engine.request import Request
from quadrant.layers.attention import LayerKVCache

log = logging.getLogger(__name__)

UNKNOWN_WAIT_SECONDS = 10.0  # a positional pull may reach the server before its prompt reaches the engine
_ENDED_MEMORY = 4096  # ended transfer ids remembered, so that a late positional pull is refused at once


@dataclass
class Lease:
    request: Request | None  # whose blocks to free when the lease ends (None: free already, or not its to free)
    block_ids: tuple[int, ...] | None  # the prompt's blocks, in order (None: expected, still being computed)
    prompt_digest: str  # of the prompt they hold: a pull must name it
    num_tokens: int
    deadline: float  # inf while expected
    readers: int = 0  # pulls reading the blocks right now: the lease cannot end under them
    copy: list[LayerKVCache] | None = None  # staged: host copies of the blocks, in the prompt's order
    remote: RemoteKV | None = None  # once held: what the prefill engine answered (the first token)
    in_place: bool = True  # the blocks are read from the engine's own cache (else from `copy`, once held)
    # An expected lease's progress in the step running now.
    step_end: int = 0  # tokens the running step computes up to (0: none running)
    step_layers: int = 0  # layers that step has written
    events: list[Any] = field(default_factory=list)  # CUDA: an event per layer written, recorded after it
    wanted: set[int] = field(default_factory=set)  # layer counts parked pulls wait for (when to wake the server)
    cancelled: bool = False  # ended while a pull read it (aborted, released): freed when the pull ends
    abandoned: bool = False  # expected, and the decode side gave up on it: ends when its prompt is done

    def ready(self, layers_end: int) -> bool | None:
        """Whether layers [0, layers_end) hold the whole prompt (and will until the lease ends); None:
        written by the host, but the GPU may not have got there yet."""
        if self.block_ids is not None:
            return True
        if not self.in_place or self.step_end != self.num_tokens or layers_end > self.step_layers:
            return False  # (a --tp/--ep engine's copy is taken when the prompt is done)
        return True if not self.events or layers_end == 0 or self.events[layers_end - 1].query() else None


class LeaseTable:
    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._to_free: list[Request] = []
        self.expiries = 0
        self.released = 0

    # -- the engine thread -------------------------------------------------------------------------
    def expect(self, transfer_id: str, req: Request, digest: str, in_place: bool) -> None:
        """An overlapped transfer: its prompt arrived; ValueError if the id is taken."""
        with self._lock:
            if transfer_id in self._leases or transfer_id in self._ended:
                raise ValueError(f"kv_transfer_params: transfer_id {transfer_id} is already in use")
            self._leases[transfer_id] = Lease(req if in_place else None, None, digest, len(req.prompt_ids),
                                              math.inf, in_place=in_place)

    def add(self, transfer_id: str, req: Request | None, remote: RemoteKV,
            copy: list[LayerKVCache] | None = None) -> None:
        """A finished prompt's KV, held: a new lease, or an expected one now complete."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None:
                lease = self._leases[transfer_id] = Lease(req, remote.block_ids, remote.prompt_digest,
                                                          remote.num_tokens, 0.0, in_place=copy is None)
            lease.request, lease.block_ids, lease.copy, lease.remote = req, remote.block_ids, copy, remote
            lease.step_end = 0
            # An abandoned one is freed at the next drain: nobody will pull it.
            lease.deadline = 0.0 if lease.abandoned else time.monotonic() + self.lease_seconds

    def cancel(self, transfer_id: str, req: Request) -> bool:
        """An expected lease's request ended without its prompt done (aborted, failed). True: a pull is
        reading its blocks, and the lease frees them when it ends; False: the caller frees them."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or lease.block_ids is not None:
                return False
            if lease.readers and lease.in_place:
                lease.cancelled, lease.request, lease.deadline = True, req, 0.0
                return True
            self._end(transfer_id)
            return False

    def abandon(self, transfer_id: str) -> None:
        """The decode side gave up on the transfer (its request ended): a held lease is released, an
        expected one ends when its prompt is done, an unknown one is refused when it comes."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None:
                self._remember_ended(transfer_id)
            elif lease.block_ids is None:
                lease.abandoned = True
            elif not lease.cancelled:
                lease.deadline = 0.0  # no expiry counted: see take_freeable
                lease.cancelled = True

    def refuse(self, transfer_id: str) -> None:
        """The prefill engine turned the transfer's prompt away (a 4xx before it was queued): pulls parked
        for it are refused now, not after UNKNOWN_WAIT_SECONDS."""
        with self._lock:
            if transfer_id not in self._leases:
                self._remember_ended(transfer_id)

    def start_step(self, scheduled: list[tuple[Request, int]]) -> list[Lease]:
        """A step starts with these (request, new tokens); the expected leases among them."""
        out = []
        with self._lock:
            for req, num_new in scheduled:
                lease = self._leases.get(req.kv_transfer_id or "")
                if lease is not None and lease.block_ids is None and lease.request is req:
                    lease.step_end, lease.step_layers, lease.events = req.num_computed_tokens + num_new, 0, []
                    out.append(lease)
        return out

    def layer_done(self, leases: list[Lease], event: Any = None) -> bool:
        """One more layer written; whether a parked pull waits for exactly this many."""
        with self._lock:
            for lease in leases:
                lease.step_layers += 1
                if event is not None:
                    lease.events.append(event)
            return any(lease.step_layers in lease.wanted for lease in leases)

    def end_step(self, leases: list[Lease]) -> None:
        """The step ended: until their requests finish (right after), its prompts are not read."""
        with self._lock:
            for lease in leases:
                lease.step_end, lease.step_layers, lease.events = 0, 0, []

    def take_freeable(self, now: float | None = None) -> list[Request]:
        """Requests whose blocks may be freed now: released, or expired (and not being read)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for tid, lease in list(self._leases.items()):
                if lease.deadline <= now and lease.readers == 0:
                    self._end(tid)
                    self._free(lease)
                    if not lease.cancelled and not lease.abandoned:
                        self.expiries += 1
                        log.warning("KV lease %s expired: no decode engine pulled its blocks in time", tid)
            out, self._to_free = self._to_free, []
            return out

    # -- the KV server thread ----------------------------------------------------------------------
    def pin(self, transfer_id: str, block_ids: list[int] | None, first_block: int, count: int, digest: str,
            layers_end: int) -> tuple[Lease, list[int]] | Wait | None:
        """The lease and where its requested blocks are (block ids of the cache, or rows of the copy),
        pinned until unpin; Wait if they are not written yet; None if they may not be read. Only the
        lease's own blocks, in their order, for the prompt they hold may be read."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None:
                positional = block_ids is None and transfer_id not in self._ended
                return Wait(UNKNOWN_WAIT_SECONDS) if positional else None
            if lease.cancelled or lease.abandoned or digest != lease.prompt_digest or first_block < 0 or count < 0:
                return None
            if lease.block_ids is None:
                if block_ids is not None:
                    return None  # block ids are named only for a held prompt
                ready = lease.ready(layers_end)
                if not ready:
                    lease.wanted.add(layers_end)
                    return Wait(self.lease_seconds, soon=ready is None)
                assert lease.request is not None
                rows = list(lease.request.block_table[first_block:first_block + count])
            else:
                rows = list(lease.block_ids[first_block:first_block + count])
                if block_ids is not None and rows != block_ids:
                    return None
                if lease.copy is not None:
                    rows = list(range(first_block, first_block + len(rows)))
            if len(rows) != count:
                return None
            lease.readers += 1
            return lease, rows

    def unpin(self, transfer_id: str) -> None:
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is not None:
                lease.readers -= 1

    def release(self, transfer_id: str) -> RemoteKV | Wait | None:
        """The decode side has the blocks: free them (on the engine thread's next drain). Wait while the
        prompt is still computed (the answer carries its first token)."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or lease.cancelled:
                return None
            if lease.block_ids is None:
                return Wait(self.lease_seconds)
            self.released += 1
            if lease.readers:  # another reader (a decode step retried elsewhere) is not done: free after it
                lease.deadline, lease.cancelled = 0.0, True
            else:
                self._end(transfer_id)
                self._free(lease)
            return lease.remote

    # -- both --------------------------------------------------------------------------------------
    def _end(self, transfer_id: str) -> None:
        del self._leases[transfer_id]
        self._remember_ended(transfer_id)

    def _remember_ended(self, transfer_id: str) -> None:
        self._ended[transfer_id] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _free(self, lease: Lease) -> None:
        if lease.request is not None:
            self._to_free.append(lease.request)

    def next_deadline(self) -> float | None:
        """The next expiry that housekeeping can act on (a lease being read waits for its reader)."""
        with self._lock:
            return min((lease.deadline for lease in self._leases.values()
                        if not lease.readers and lease.deadline < math.inf), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)
