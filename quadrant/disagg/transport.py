"""The reference KV transport: pyzmq over TCP, blocks read straight from the KV tensors (or a lease's host copy).

The prefill engine runs a `KVServer` (one ROUTER socket, one thread): a decode engine's `KVClient`
(DEALER sockets, one per stream) sends a hello with its KV layout, then pulls a leased prompt's
blocks a range of layers at a time; each reply is a multi-part message of one frame per tensor
(K, V, and the 8-bit cache's scales), gathered from the cache and handed to zmq without a copy
(zmq's I/O threads write them to the socket while the server gathers the next reply). Several
streams pull disjoint layer ranges at once. A final `done` ends the prefill side's lease.

Every request carries the layout (a stateless handshake: a pull of mismatched blocks is refused
even after a restart on either side), and a pull names the transfer id, the only key to a lease;
block ids outside that lease are refused.

Overlapped transfers (protocol.RemoteKV.overlapped) pull by position while the prefill engine still
computes the prompt: a request whose layers are not written yet is parked, answered once they are
(the engine's progress wakes the server), and pinged every half second meanwhile, so that the
puller tells a waiting server from a dead one within seconds; a `ready` ping precedes the answer, whose
data may take long to arrive. A `wait` request (a load's first) is answered once the step that
finishes the prompt has started, so a load's pulls do not sit in the puller's streams for the whole
prefill. The final `done` waits for the first token and carries it; `abandon` ends a transfer the
puller no longer wants (its request was aborted).

With a Mooncake endpoint on both sides (disagg/mooncake.py) the data skips zmq: the hello says the
server offers Mooncake reads, a `pin` holds a lease's blocks (until `unpin`, or the server's pin
deadline) and answers with the registered tensors' addresses, and the client reads them one-sidedly
in between; zmq carries only the control messages.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import zmq

from quadrant.disagg.protocol import KVHandshakeError, KVLayout, KVTransferError, RemoteKV
from quadrant.engine.kv_cache import block_bytes, block_runs, scatter_blocks
from quadrant.layers.attention import LayerKVCache

if TYPE_CHECKING:
    from quadrant.disagg.mooncake import MooncakeEndpoint

log = logging.getLogger(__name__)

_SEND_WAIT_MS = 5000  # a reply zmq has not sent in this long (a stalled peer) gives up its staging buffers
_PING_SECONDS = 0.5  # a parked request's server says "still waiting" this often
_SILENCE_MS = 5000  # after a ping, this long without another message means the server is gone
_CONNECT_MS = 3000  # a KV server not connected in this long is unreachable
_SOON_SECONDS = 0.002  # Wait.soon: a GPU layer's event is polled this often


@dataclass(frozen=True)
class Wait:
    """Not ready yet: the server parks the request until `seconds` after the latest such answer."""

    seconds: float
    soon: bool = False  # written, but its GPU work may not have run yet: try again in a few milliseconds


# transfer id, requested block ids (None: by position), their position in the lease's block table,
# how many, the prompt digest the puller expects, the end of the layer range -> None if they may not be
# read, Wait if not yet, else (a pin until `unpin`) the caches to read them from and their blocks there
PinBlocks = Callable[[str, list[int] | None, int, int, str, int], "tuple[list[LayerKVCache], list[int]] | Wait | None"]
# transfer id -> the held prompt's RemoteKV (released), Wait (its prompt is still being computed) or None
ReleaseLease = Callable[[str], "RemoteKV | Wait | None"]


@dataclass
class _Parked:
    ident: bytes
    request: Any
    parked: bool = False
    since: float = 0.0  # when it was first parked
    deadline: float = 0.0
    next_ping: float = 0.0
    retry_at: float = math.inf  # Wait.soon: when to try again without a wake-up


def layer_tensors(cache: LayerKVCache) -> list[torch.Tensor]:
    """The tensors one layer's blocks live in, in wire order (scales only for an 8-bit cache)."""
    return cache.tensors()


class StagingBuffers:
    """Reused host buffers for the gathered blocks of a reply, two replies deep.

    Fresh buffers of a reply's size cost more in page faults than the gather itself (measured: 1 GB/s
    against 9 GB/s into warm memory), so replies alternate between two sets; a set is reused only
    once zmq has finished sending the reply that last used it.
    """

    def __init__(self) -> None:
        self._sets: list[list[torch.Tensor]] = [[], []]
        self._trackers: list[list[Any]] = [[], []]
        self._turn = 0
        self._stream: Any = None  # CUDA: gathers run on a stream of their own (see gather)

    def gather(self, tensors: list[torch.Tensor], index: torch.Tensor) -> list[Any]:
        """Blocks `index` (a host tensor) of each tensor, as host buffers zmq can send without copying."""
        turn, self._turn = self._turn, 1 - self._turn
        try:
            for tracker in self._trackers[turn]:
                tracker.wait(_SEND_WAIT_MS / 1000)  # the reply before last is out of zmq's hands
        except zmq.NotDone:
            # A peer that stopped reading: leave that set to zmq (freed when it lets go) and take new
            # buffers, so one stalled decode engine does not stop the server for the others.
            self._sets[turn] = []
        self._trackers[turn] = []
        bufs = self._sets[turn]
        out = []
        for i, t in enumerate(tensors):
            nbytes = len(index) * block_bytes(t)
            if i == len(bufs):
                bufs.append(torch.empty(0, dtype=torch.uint8))
            if bufs[i].numel() < nbytes:
                bufs[i] = torch.empty(nbytes, dtype=torch.uint8)
            dest = bufs[i][:nbytes].view(t.dtype).view(len(index), *t.shape[1:])
            if t.device.type == "cpu":
                torch.index_select(t, 0, index, out=dest)
            else:
                # Not on the engine's stream, where the copy would queue behind the whole step it is
                # running: the layers read have been written (their events are done, leases.Lease.ready).
                if self._stream is None:
                    self._stream = torch.cuda.Stream(t.device)
                with torch.cuda.stream(self._stream):
                    dest.copy_(t.index_select(0, index.to(t.device)))
            out.append(dest.view(torch.uint8).numpy())
        return out

    def track(self, trackers: list[Any]) -> None:
        """The send trackers of the reply just gathered."""
        self._trackers[1 - self._turn] = trackers


class KVServer:
    """Prefill side: serves leased blocks on tcp://host:port (port 0: a free one); `pin` says where
    each lease's blocks are (the engine's own KV tensors, or a lease's host copy)."""

    def __init__(self, layout: KVLayout, pin: PinBlocks, unpin: Callable[[str], None], release: ReleaseLease,
                 abandon: Callable[[str], None] = lambda tid: None, host: str = "127.0.0.1", port: int = 0,
                 mooncake: MooncakeEndpoint | None = None, pin_seconds: float = 30.0) -> None:
        self.layout = layout
        self.pin, self.unpin, self.release, self.abandon = pin, unpin, release, abandon
        self.mooncake = mooncake
        self.pin_seconds = pin_seconds
        self._pins: dict[str, tuple[str, float, int]] = {}  # pin token -> (transfer id, deadline, bytes): one-sided reads
        self.bytes_sent = 0
        self._staging = StagingBuffers()
        self._ctx = zmq.Context(io_threads=2)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Heartbeats drop a peer that vanished without closing its connection (and its queued replies).
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        addr = f"tcp://{host}"
        try:
            self.port = self._sock.bind_to_random_port(addr) if port == 0 else port
            if port:
                self._sock.bind(f"{addr}:{port}")
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise KVTransferError(f"the KV server cannot listen on {host}:{port}: {e}") from None
        self.host = host
        # Other threads' news (a layer written, a prompt done) wakes the server for its parked requests.
        self._parked: list[_Parked] = []
        wake_addr = f"inproc://quadrant-kv-wake-{uuid.uuid4().hex}"
        self._wake = self._ctx.socket(zmq.PULL)
        self._wake.bind(wake_addr)
        self._wake_push = self._ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.SNDHWM, 1)
        self._wake_push.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="quadrant-kv-server", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something a parked request may wait for happened (any thread)."""
        with self._wake_lock:
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is queued already
            except zmq.ZMQError:
                pass  # closed: nothing waits any more

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._serve_once(poller)
            except Exception:  # noqa: BLE001 - the server outlives any one request's failure
                log.exception("KV server: a request failed outside its handler")
                time.sleep(0.01)
        self._sock.close(linger=0)

    def _serve_once(self, poller: zmq.Poller) -> None:
        self._expire_pins()
        # Parked requests are tried again when the engine says something changed, and at their next
        # ping or deadline.
        due = min((min(p.next_ping, p.deadline, p.retry_at) for p in self._parked), default=math.inf)
        wait_ms = 100 if due == math.inf else min(100, max(1, int((due - time.monotonic()) * 1000)))
        ready = dict(poller.poll(wait_ms))
        woken = self._wake in ready
        if woken:
            while True:
                try:
                    self._wake.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        if self._sock in ready:
            ident, raw = self._sock.recv_multipart()[:2]
            try:
                req = json.loads(raw)
            except ValueError:
                req = None
            self._answer(_Parked(ident, req))
        if self._parked and (woken or time.monotonic() >= due):
            parked, self._parked = self._parked, []
            for p in parked:
                self._answer(p)

    def _answer(self, p: _Parked) -> None:
        """Answer a request, or park it (again) while what it asks for is not ready."""
        try:
            if not isinstance(p.request, dict):
                raise ValueError("a KV request is a JSON object")
            if p.parked:  # the data may take long: the puller waits for it with its full timeout
                result = self._handle(p.request, ready=lambda: self._send(p.ident, {"ok": True, "wait": True,
                                                                                      "ready": True}, []))
            else:
                result = self._handle(p.request)
        except KVHandshakeError as e:
            result = {"ok": False, "error": str(e), "kind": "handshake"}, []
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the server
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
        if isinstance(result, Wait):
            now = time.monotonic()
            if not p.parked:
                p.parked, p.since, p.next_ping = True, now, now + _PING_SECONDS
            # A transfer this server did not know when the pull came may since have reached the engine,
            # whose lease allows it longer.
            p.deadline = max(p.deadline, p.since + result.seconds)
            p.retry_at = now + _SOON_SECONDS if result.soon else math.inf
            if now < p.deadline:
                if now >= p.next_ping:
                    self._send(p.ident, {"ok": True, "wait": True}, [])
                    p.next_ping = now + _PING_SECONDS
                self._parked.append(p)
                return
            result = {"ok": False, "error": f"transfer {p.request.get('transfer_id')}: its prompt's KV was not "
                                            "ready in time"}, []
        self._send(p.ident, *result)

    def _send(self, ident: bytes, header: dict[str, Any], frames: list[Any]) -> None:
        parts = [ident, json.dumps(header).encode(), *frames]
        # Track every part: pyzmq copies small ones, whose trackers are done at once, so the last
        # part's tracker alone would let a staging buffer be reused while a large part is still queued.
        trackers = [self._sock.send(part, zmq.SNDMORE if i < len(parts) - 1 else 0, copy=False, track=True)
                    for i, part in enumerate(parts)]
        if frames:
            self._staging.track(trackers)

    def _handle(self, req: dict[str, Any], ready: Callable[[], None] | None = None
                ) -> tuple[dict[str, Any], list[Any]] | Wait:
        """The answer to one request (header, frames), or Wait. `ready` is called once the blocks a
        pull asks for are pinned, before they are gathered."""
        self.layout.check_compatible(KVLayout.from_dict(req.get("layout")))  # type: ignore[arg-type]
        op = req.get("op")
        if op == "hello":
            return {"ok": True, "layout": self.layout.to_dict(), "mooncake": self.mooncake is not None}, []
        if op == "done":
            released = self.release(str(req["transfer_id"]))
            if isinstance(released, Wait):
                return released
            answer: dict[str, Any] = {"ok": True, "released": released is not None}
            if released is not None:  # the first token rides along (an overlapped pull has not seen it)
                wire = released.to_dict()
                answer.update(first_token_id=wire["first_token_id"], first_token_logprob=wire["first_token_logprob"])
            return answer, []
        if op == "abandon":
            self.abandon(str(req["transfer_id"]))
            return {"ok": True}, []
        if op == "unpin":
            held = self._pins.pop(str(req["pin"]), None)
            if held is None:  # its deadline passed: the blocks may have changed under the read
                return {"ok": False, "error": f"the pin expired after {self.pin_seconds:g} s"}, []
            self.unpin(held[0])
            if req.get("read"):
                self.bytes_sent += held[2]
            return {"ok": True}, []
        if op not in ("pull", "pin", "wait"):
            raise ValueError(f"unknown op {op!r}")
        tid = str(req["transfer_id"])
        if op == "wait":  # until the prompt's last step has started (or it is done): no blocks, no layers
            ids, count, first, last = None, 0, 0, 0
        else:
            ids = None if req.get("block_ids") is None else [int(b) for b in req["block_ids"]]
            count = len(ids) if ids is not None else int(req["count"])
            first, last = int(req["layers"][0]), int(req["layers"][1])
            if not 0 <= first < last <= self.layout.num_layers:
                raise ValueError(f"layers [{first}, {last}) out of range")
        if op == "pin" and self.mooncake is None:
            raise ValueError("this KV server reads no pinned blocks out: it runs without --kv-transport mooncake")
        where = self.pin(tid, ids, int(req["first_block"]), count, str(req["prompt_digest"]), last)
        if isinstance(where, Wait):
            return where
        if where is None:
            return {"ok": False, "error": f"transfer {tid} is not held here for that prompt and those blocks "
                                          f"(expired, released or unknown)"}, []
        caches, rows = where
        if op == "wait":
            self.unpin(tid)
            return {"ok": True}, []
        if ready is not None:
            ready()
        if op == "pin":  # the peer reads the blocks itself; they stay pinned until it unpins (or the deadline)
            assert self.mooncake is not None
            token = uuid.uuid4().hex
            nbytes = count * sum(block_bytes(t) for cache in caches[first:last] for t in layer_tensors(cache))
            self._pins[token] = (tid, time.monotonic() + self.pin_seconds, nbytes)
            # The tensors' addresses ride on every pin: a prefill worker restarted on the same port
            # (which zmq reconnects to silently) has new ones.
            return {"ok": True, "pin": token, "mooncake": self.mooncake.describe(), "block_ids": rows}, []
        try:  # the lease cannot expire while its blocks are read
            index = torch.tensor(rows, dtype=torch.long)
            frames = self._staging.gather([t for cache in caches[first:last] for t in layer_tensors(cache)], index)
        finally:
            self.unpin(tid)
        self.bytes_sent += sum(f.nbytes for f in frames)
        return {"ok": True}, frames

    def _expire_pins(self) -> None:
        """Pins whose reader never unpinned (it died, or stalled): the lease may expire again."""
        now = time.monotonic()
        for token, (tid, deadline, _) in list(self._pins.items()):
            if deadline <= now:
                del self._pins[token]
                self.unpin(tid)
                log.warning("a one-sided read of transfer %s did not finish in %g s; unpinned", tid, self.pin_seconds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._wake_lock:
            self._wake_push.close(linger=0)
            self._ctx.destroy(linger=0)


class KVClient:
    """Decode side: pulls blocks from KV servers into `caches` (or the caches a pull names). One zmq
    socket per (thread, remote): each stream thread of the caller keeps its own."""

    def __init__(self, layout: KVLayout, caches: list[LayerKVCache] | None = None, timeout: float = 30.0,
                 mooncake: MooncakeEndpoint | None = None) -> None:
        self.layout = layout
        self.caches = caches
        self.mooncake = mooncake
        self.timeout_ms = int(timeout * 1000)
        self._ctx = zmq.Context(io_threads=2)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: list[zmq.Socket] = []

    def _socket(self, host: str, port: int) -> zmq.Socket:
        socks: dict[tuple[str, int], zmq.Socket] = self._local.__dict__.setdefault("socks", {})
        sock = socks.get((host, port))
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue nothing for a server not connected: a send to one that is gone fails within seconds
            # instead of waiting out the whole timeout (an overlapped pull is sent before the prompt is).
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDTIMEO, min(self.timeout_ms, _CONNECT_MS))
            sock.connect(f"tcp://{host}:{port}")
            socks[(host, port)] = sock
            with self._lock:
                self._sockets.append(sock)
            try:
                self._call(sock, host, port, {"op": "hello"})
            except BaseException:
                self._drop(host, port)
                raise
        return sock

    def _drop(self, host: str, port: int) -> None:
        """Forget a socket whose reply never came: a late reply must not answer the next request."""
        sock = self._local.socks.pop((host, port), None)
        if sock is not None:
            sock.close(linger=0)

    def _call(self, sock: zmq.Socket, host: str, port: int, req: dict[str, Any],
              give_up: Callable[[], bool] | None = None) -> list[Any]:
        try:
            sock.send(json.dumps({**req, "layout": self.layout.to_dict()}).encode())
        except zmq.Again:
            raise KVTransferError(f"the KV server at {host}:{port} cannot be reached") from None
        timeout = self.timeout_ms
        while True:
            if not sock.poll(timeout):
                raise KVTransferError(f"the KV server at {host}:{port} did not answer in {timeout / 1000:g} s")
            frames = sock.recv_multipart(copy=False)
            header = json.loads(frames[0].bytes)
            if not header.get("wait"):
                break
            if give_up is not None and give_up():
                raise KVTransferError("given up: the request no longer needs the blocks")
            # It waits for the prompt and says so every half second; once it says ready, the data follows.
            timeout = self.timeout_ms if header.get("ready") else min(self.timeout_ms, _SILENCE_MS)
        self._local.header = header  # this thread's last answer (a pin's token)
        if not header.get("ok"):
            error = f"KV server {host}:{port}: {header.get('error')}"
            raise KVHandshakeError(error) if header.get("kind") == "handshake" else KVTransferError(error)
        if "layout" in header:  # the hello's answer: the server's own layout, checked here too
            self.layout.check_compatible(KVLayout.from_dict(header["layout"]))
            if self.mooncake is not None and not header.get("mooncake"):
                raise KVHandshakeError(f"the KV server at {host}:{port} offers no Mooncake reads: start the prefill "
                                       "worker with --kv-transport mooncake too")
        return frames[1:]

    def request(self, host: str, port: int, req: dict[str, Any], give_up: Callable[[], bool] | None = None) -> list[Any]:
        """One request on this thread's socket to host:port (handshaking first if it is new); while the
        server says it waits, `give_up()` true ends it with KVTransferError."""
        sock = self._socket(host, port)
        try:
            return self._call(sock, host, port, req, give_up)
        except KVTransferError:
            self._drop(host, port)
            raise

    @property
    def last_header(self) -> dict[str, Any]:
        """This thread's last answer's header."""
        return self._local.header

    def pull(self, host: str, port: int, transfer_id: str, remote_ids: list[int] | None, local_ids: list[int],
             layers: tuple[int, int], first_block: int = 0, prompt_digest: str = "",
             caches: list[LayerKVCache] | None = None, give_up: Callable[[], bool] | None = None) -> int:
        """Copy blocks `remote_ids` (None: those at positions first_block, ... of the lease's block table,
        as many as local_ids; else checked to be there) of the prompt named by `prompt_digest`, layers
        [first, last), into blocks `local_ids` of `caches` (default: the client's); returns bytes moved."""
        if self.mooncake is not None:
            return self._read(host, port, transfer_id, remote_ids, local_ids, layers, first_block, prompt_digest,
                              give_up)
        caches = caches if caches is not None else self.caches
        assert caches is not None, "a pull needs caches to write into"
        frames = self.request(host, port, {"op": "pull", "transfer_id": transfer_id, "block_ids": remote_ids,
                                           "count": len(local_ids), "layers": list(layers),
                                           "first_block": first_block, "prompt_digest": prompt_digest}, give_up)
        dests = [t for cache in caches[layers[0]:layers[1]] for t in layer_tensors(cache)]
        if len(frames) != len(dests):
            raise KVTransferError(f"KV server {host}:{port} sent {len(frames)} tensors, expected {len(dests)}")
        runs = block_runs(local_ids)
        moved = 0
        with warnings.catch_warnings():  # zmq's receive buffers are read-only; we only copy out of them
            warnings.simplefilter("ignore", UserWarning)
            for frame, dest in zip(frames, dests):
                shape = (len(local_ids), *dest.shape[1:])
                src = torch.frombuffer(frame.buffer, dtype=torch.uint8)
                if src.numel() != block_bytes(dest) * len(local_ids):
                    raise KVTransferError(f"KV server {host}:{port} sent a tensor of the wrong size")
                scatter_blocks(dest, runs, src.view(dest.dtype).view(shape).to(dest.device))
                moved += src.numel()
        return moved

    def _read(self, host: str, port: int, transfer_id: str, remote_ids: list[int] | None, local_ids: list[int],
              layers: tuple[int, int], first_block: int, prompt_digest: str,
              give_up: Callable[[], bool] | None) -> int:
        """pull() over Mooncake: pin the blocks, read them one-sidedly, unpin (which fails if the pin
        lapsed meanwhile). One read at a time per engine: the pin's clock starts when its read can. (An
        overlapped pin may wait in here, but only for layers of a prefill step already running: its
        load's `wait` came first.)"""
        mooncake = self.mooncake
        assert mooncake is not None
        with mooncake.lock:
            self.request(host, port, {"op": "pin", "transfer_id": transfer_id, "block_ids": remote_ids,
                                      "count": len(local_ids), "layers": list(layers), "first_block": first_block,
                                      "prompt_digest": prompt_digest}, give_up)
            header = self._local.header
            try:  # the server names the blocks it pinned (a positional pin learns them here)
                moved = mooncake.read_blocks(header["mooncake"], layers, [int(b) for b in header["block_ids"]],
                                             local_ids)
            except Exception:
                try:  # best effort: the read's own error is the one to report; a lost unpin lapses
                    self.request(host, port, {"op": "unpin", "pin": header["pin"]})
                except KVTransferError as e:
                    log.info("unpin after a failed read not delivered: %s", e)
                raise
            self.request(host, port, {"op": "unpin", "pin": header["pin"], "read": True})
        return moved

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._ctx.destroy(linger=0)
