"""KV transfer speed: quadrant's pyzmq and Mooncake transports against a raw loopback TCP socket and memcpy.

    python benchmarks/kv_transfer.py [--shape llama-3-8b|smollm2-135m] [--tokens 2048] [--repeats 5]

One prompt's KV blocks (K, V of every layer, as the engine lays them out) move from a prefill
engine's cache to a decode engine's, in one process over 127.0.0.1: `KVServer` gathers the leased
blocks and hands them to zmq without a copy, `KVClient` pulls layer ranges over N streams and
scatters them into its own blocks. With Mooncake Transfer Engine installed, the same blocks move again
by its one-sided reads over TCP (pin over zmq, read, unpin; no gather or scatter). The peers move the same bytes in the same run: a raw TCP socket
(sendall / recv_into, one stream, no gather or scatter: the loopback's ceiling for one stream) and a
memcpy (torch copy_ of one contiguous buffer: the memory's ceiling). The ratio that matters is
ours / raw socket. int8 caches move their blocks with the per-N-token scales.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import threading
import time
from datetime import date

import torch

from quadrant.config import CacheConfig, ModelConfig
from quadrant.disagg.mooncake import endpoint_for
from quadrant.disagg.protocol import KVLayout, KVTransferError
from quadrant.disagg.transport import KVClient, KVServer, layer_tensors
from quadrant.engine.kv_cache import allocate_kv_tensors

SHAPES = {  # layers, kv heads, head dim, activation dtype
    "llama-3-8b": (32, 8, 128, torch.bfloat16),
    "smollm2-135m": (30, 3, 64, torch.float32),
}


def model_config(shape: str) -> ModelConfig:
    layers, heads, dim, _ = SHAPES[shape]
    return ModelConfig(architecture="llama", vocab_size=32000, hidden_size=heads * dim * 4, intermediate_size=1024,
                       num_hidden_layers=layers, num_attention_heads=heads * 4, num_key_value_heads=heads,
                       head_dim=dim)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_socket_seconds(nbytes: int, repeats: int) -> float:
    """One loopback TCP stream moving nbytes from a buffer into a buffer."""
    payload = bytearray(os.urandom(1 << 20)) * (nbytes >> 20) + bytearray(nbytes % (1 << 20))
    sink = bytearray(nbytes)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeats):
                conn.recv(1)
                conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    view = memoryview(sink)

    def once() -> None:
        client.sendall(b"g")
        got = 0
        while got < nbytes:
            got += client.recv_into(view[got:], nbytes - got)

    seconds = best(once, repeats)
    client.close()
    thread.join()
    listener.close()
    return seconds


def run(shape: str, tokens: int, cache_dtype: str, streams: list[int], repeats: int) -> list[dict]:
    model = model_config(shape)
    dtype = SHAPES[shape][3]
    cache = CacheConfig(cache_dtype=cache_dtype)  # type: ignore[arg-type]
    blocks = -(-tokens // cache.block_size)
    src = allocate_kv_tensors(model, cache, blocks + 1, dtype, "cpu")
    dst = allocate_kv_tensors(model, cache, blocks + 1, dtype, "cpu")
    for layer in src:
        for t in layer_tensors(layer):
            t.view(torch.uint8).random_()
    ids = list(range(1, blocks + 1))
    layout = KVLayout.of(model, cache, dtype)
    nbytes = blocks * cache.bytes_per_block(model, dtype)
    rows = []
    for transport in ("pyzmq", "mooncake"):
        endpoints = (None, None)
        if transport == "mooncake":
            try:
                endpoints = (endpoint_for("127.0.0.1", src), endpoint_for("127.0.0.1", dst))
            except KVTransferError as e:
                print(f"Mooncake row skipped: {e}")
                continue
        for layer in dst:
            for t in layer_tensors(layer):
                t.zero_()
        server = KVServer(layout, pin=lambda tid, blocks, first, count, digest, end: (src, blocks),
                          unpin=lambda tid: None, release=lambda tid: None, mooncake=endpoints[0])
        client = KVClient(layout, dst, mooncake=endpoints[1])
        try:
            for n in streams:
                bounds = [(i * model.num_hidden_layers // n, (i + 1) * model.num_hidden_layers // n) for i in range(n)]

                def pull() -> None:
                    threads = [threading.Thread(target=client.pull, args=("127.0.0.1", server.port, "t", ids, ids, b))
                               for b in bounds]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

                pull()  # connect and handshake once
                seconds = best(pull, repeats)
                label = "quadrant pyzmq" if transport == "pyzmq" else "quadrant Mooncake TCP reads"
                rows.append({"what": f"{label}, {n} stream{'s' * (n > 1)}", "seconds": seconds})
            assert all(torch.equal(a[1:].view(torch.uint8), b[1:].view(torch.uint8)) for la, lb in zip(src, dst)
                       for a, b in zip(layer_tensors(la), layer_tensors(lb)))
        finally:
            client.close()
            server.close()
            for e in endpoints:
                if e is not None:
                    e.close()
    rows.append({"what": "raw TCP socket, 1 stream", "seconds": raw_socket_seconds(nbytes, repeats)})
    flat_src, flat_dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    flat_src.random_()
    rows.append({"what": "memcpy (torch copy_)", "seconds": best(lambda: flat_dst.copy_(flat_src), repeats)})
    for r in rows:
        r["gbps"] = nbytes / r["seconds"] / 1e9
        r["bytes"] = nbytes
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens whose KV moves")
    ap.add_argument("--cache-dtype", choices=["auto", "int8"], default="auto")
    ap.add_argument("--streams", default="1,2,4", help="stream counts to try")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = run(args.shape, args.tokens, args.cache_dtype, [int(s) for s in args.streams.split(",")], args.repeats)
    raw = next(r for r in rows if r["what"].startswith("raw"))["gbps"]
    print(f"\nKV transfer, {args.shape} shape, {args.tokens} tokens, cache {args.cache_dtype}: "
          f"{rows[0]['bytes'] / 1e6:.1f} MB ({date.today()}, {platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'path':<40} {'ms':>9} {'GB/s':>8} {'x raw socket':>13}")
    for r in rows:
        print(f"{r['what']:<40} {r['seconds'] * 1e3:>9.1f} {r['gbps']:>8.2f} {r['gbps'] / raw:>13.2f}")


if __name__ == "__main__":
    main()
