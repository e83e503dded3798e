"""The reference KV transport: pyzmq over TCP, blocks read straight from the KV tensors.

The prefill engine runs a `KVServer` (one ROUTER socket, one thread): a decode engine's `KVClient`
(DEALER sockets, one per stream) sends a hello with its KV layout, then pulls a leased prompt's
blocks a range of layers at a time; each reply is a multi-part message of one frame per tensor
(K, V, and the 8-bit cache's scales), gathered from the cache and handed to zmq without a copy
(zmq's I/O threads write them to the socket while the server gathers the next reply). Several
streams pull disjoint layer ranges at once. A final `done` ends the prefill side's lease.

Every request carries the layout (a stateless handshake: a pull of mismatched blocks is refused
even after a restart on either side), and a pull names the transfer id, the only key to a lease;
block ids outside that lease are refused.

With a Mooncake endpoint on both sides (disagg/mooncake.py) the data skips zmq: the hello says the
server offers Mooncake reads, a `pin` holds a lease's blocks (until `unpin`, or the server's pin
deadline) and answers with the registered tensors' addresses, and the client reads them one-sidedly
in between; zmq carries only the control messages.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import zmq

from quadrant.disagg.protocol import KVHandshakeError, KVLayout, KVTransferError
from quadrant.engine.kv_cache import block_bytes, block_runs, scatter_blocks
from quadrant.layers.attention import LayerKVCache

if TYPE_CHECKING:
    from quadrant.disagg.mooncake import MooncakeEndpoint

log = logging.getLogger(__name__)

# transfer id, requested block ids, their position in the lease's block table, the prompt digest the
# puller expects -> None if they may not be read now, else (a pin until `unpin`) the caches to read
# them from and their blocks there
PinBlocks = Callable[[str, list[int], int, str], tuple[list[LayerKVCache], list[int]] | None]
_SEND_WAIT_MS = 5000  # a reply zmq has not sent in this long (a stalled peer) gives up its staging buffers


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

    def gather(self, tensors: list[torch.Tensor], index: torch.Tensor) -> list[Any]:
        """Blocks `index` of each tensor, as host buffers zmq can send without copying."""
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
                dest.copy_(t.index_select(0, index))
            out.append(dest.view(torch.uint8).numpy())
        return out

    def track(self, trackers: list[Any]) -> None:
        """The send trackers of the reply just gathered."""
        self._trackers[1 - self._turn] = trackers


class KVServer:
    """Prefill side: serves leased blocks on tcp://host:port (port 0: a free one); `pin` says where
    each lease's blocks are (`caches`, the engine's own KV tensors, or a lease's host copy)."""

    def __init__(self, layout: KVLayout, caches: list[LayerKVCache] | None, pin: PinBlocks,
                 unpin: Callable[[str], None], release: Callable[[str], bool], host: str = "127.0.0.1",
                 port: int = 0, mooncake: MooncakeEndpoint | None = None, pin_seconds: float = 30.0) -> None:
        self.layout = layout
        self.caches = caches
        self.pin, self.unpin, self.release = pin, unpin, release
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="quadrant-kv-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            self._expire_pins()
            if not poller.poll(100):
                continue
            ident, raw = self._sock.recv_multipart()[:2]
            try:
                header, frames = self._handle(json.loads(raw))
            except KVHandshakeError as e:
                header, frames = {"ok": False, "error": str(e), "kind": "handshake"}, []
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the server
                header, frames = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
            parts = [ident, json.dumps(header).encode(), *frames]
            # Track every part: pyzmq copies small ones, whose trackers are done at once, so the last
            # part's tracker alone would let a staging buffer be reused while a large part is still queued.
            trackers = [self._sock.send(part, zmq.SNDMORE if i < len(parts) - 1 else 0, copy=False, track=True)
                        for i, part in enumerate(parts)]
            if frames:
                self._staging.track(trackers)
        self._sock.close(linger=0)

    def _handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        self.layout.check_compatible(KVLayout.from_dict(req.get("layout")))  # type: ignore[arg-type]
        op = req.get("op")
        if op == "hello":
            return {"ok": True, "layout": self.layout.to_dict(), "mooncake": self.mooncake is not None}, []
        if op == "done":
            return {"ok": True, "released": self.release(str(req["transfer_id"]))}, []
        if op == "unpin":
            held = self._pins.pop(str(req["pin"]), None)
            if held is None:  # its deadline passed: the blocks may have changed under the read
                return {"ok": False, "error": f"the pin expired after {self.pin_seconds:g} s"}, []
            self.unpin(held[0])
            if req.get("read"):
                self.bytes_sent += held[2]
            return {"ok": True}, []
        if op not in ("pull", "pin"):
            raise ValueError(f"unknown op {op!r}")
        tid, ids = str(req["transfer_id"]), [int(b) for b in req["block_ids"]]
        first, last = int(req["layers"][0]), int(req["layers"][1])
        if not 0 <= first < last <= self.layout.num_layers:
            raise ValueError(f"layers [{first}, {last}) out of range")
        if op == "pin" and self.mooncake is None:
            raise ValueError("this KV server reads no pinned blocks out: it runs without --kv-transport mooncake")
        where = self.pin(tid, ids, int(req["first_block"]), str(req["prompt_digest"]))
        if where is None:
            return {"ok": False, "error": f"transfer {tid} is not held here for that prompt and those blocks "
                                          f"(expired, released or unknown)"}, []
        caches, rows = where
        if op == "pin":  # the peer reads the blocks itself; they stay pinned until it unpins (or the deadline)
            assert self.mooncake is not None
            token = uuid.uuid4().hex
            nbytes = len(ids) * sum(block_bytes(t) for cache in caches[first:last] for t in layer_tensors(cache))
            self._pins[token] = (tid, time.monotonic() + self.pin_seconds, nbytes)
            # The tensors' addresses ride on every pin: a prefill worker restarted on the same port
            # (which zmq reconnects to silently) has new ones.
            return {"ok": True, "pin": token, "mooncake": self.mooncake.describe()}, []
        try:  # the lease cannot expire while its blocks are read
            index = torch.tensor(rows, dtype=torch.long, device=caches[0].k.device)
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
        self._ctx.destroy(linger=0)


class KVClient:
    """Decode side: pulls blocks from KV servers into `caches` (or the caches a pull names). One zmq
    socket per (thread, remote): each stream thread of the caller keeps its own."""

    def __init__(self, layout: KVLayout, caches: list[LayerKVCache] | None, timeout: float = 30.0,
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

    def _call(self, sock: zmq.Socket, host: str, port: int, req: dict[str, Any]) -> list[Any]:
        sock.send(json.dumps({**req, "layout": self.layout.to_dict()}).encode())
        if not sock.poll(self.timeout_ms):
            raise KVTransferError(f"the KV server at {host}:{port} did not answer in {self.timeout_ms / 1000:g} s")
        frames = sock.recv_multipart(copy=False)
        header = json.loads(frames[0].bytes)
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

    def request(self, host: str, port: int, req: dict[str, Any]) -> list[Any]:
        """One request on this thread's socket to host:port (handshaking first if it is new)."""
        sock = self._socket(host, port)
        try:
            return self._call(sock, host, port, req)
        except KVTransferError:
            self._drop(host, port)
            raise

    def pull(self, host: str, port: int, transfer_id: str, remote_ids: list[int], local_ids: list[int],
             layers: tuple[int, int], first_block: int = 0, prompt_digest: str = "",
             caches: list[LayerKVCache] | None = None) -> int:
        """Copy blocks `remote_ids` (from position `first_block` of the lease's block table, of the prompt
        named by `prompt_digest`) of layers [first, last) into blocks `local_ids` of `caches` (default:
        the client's); returns bytes moved."""
        if self.mooncake is not None:
            return self._read(host, port, transfer_id, remote_ids, local_ids, layers, first_block, prompt_digest)
        caches = caches if caches is not None else self.caches
        assert caches is not None, "a pull needs caches to write into"
        frames = self.request(host, port, {"op": "pull", "transfer_id": transfer_id, "block_ids": remote_ids,
                                           "layers": list(layers), "first_block": first_block,
                                           "prompt_digest": prompt_digest})
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

    def _read(self, host: str, port: int, transfer_id: str, remote_ids: list[int], local_ids: list[int],
              layers: tuple[int, int], first_block: int, prompt_digest: str) -> int:
        """pull() over Mooncake: pin the blocks, read them one-sidedly, unpin (which fails if the pin
        lapsed meanwhile). One read at a time per engine: the pin's clock starts when its read can."""
        mooncake = self.mooncake
        assert mooncake is not None
        with mooncake.lock:
            self.request(host, port, {"op": "pin", "transfer_id": transfer_id, "block_ids": remote_ids,
                                      "layers": list(layers), "first_block": first_block,
                                      "prompt_digest": prompt_digest})
            header = self._local.header
            try:
                moved = mooncake.read_blocks(header["mooncake"], layers, remote_ids, local_ids)
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
