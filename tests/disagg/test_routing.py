"""The router's choice policy on plain Worker objects: prefix hashing, the LRU map, load balance."""

from __future__ import annotations

import pytest

from quadrant.disagg.routing import (
    BLOCK_CHARS, PrefixCache, Worker, WorkerPool, choose_decode, choose_prefill, least_loaded, normalize_url,
    parse_role, prefix_block_hashes, prompt_text,
)

SHARED = "You are a helpful assistant. Answer briefly and cite your sources. " * 3  # 3+ blocks


def workers(*loads: tuple[int, int, float]) -> list[Worker]:
    """One healthy prefill worker per (in_flight, waiting, kv_usage)."""
    return [Worker(f"http://w{i}:8000", "prefill", healthy=True, in_flight=f, waiting=q, kv_usage=kv)
            for i, (f, q, kv) in enumerate(loads)]


def test_block_hashes_chain_on_full_blocks():
    text = "a" * BLOCK_CHARS + "b" * BLOCK_CHARS + "c" * 10
    hashes = prefix_block_hashes(text)
    assert len(hashes) == 2  # the partial tail is not a block
    assert prefix_block_hashes(text[:BLOCK_CHARS]) == hashes[:1]
    # Same second block after a different first block: a different hash (the chain).
    assert prefix_block_hashes("x" * BLOCK_CHARS + "b" * BLOCK_CHARS)[1] != hashes[1]
    assert prefix_block_hashes("short") == []
    # Characters, not bytes: a block of multi-byte characters is still one block.
    assert len(prefix_block_hashes("é" * BLOCK_CHARS)) == 1


def test_prompt_text():
    assert prompt_text({"prompt": "hi"}, chat=False) == "hi"
    assert prompt_text({"prompt": [1, 2, 3]}, chat=False) == prompt_text({"prompt": [1, 2, 3]}, chat=False) != ""
    assert prompt_text({"prompt": ["a", "b"]}, chat=False) == "a\x00b"
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert prompt_text(chat, chat=True) == "system\nbe brief\nuser\nhello\n"
    # Junk is matched on nothing rather than failing (the worker answers it with a 400).
    assert prompt_text({"messages": "nope"}, chat=True) == ""
    assert prompt_text({"prompt": 7}, chat=False) == ""


def test_prefix_cache_longest_match_and_lru():
    cache = PrefixCache(max_blocks=4)
    a = prefix_block_hashes(SHARED + "A" * BLOCK_CHARS)  # 4 blocks
    cache.insert(a[:2], "http://p1")
    cache.insert(a, "http://p2")  # p2 now owns the whole chain, the first two blocks included
    assert cache.match(a, {"http://p1", "http://p2"}) == ("http://p2", 4)
    cache.insert(a[:2], "http://p1")
    assert cache.match(a, {"http://p1", "http://p2"}) == ("http://p2", 4)  # the deepest hit wins
    assert cache.match(a, {"http://p1"}) == ("http://p1", 2)  # only candidates count
    assert cache.match(prefix_block_hashes("z" * 200), {"http://p1"}) == (None, 0)
    b = prefix_block_hashes("B" * 2 * BLOCK_CHARS)
    cache.insert(b, "http://p1")  # 6 entries > 4: the two least recently used (a[2], a[3]) go
    assert len(cache) == 4
    assert cache.match(a, {"http://p1", "http://p2"}) == ("http://p1", 2)
    cache.forget("http://p1")
    assert len(cache) == 0


def test_prefix_owner_wins_within_threshold():
    cache = PrefixCache()
    ws = workers((0, 0, 0.0), (0, 0, 0.0))
    first = choose_prefill(ws, SHARED + "question one", cache, balance_threshold=2)
    assert first is ws[0]  # nothing cached: least loaded, ties in registration order
    ws[0].in_flight = 2  # busier, but within the threshold: the cache hit is worth it
    assert choose_prefill(ws, SHARED + "question two", cache, balance_threshold=2) is ws[0]
    ws[0].in_flight, ws[0].waiting = 2, 1  # 3 more than the idle worker: balance wins
    assert choose_prefill(ws, SHARED + "question three", cache, balance_threshold=2) is ws[1]
    # ...and the prefix moved with it.
    ws[0].in_flight = ws[0].waiting = 0
    assert choose_prefill(ws, SHARED + "question four", cache, balance_threshold=2) is ws[1]


def test_short_prompts_are_load_balanced():
    ws = workers((3, 0, 0.0), (1, 1, 0.5), (1, 1, 0.2))
    assert choose_prefill(ws, "hi", PrefixCache(), balance_threshold=4) is ws[2]  # load 2, then less KV
    assert least_loaded(ws) is ws[2]


def test_decode_choice_is_in_flight_then_kv():
    ws = workers((2, 0, 0.1), (1, 9, 0.9), (1, 0, 0.3))
    assert choose_decode(ws) is ws[2]  # waiting does not count for decode; KV usage breaks the tie
    ws[2].in_flight = 5
    assert choose_decode(ws) is ws[1]


def test_pool_membership():
    pool = WorkerPool("decode", ["http://127.0.0.1:8001/", "http://127.0.0.1:8002"])
    assert [w.url for w in pool] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert pool.healthy() == []  # unknown until checked
    for w in pool:
        w.healthy = True
    assert [w.url for w in pool.healthy(exclude=["http://127.0.0.1:8001"])] == ["http://127.0.0.1:8002"]
    with pytest.raises(ValueError, match="already"):
        pool.add("http://127.0.0.1:8002/")
    assert pool.remove("http://127.0.0.1:8001").url == "http://127.0.0.1:8001"
    with pytest.raises(KeyError):
        pool.remove("http://127.0.0.1:8001")
    assert len(pool) == 1
    w = pool.get("http://127.0.0.1:8002")
    assert w is not None
    w.mark_failed("connection refused")
    assert pool.healthy() == [] and w.as_dict()["last_error"] == "connection refused"


@pytest.mark.parametrize("bad", ["127.0.0.1:8000", "ftp://x:1", "http://x:1/v1?a=1", "http://x:99999", "", None, 5])
def test_bad_urls_and_roles(bad):
    with pytest.raises(ValueError):
        normalize_url(bad)
    with pytest.raises(ValueError, match="prefill"):
        parse_role(bad)
    assert parse_role("prefill") == "prefill"


def test_a_pool_behind_a_route_prefix_keeps_its_path():
    assert normalize_url("http://127.0.0.1:8000/prefill/") == "http://127.0.0.1:8000/prefill"
    assert normalize_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
