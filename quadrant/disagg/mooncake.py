"""The optional fast KV data plane: Mooncake Transfer Engine, one-sided reads of registered KV tensors.

With `--kv-transport mooncake` each engine registers its KV tensors (K, V and an 8-bit cache's
scales, every layer) with a Mooncake Transfer Engine. A decode engine pins a lease's blocks over the
zmq control socket (the answer carries the prefill engine's session and its tensors' addresses),
reads them straight from the prefill engine's cache into its own blocks (one read per run of blocks
consecutive on both sides, per tensor, in one batch), and unpins. Nothing is gathered or staged on
either side. The transport is TCP here; builds and machines with RDMA NICs
take `QUADRANT_MOONCAKE_PROTOCOL=rdma` (and `QUADRANT_MOONCAKE_DEVICE`, the NIC names).
Peers find each other without a metadata server (Mooncake's P2P handshake), each at its `--kv-host`
(set it on decode workers too when they are on other machines).

The lease checks (a pin names its transfer, prompt and blocks) guard what a well-behaved peer reads;
Mooncake itself lets any peer that reaches its port read any registered address, so it belongs on a
trusted network, as RDMA fabrics are.

Mooncake is optional: `pip install mooncake-transfer-engine-non-cuda` (CPU caches; the package
needs libibverbs, Debian's `libibverbs1`) or the CUDA build for GPU caches.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from quadrant.disagg.protocol import KVTransferError
from quadrant.disagg.transport import layer_tensors
from quadrant.engine.kv_cache import block_bytes
from quadrant.layers.attention import LayerKVCache

log = logging.getLogger(__name__)

INSTALL_HINT = ("--kv-transport mooncake needs Mooncake Transfer Engine: pip install "
                "mooncake-transfer-engine-non-cuda (and Debian's libibverbs1), or its CUDA build for GPU caches")


def paired_runs(remote_ids: list[int], local_ids: list[int]) -> list[tuple[int, int, int]]:
    """(remote first block, local first block, count) of each run that is consecutive on both sides."""
    if len(remote_ids) != len(local_ids):
        raise KVTransferError(f"{len(remote_ids)} remote blocks for {len(local_ids)} local ones")
    runs: list[tuple[int, int, int]] = []
    for r, loc in zip(remote_ids, local_ids):
        if runs and runs[-1][0] + runs[-1][2] == r and runs[-1][1] + runs[-1][2] == loc:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((r, loc, 1))
    return runs


class MooncakeEndpoint:
    """One engine's Mooncake Transfer Engine with its KV tensors registered.

    `tensors` are per layer, in wire order (transport.layer_tensors); each is contiguous with blocks on
    its first dimension, so block b of a tensor starts b * (its block bytes) after its address.
    """

    def __init__(self, host: str, tensors: list[list[Any]]) -> None:
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # its INFO lines log every segment it opens and closes
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:  # the package, or the libibverbs it links against
            raise KVTransferError(f"{INSTALL_HINT} ({e})") from None
        flat = [t for layer in tensors for t in layer]
        if any(not t.is_contiguous() for t in flat):
            raise KVTransferError("Mooncake reads need contiguous KV tensors")
        self.tensors = tensors
        self.engine = TransferEngine()
        protocol = os.environ.get("QUADRANT_MOONCAKE_PROTOCOL", "tcp")
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, os.environ.get("QUADRANT_MOONCAKE_DEVICE", ""))
        if rc != 0:
            raise KVTransferError(f"Mooncake Transfer Engine did not start on {host} over {protocol} (code {rc})")
        rc = self.engine.batch_register_memory([t.data_ptr() for t in flat], [t.numel() * t.element_size()
                                                                             for t in flat])
        if rc != 0:
            raise KVTransferError(f"Mooncake could not register the KV cache's memory (code {rc}); on a GPU use "
                                  "its CUDA build")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        # One read at a time per engine (its Python binding is not documented as thread-safe), and no
        # unregistering under a read: callers hold it around pin, read and unpin.
        self.lock = threading.Lock()
        log.info("Mooncake Transfer Engine %s (%s) with %d KV tensors registered", self.session, protocol, len(flat))

    def describe(self) -> dict[str, Any]:
        """What a peer needs to read our blocks: the session and each tensor's (address, block bytes)."""
        return {"session": self.session,
                "tensors": [[[t.data_ptr(), block_bytes(t)] for t in layer] for layer in self.tensors]}

    def read_blocks(self, remote: dict[str, Any], layers: tuple[int, int], remote_ids: list[int],
                    local_ids: list[int]) -> int:
        """Read the peer's blocks `remote_ids` of layers [first, last) into our `local_ids`; bytes read."""
        runs = paired_runs(remote_ids, local_ids)
        local_addrs: list[int] = []
        remote_addrs: list[int] = []
        lengths: list[int] = []
        for layer in range(*layers):
            ours, theirs = self.tensors[layer], remote["tensors"][layer]
            if len(ours) != len(theirs):
                raise KVTransferError(f"the peer's layer {layer} has {len(theirs)} KV tensors, ours {len(ours)}")
            for t, (addr, theirs_size) in zip(ours, theirs):
                size = block_bytes(t)
                if size != theirs_size:
                    raise KVTransferError(f"the peer's KV blocks hold {theirs_size} bytes, ours {size}")
                for r, loc, n in runs:
                    local_addrs.append(t.data_ptr() + loc * size)
                    remote_addrs.append(addr + r * size)
                    lengths.append(n * size)
        if not lengths:
            return 0
        rc = self.engine.batch_transfer_sync_read(remote["session"], local_addrs, remote_addrs, lengths)
        if rc != 0:
            raise KVTransferError(f"Mooncake read from {remote['session']} failed (code {rc})")
        return sum(lengths)

    def close(self) -> None:
        flat = [t for layer in self.tensors for t in layer]
        with self.lock:  # after any read in flight
            try:
                self.engine.batch_unregister_memory([t.data_ptr() for t in flat])
            except Exception as e:  # noqa: BLE001 - shutting down: nothing to recover
                log.debug("Mooncake unregister failed: %s", e)


def endpoint_for(host: str, caches: list[LayerKVCache]) -> MooncakeEndpoint:
    return MooncakeEndpoint(host, [layer_tensors(c) for c in caches])
