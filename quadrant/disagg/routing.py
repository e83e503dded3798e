"""Which worker gets a request: the worker pools and the choice policy of the disaggregation router.

Prefill choice is cache-aware (SGLang's cache-aware routing, approximated on text): chained hashes
of fixed 64-character blocks of the prompt remember which worker last ran each prefix, and a request
goes to the worker holding its longest prefix unless that worker is busier than the least loaded one
by more than a threshold. Decode choice is load-aware. Pure Python: router.py does the HTTP and
keeps the load numbers fresh.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")
BLOCK_CHARS = 64


@dataclass
class Worker:
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:8001
    role: Role
    healthy: bool = False  # unknown until the first health check; unhealthy workers get no requests
    running: int = 0  # quadrant_num_requests_running at the last health check
    waiting: int = 0  # quadrant_num_requests_waiting at the last health check
    kv_usage: float = 0.0  # quadrant_kv_cache_usage_ratio at the last health check
    in_flight: int = 0  # steps the router sent and has not seen end: fresher than the scraped gauges
    num_requests: int = 0  # steps sent since registration
    last_error: str | None = None  # why it was last marked unhealthy
    kv_address: tuple[str, int] | None = None  # a prefill worker's KV server, from its /health (overlapped transfers)

    @property
    def load(self) -> int:
        return self.in_flight + self.waiting

    def mark_failed(self, error: str) -> None:
        self.healthy = False
        self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "healthy": self.healthy, "in_flight": self.in_flight,
                "running": self.running, "waiting": self.waiting, "kv_usage": self.kv_usage,
                "num_requests": self.num_requests, "last_error": self.last_error}


def normalize_url(url: object) -> str:
    """A worker's base URL in one spelling (the pools' key); ValueError names what is wrong."""
    if not isinstance(url, str) or not url:
        raise ValueError("a worker url is a string like http://127.0.0.1:8001")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"worker url {url!r} must look like http://HOST:PORT")
    if parts.query or parts.fragment:
        raise ValueError(f"worker url {url!r} must be a base URL, without a query (the router adds /v1/...)")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError(f"worker url {url!r} has an invalid port") from None
    # A path stays: a pool behind a proxy's route prefix (Ray Serve's http://proxy/prefill) is one worker.
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def parse_role(role: object) -> Role:
    if role not in ROLES:
        raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
    return cast(Role, role)


class WorkerPool:
    """The workers of one role, in registration order; registered and removed while serving."""

    def __init__(self, role: Role, urls: Collection[str] = ()) -> None:
        self.role = role
        self._workers: dict[str, Worker] = {}
        for url in urls:
            self.add(url)

    def add(self, url: str) -> Worker:
        url = normalize_url(url)
        if url in self._workers:
            raise ValueError(f"{url} is already a {self.role} worker")
        worker = self._workers[url] = Worker(url, self.role)
        return worker

    def remove(self, url: str) -> Worker:
        """Deregister; requests already on the worker finish there. KeyError if it is not registered."""
        return self._workers.pop(normalize_url(url))

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def healthy(self, exclude: Collection[str] = ()) -> list[Worker]:
        return [w for w in self._workers.values() if w.healthy and w.url not in exclude]

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The text a request's prefix is matched on: the prompt, or the messages' roles and contents."""
    if chat:
        messages = body.get("messages")
        parts = []
        for m in messages if isinstance(messages, list) else []:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts: their texts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                                  and isinstance(p.get("text"), str))
            parts.append(f"{m.get('role')}\n{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # a batch, token ids or a batch of those: any stable spelling will do
        return "\x00".join(p if isinstance(p, str) else repr(p) for p in prompt)
    return ""


def prefix_block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """One hash per full block, each over the previous hash and its block: equal hashes mean equal prefixes.
    A trailing partial block is left out, as a paged KV cache leaves out a partial page."""
    hashes, prev = [], b""
    # Blocks are cut on characters, not bytes, so a block never splits a character.
    for start in range(0, len(text) - block_chars + 1, block_chars):
        block = text[start:start + block_chars].encode("utf-8", "surrogatepass")
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        hashes.append(prev)
    return hashes


class PrefixCache:
    """block hash -> the worker that last ran that prefix; least recently used entries go first."""

    def __init__(self, max_blocks: int = 65536) -> None:
        if max_blocks < 1:
            raise ValueError("the prefix cache must hold at least one block")
        self.max_blocks = max_blocks
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def match(self, hashes: list[bytes], urls: Collection[str]) -> tuple[str | None, int]:
        """The worker among `urls` holding the longest prefix of `hashes`, and that prefix's block count."""
        for i in range(len(hashes) - 1, -1, -1):
            url = self._owner.get(hashes[i])
            if url is not None and url in urls:
                return url, i + 1
        return None, 0

    def insert(self, hashes: list[bytes], url: str) -> None:
        for h in hashes:
            self._owner[h] = url
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_blocks:
            self._owner.popitem(last=False)

    def forget(self, url: str) -> None:
        """Drop a deregistered worker's entries."""
        for h in [h for h, u in self._owner.items() if u == url]:
            del self._owner[h]

    def __len__(self) -> int:
        return len(self._owner)


def least_loaded(workers: list[Worker]) -> Worker:
    """Fewest steps in flight plus waiting; then the emptier KV cache; then registration order."""
    return min(workers, key=lambda w: (w.load, w.kv_usage))


def choose_prefill(workers: list[Worker], text: str, cache: PrefixCache, balance_threshold: int) -> Worker:
    """The worker with the longest cached prefix of `text`, unless its load exceeds the least loaded
    worker's by more than `balance_threshold`; the choice is recorded as the prefix's new owner."""
    assert workers, "the caller checks for an empty pool"
    hashes = prefix_block_hashes(text)
    least = least_loaded(workers)
    chosen = least
    url, _ = cache.match(hashes, {w.url for w in workers})
    if url is not None:
        holder = next(w for w in workers if w.url == url)
        if holder.load - least.load <= balance_threshold:
            chosen = holder
    cache.insert(hashes, chosen.url)
    return chosen


def choose_decode(workers: list[Worker]) -> Worker:
    """Fewest steps in flight, then the emptier KV cache (decode memory is the KV cache)."""
    assert workers, "the caller checks for an empty pool"
    return min(workers, key=lambda w: (w.in_flight, w.kv_usage))
