"""KV transfer between a prefill engine and a decode engine, in one process over real zmq sockets on
loopback: greedy output equal to transformers and to a colocated engine, 8-bit blocks with their
scales, the handshake, leases (release and expiry, no block leaked on either side), failure policies."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from quadrant import SamplingParams
from quadrant.config import CacheConfig, KVTransferConfig, SchedulerConfig
from quadrant.disagg.protocol import KVHandshakeError, KVLayout, RemoteKV
from quadrant.disagg.transport import layer_tensors
from quadrant.engine.engine import LLMEngine
from quadrant.engine.kv_cache import hash_block
from tests.engine.conftest import GREEDY, hf_greedy, prompts, reference, tiny  # noqa: F401 - fixtures

pytest.importorskip("zmq")


def make(path: str, role: str = "both", cache: CacheConfig | None = None, **transfer) -> LLMEngine:
    return LLMEngine.from_model(path, cache=cache or CacheConfig(num_blocks=64),
                                scheduler=SchedulerConfig(max_num_batched_tokens=64),
                                kv_transfer=KVTransferConfig(role=role, **transfer))  # type: ignore[arg-type]


def finish(engine: LLMEngine, timeout: float = 30.0) -> dict[str, list]:
    """Step until every request ends; request id -> its final RequestOutput."""
    done = {}
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish"
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def prefill(engine: LLMEngine, prompts: list[list[int]]) -> list[dict]:
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=1, temperature=0.0), f"p{i}", {"do_remote_decode": True})
    outs = finish(engine)
    return [outs[f"p{i}"].kv_transfer_params for i in range(len(prompts))]


def free_blocks(engine: LLMEngine) -> int:
    engine.housekeeping()
    return engine.kv.pool.num_free


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def decode_beside_colocated(p: LLMEngine, d: LLMEngine, colocated: LLMEngine,
                            prompts: list[list[int]]) -> tuple[list[dict], dict, dict]:
    """Prompts prefilled on p, decoded on d from the pulled KV and on colocated from scratch:
    (kv params, d's outputs, colocated's outputs), outputs keyed "0", "1", ..."""
    params = prefill(p, prompts)
    for i, (pr, kv) in enumerate(zip(prompts, params)):
        d.add_request(pr, GREEDY, str(i), kv)
        colocated.add_request(pr, GREEDY, str(i))
    return params, finish(d), finish(colocated)


def assert_second_prompts_first_block_moved_exactly(p: LLMEngine, d: LLMEngine, params: list[dict],
                                                    prompts: list[list[int]]) -> None:
    """A pulled block is the prefill side's byte for byte, scales included (prompt 1's first block:
    still in the decode side's prefix cache after the request ended)."""
    src = params[1]["remote_block_ids"][0]
    dst = d.kv.pool.cached[hash_block(None, prompts[1][:16])]
    for layer_p, layer_d in zip(p.runner.kv_caches, d.runner.kv_caches):
        for a, b in zip(layer_tensors(layer_p), layer_tensors(layer_d)):
            assert torch.equal(a[src], b[dst])


@pytest.fixture(scope="module")
def pair(tiny):
    p, d = make(tiny[0], "prefill"), make(tiny[0], "decode")
    yield p, d
    p.shutdown(), d.shutdown()


def test_decode_from_pulled_kv_equals_transformers_and_colocated(tiny, pair, prompts, reference):
    p, d = pair
    total_p, total_d = free_blocks(p), free_blocks(d)
    params = prefill(p, prompts)
    assert all(kv is not None and kv["num_tokens"] == len(pr) for kv, pr in zip(params, prompts))
    assert free_blocks(p) < total_p  # leased, not freed
    for i, (pr, kv) in enumerate(zip(prompts, params)):
        d.add_request(pr, GREEDY, f"d{i}", kv)
    outs = finish(d)
    got = [outs[f"d{i}"].outputs[0].token_ids for i in range(len(prompts))]
    assert got == reference
    colocated = make(tiny[0])
    for i, pr in enumerate(prompts):
        colocated.add_request(pr, GREEDY, str(i))
    want = finish(colocated)
    assert got == [want[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    snap = d.connector.snapshot()
    assert snap.transfers == len(prompts) and snap.failures == 0 and snap.bytes > 0
    # Every pull said done: the prefill side freed every leased block; the decode side holds none.
    wait_for(lambda: free_blocks(p) == total_p)
    assert p.connector.snapshot().leases_released == len(prompts)
    assert free_blocks(d) == total_d


def test_decode_prefix_hits_pull_only_missing_blocks(pair, prompts, reference):
    p, d = pair
    params = prefill(p, [prompts[1]])
    d.add_request(prompts[1], GREEDY, "warm", params[0])
    finish(d)  # the decode side now caches prompt 1's blocks, incl. the 40-token prefix it shares with prompt 3
    before = d.connector.snapshot().bytes
    params = prefill(p, [prompts[1]])
    d.add_request(prompts[1], GREEDY, "again", params[0])
    assert finish(d)["again"].outputs[0].token_ids == reference[1]
    moved = d.connector.snapshot().bytes - before
    # Only the prompt's last block moved (57 tokens: 3 full blocks cached here, the 4th never a hit).
    assert moved == CacheConfig().bytes_per_block(d.model_config, torch.float32)


def test_int8_blocks_travel_with_their_scales(tiny, prompts):
    cache = CacheConfig(num_blocks=64, cache_dtype="int8", quant_group=4)
    p, d = make(tiny[0], "prefill", cache), make(tiny[0], "decode", cache)
    colocated = make(tiny[0], cache=cache)
    try:
        params, got, want = decode_beside_colocated(p, d, colocated, prompts)
        assert [got[str(i)].outputs[0].token_ids for i in range(5)] == [want[str(i)].outputs[0].token_ids
                                                                        for i in range(5)]
        assert all(layer_p.k.dtype == torch.int8 and layer_d.k_scale is not None
                   for layer_p, layer_d in zip(p.runner.kv_caches, d.runner.kv_caches))
        assert_second_prompts_first_block_moved_exactly(p, d, params, prompts)
        # Whole 8-bit blocks with their scales moved: under half the bytes of the same blocks in fp32.
        int8_block = cache.bytes_per_block(p.model_config, torch.float32)
        assert d.connector.snapshot().bytes % int8_block == 0
        assert int8_block < 0.5 * CacheConfig().bytes_per_block(p.model_config, torch.float32)
    finally:
        for e in (p, d, colocated):
            e.shutdown()


def test_handshake_refuses_a_mismatched_cache(tiny, prompts):
    p = make(tiny[0], "prefill")
    d = make(tiny[0], "decode", CacheConfig(num_blocks=64, cache_dtype="int8", quant_group=4),
             load_failure_policy="fail")
    try:
        kv = prefill(p, [prompts[0]])[0]
        d.add_request(prompts[0], GREEDY, "x", kv)
        out = finish(d)["x"]
        assert out.error is not None and "cache_dtype" in out.error and "do not match" in out.error
        assert free_blocks(d) == 64
    finally:
        p.shutdown(), d.shutdown()
    mine = KVLayout.of(p.model_config, CacheConfig(), torch.float32)
    with pytest.raises(KVHandshakeError, match="block_size"):
        mine.check_compatible(KVLayout.of(p.model_config, CacheConfig(block_size=32), torch.float32))


def test_failed_pull_recomputes_or_fails_by_policy(tiny, pair, prompts, reference):
    p, _ = pair
    kv = prefill(p, [prompts[2]])[0]
    gone = {**kv, "transfer_id": "no-such-transfer"}
    recompute = make(tiny[0], "decode")
    fail = make(tiny[0], "decode", load_failure_policy="fail")
    try:
        recompute.add_request(prompts[2], GREEDY, "r", gone)
        assert finish(recompute)["r"].outputs[0].token_ids == reference[2]
        assert recompute.connector.snapshot().failures == 1
        fail.add_request(prompts[2], GREEDY, "f", gone)
        out = finish(fail)["f"]
        assert out.error is not None and "not held here" in out.error
        assert free_blocks(fail) == 64 and free_blocks(recompute) == 64
    finally:
        recompute.shutdown(), fail.shutdown()


def test_lease_expiry_frees_the_blocks(tiny, prompts):
    p = make(tiny[0], "prefill", lease_seconds=0.3)
    try:
        kv = prefill(p, [prompts[4]])[0]
        assert free_blocks(p) == 64 - len(kv["remote_block_ids"])
        wait_for(lambda: free_blocks(p) == 64)
        assert p.connector.snapshot().lease_expiries == 1
        assert p.idle_timeout() is None
    finally:
        p.shutdown()


def test_kv_params_for_another_prompt_are_refused(pair, prompts):
    p, d = pair
    kv = prefill(p, [prompts[0]])[0]
    with pytest.raises(ValueError, match="another prompt"):
        d.add_request(prompts[0][:-1] + [prompts[0][-1] ^ 1], GREEDY, "bad", kv)
    with pytest.raises(ValueError, match="lacks 'transfer_id'|lacks"):
        RemoteKV.from_dict({"remote_host": "x"})


def test_logprobs_n_and_one_token_answers_match_colocated(tiny, pair, prompts):
    p, d = pair
    colocated = make(tiny[0])
    cases = [SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True),
             SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
             SamplingParams(n=2, max_tokens=5, temperature=0.0, ignore_eos=True)]
    free_before = free_blocks(p)
    try:
        for k, params in enumerate(cases):
            first = SamplingParams(max_tokens=1, temperature=0.0, logprobs=params.logprobs)
            p.add_request(prompts[1], first, f"p{k}", {"do_remote_decode": True})
            kv = finish(p)[f"p{k}"].kv_transfer_params
            d.add_request(prompts[1], params, f"d{k}", kv)
            colocated.add_request(prompts[1], params, f"c{k}")
            got, want = finish(d)[f"d{k}"], finish(colocated)[f"c{k}"]
            assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
            if params.logprobs:
                for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
                    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
        # Every pull released its lease (earlier tests' unpulled leases still wait for expiry).
        wait_for(lambda: free_blocks(d) == 64 and free_blocks(p) == free_before)
    finally:
        colocated.shutdown()


def test_abort_while_pulling_frees_the_blocks_once_the_pull_ends(pair, prompts):
    p, d = pair
    kv = prefill(p, [prompts[4]])[0]
    d.add_request(prompts[4], GREEDY, "gone", kv)
    d.step()  # admitted: blocks allocated, the pull started
    assert "gone" in d.scheduler.loading or d.connector.snapshot().transfers
    d.abort_request("gone")
    wait_for(lambda: free_blocks(d) == 64 and d.connector.num_loads_in_flight == 0)
    assert not d.scheduler.loading and not d.has_unfinished_requests()


def test_a_lease_serves_only_its_own_prompt_and_blocks(pair, prompts, reference):
    """kv_transfer_params naming prompt A's digest but prompt B's lease: the prefill side refuses the
    pull (its lease holds B), so the decode side recomputes A, exactly."""
    p, d = pair
    kv_a, kv_b = prefill(p, [prompts[0], prompts[2]])
    forged = {**kv_a, "transfer_id": kv_b["transfer_id"], "remote_block_ids": kv_b["remote_block_ids"][:1]}
    failures = d.connector.snapshot().failures
    d.add_request(prompts[0], GREEDY, "forged", forged)
    assert finish(d)["forged"].outputs[0].token_ids == reference[0]
    assert d.connector.snapshot().failures == failures + 1
    ids = kv_b["remote_block_ids"]
    assert p.connector.leases.pin(kv_b["transfer_id"], ids[::-1], 0, len(ids), kv_b["prompt_digest"], 1) is None
    bad = {**kv_a, "first_token_id": 10**6}
    with pytest.raises(ValueError, match="token ids must be in"):
        d.add_request(prompts[0], GREEDY, "bad-token", bad)


def test_a_reused_request_id_does_not_free_the_new_pull(pair, prompts, reference):
    p, d = pair
    free_before = free_blocks(d)
    kv1, kv2 = prefill(p, [prompts[1], prompts[1]])
    d.add_request(prompts[1], GREEDY, "x", kv1)
    d.step()
    d.abort_request("x")  # its pull may still be running
    d.add_request(prompts[1], GREEDY, "x", kv2)
    assert finish(d)["x"].outputs[0].token_ids == reference[1]
    wait_for(lambda: d.connector.num_loads_in_flight == 0 and free_blocks(d) == free_before)


def _mooncake_or_skip() -> None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:  # the package, or the libibverbs it links against (scripts/install.sh test)
        pytest.skip(f"Mooncake Transfer Engine not installed here: {e}")


@pytest.mark.parametrize("cache_dtype", ["auto", "int8"])
def test_mooncake_reads_match_colocated_byte_for_byte(tiny, prompts, reference, cache_dtype):
    """--kv-transport mooncake: the decode engine reads the leased blocks one-sidedly (Mooncake's TCP
    transport), scales included; output equals colocated, blocks equal byte for byte, nothing leaks."""
    _mooncake_or_skip()
    cache = CacheConfig(num_blocks=64, cache_dtype=cache_dtype, quant_group=4)  # type: ignore[arg-type]
    p = make(tiny[0], "prefill", cache, kv_transport="mooncake")
    d = make(tiny[0], "decode", cache, kv_transport="mooncake", load_failure_policy="fail")
    colocated = make(tiny[0], cache=cache)
    try:
        params, got, want = decode_beside_colocated(p, d, colocated, prompts)
        assert all(got[str(i)].error is None for i in range(len(prompts)))
        assert [got[str(i)].outputs[0].token_ids for i in range(len(prompts))] == \
            [want[str(i)].outputs[0].token_ids for i in range(len(prompts))]
        if cache_dtype == "auto":
            assert [got[str(i)].outputs[0].token_ids for i in range(len(prompts))] == reference
        assert_second_prompts_first_block_moved_exactly(p, d, params, prompts)
        stats = d.connector.snapshot()
        assert stats.transfers == len(prompts) and stats.failures == 0 and stats.bytes > 0
        assert p.connector.snapshot().bytes == stats.bytes  # what was pinned is what was read
        wait_for(lambda: free_blocks(p) == 64)  # every lease released by the decode side's done
        assert free_blocks(d) == 64
        assert not p.connector.server._pins  # every pin undone
    finally:
        for e in (p, d, colocated):
            e.shutdown()


def test_mooncake_decode_refuses_a_prefill_without_it(tiny, prompts):
    _mooncake_or_skip()
    p = make(tiny[0], "prefill")
    d = make(tiny[0], "decode", kv_transport="mooncake", load_failure_policy="fail")
    try:
        kv = prefill(p, [prompts[0]])[0]
        d.add_request(prompts[0], GREEDY, "x", kv)
        out = finish(d)["x"]
        assert out.error is not None and "--kv-transport mooncake" in out.error
        assert free_blocks(d) == 64
    finally:
        p.shutdown(), d.shutdown()


# -- overlapped transfers: pulled layer by layer while the prefill engine computes the prompt --------
def overlapped(p: LLMEngine, transfer_id: str) -> dict:
    """What the router sends a decode engine before the prompt is computed: the transfer and where."""
    return {"transfer_id": transfer_id, "remote_host": "127.0.0.1", "remote_port": p.connector.kv_port}


def start_overlapped(p: LLMEngine, d: LLMEngine, prompt: list[int]) -> str:
    """One prompt sent to both engines at once, as "p" and "d", and one decode step; the transfer id."""
    tid = uuid.uuid4().hex
    p.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), "p", {"do_remote_decode": True, "transfer_id": tid})
    d.add_request(prompt, GREEDY, "d", overlapped(p, tid))
    d.step()
    return tid


def run_both(p: LLMEngine, d: LLMEngine, timeout: float = 30.0) -> dict:
    """Step both engines (one thread, as two processes would interleave) until both are done; d's outputs."""
    done = {}
    deadline = time.monotonic() + timeout
    while p.has_unfinished_requests() or d.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish"
        if p.has_unfinished_requests():
            p.step()
        for out in d.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_overlapped_transfer_equals_colocated_and_brings_the_first_token(tiny, prompts, reference):
    """The decode engine asks first (its pulls park on the prefill engine's server, the transfer not
    yet known there), then the prompts reach the prefill engine; the pulls are answered as its layers are
    written, the final done brings the first token (the decode engine runs none of the prompt), and no
    block or lease is left on either side."""
    p, d = make(tiny[0], "prefill"), make(tiny[0], "decode")
    try:
        ids = [uuid.uuid4().hex for _ in prompts]
        for i, (pr, tid) in enumerate(zip(prompts, ids)):
            d.add_request(pr, GREEDY, str(i), overlapped(p, tid))
        for _ in range(3):
            d.step()  # pulls out, parked on the server: the prompts have not reached the prefill engine
        for i, (pr, tid) in enumerate(zip(prompts, ids)):
            p.add_request(pr, SamplingParams(max_tokens=1, temperature=0.0), f"p{i}",
                          {"do_remote_decode": True, "transfer_id": tid})
        # One more whose first token ends it (max_tokens 1): it never reaches a decode step.
        one = uuid.uuid4().hex
        d.add_request(prompts[3], SamplingParams(max_tokens=1, temperature=0.0), "one", overlapped(p, one))
        p.add_request(prompts[3], SamplingParams(max_tokens=1, temperature=0.0), "p-one",
                      {"do_remote_decode": True, "transfer_id": one})
        got = run_both(p, d)
        assert [got[str(i)].outputs[0].token_ids for i in range(len(prompts))] == reference
        assert got["one"].outputs[0].token_ids == reference[3][:1]
        # The decode engine computed only its decode steps: every first token came from the prefill side.
        assert d.num_computed_tokens == len(prompts) * (GREEDY.max_tokens - 1)
        snap_p, snap_d = p.connector.snapshot(), d.connector.snapshot()
        assert snap_d.failures == 0 and snap_d.transfers == len(prompts) + 1
        assert snap_p.early_reads > 0  # some layers were read while their prompt was still computed
        wait_for(lambda: free_blocks(p) == 64 and p.connector.snapshot().active_leases == 0)
        assert free_blocks(d) == 64
    finally:
        p.shutdown(), d.shutdown()


def test_overlapped_prefill_aborted_recomputes_on_the_decode_side(tiny, prompts, reference):
    p, d = make(tiny[0], "prefill"), make(tiny[0], "decode")
    try:
        start_overlapped(p, d, prompts[2])
        p.abort_request("p")  # before any step: its expected lease ends; the parked pulls are refused
        assert finish(d)["d"].outputs[0].token_ids == reference[2]
        assert d.connector.snapshot().failures == 1
        assert free_blocks(p) == 64 and p.connector.snapshot().active_leases == 0 and free_blocks(d) == 64
    finally:
        p.shutdown(), d.shutdown()


def test_overlapped_params_are_checked(tiny, pair, prompts):
    p, d = pair
    tid = uuid.uuid4().hex
    with pytest.raises(ValueError, match="max_tokens = 1"):
        p.add_request(prompts[0], GREEDY, "x", {"do_remote_decode": True, "transfer_id": tid})
    with pytest.raises(ValueError, match="transfer_id must be"):
        p.add_request(prompts[0], SamplingParams(max_tokens=1), "y", {"do_remote_decode": True, "transfer_id": "short"})
    p.add_request(prompts[0], SamplingParams(max_tokens=1), "z", {"do_remote_decode": True, "transfer_id": tid})
    with pytest.raises(ValueError, match="already in use"):
        p.add_request(prompts[0], SamplingParams(max_tokens=1), "w", {"do_remote_decode": True, "transfer_id": tid})
    p.abort_request("z")
    with pytest.raises(ValueError, match="another prompt"):
        d.add_request(prompts[0], GREEDY, "v", {**overlapped(p, tid), "num_tokens": len(prompts[0]) + 1})
    with pytest.raises(ValueError, match="takes no first_token_id"):
        d.add_request(prompts[0], GREEDY, "u", {**overlapped(p, tid), "first_token_id": 3})


def test_a_lease_is_read_layer_by_layer_as_the_step_writes_it():
    """The lease table's view of an overlapped prompt: in the step that finishes it, layer k is readable
    once k layers are written; a chunk that does not finish it is not read early (the request could
    still be preempted), nor is the prompt between that step's end and the request's."""
    from quadrant.disagg.leases import LeaseTable
    from quadrant.disagg.protocol import RemoteKV
    from quadrant.disagg.transport import Wait
    from quadrant.engine.request import Request

    tid = "t" * 16
    table = LeaseTable(60.0)
    req = Request("r", list(range(10)), SamplingParams(max_tokens=1))
    req.kv_transfer_id, req.block_table = tid, [7, 3, 5]
    table.expect(tid, req, "digest", in_place=True)
    pin = lambda layers_end: table.pin(tid, None, 0, 3, "digest", layers_end)  # noqa: E731
    assert isinstance(pin(1), Wait)
    leases = table.start_step([(req, 6)])  # a first chunk
    table.layer_done(leases)
    assert isinstance(pin(1), Wait)
    table.end_step(leases)
    req.num_computed_tokens = 6
    leases = table.start_step([(req, 4)])  # the last chunk: layer by layer
    table.layer_done(leases)
    assert pin(1) == (leases[0], [7, 3, 5]) and isinstance(pin(2), Wait)
    table.unpin(tid)
    table.end_step(leases)
    assert isinstance(pin(1), Wait) and isinstance(table.release(tid), Wait)  # done waits for the first token
    assert table.pin(tid, None, 0, 3, "other", 1) is None  # another prompt's digest
    table.add(tid, req, RemoteKV(tid, "h", 1, (7, 3, 5), 10, "digest", 42))
    assert pin(3) == (leases[0], [7, 3, 5]) and table.pin(tid, None, 1, 3, "digest", 1) is None  # past its blocks
    table.unpin(tid)
    assert table.release(tid).first_token == 42 and table.take_freeable() == [req]
    assert table.pin(tid, None, 0, 3, "digest", 1) is None  # ended: refused at once, not parked


def test_overlapped_request_aborted_on_the_decode_side_abandons_the_transfer(tiny, prompts):
    """The decode request is aborted while its load waits for the prompt: the load gives up at the next
    ping, frees its blocks, and abandons the transfer; the prefill engine then frees the prompt's blocks
    as soon as it is computed instead of holding them for a lease nobody will pull."""
    p, d = make(tiny[0], "prefill"), make(tiny[0], "decode")
    try:
        tid = start_overlapped(p, d, prompts[4])  # its load asks to wait for the prompt's last step
        d.abort_request("d")
        wait_for(lambda: free_blocks(d) == 64 and d.connector.num_loads_in_flight == 0)
        wait_for(lambda: p.connector.leases._leases[tid].abandoned)
        finish(p)
        assert free_blocks(p) == 64 and p.connector.snapshot().active_leases == 0
        assert p.connector.snapshot().lease_expiries == 0
    finally:
        p.shutdown(), d.shutdown()


def test_a_released_lease_waits_for_its_other_readers():
    from quadrant.disagg.leases import LeaseTable
    from quadrant.disagg.protocol import RemoteKV
    from quadrant.engine.request import Request

    tid = "u" * 16
    table = LeaseTable(60.0)
    req = Request("r", list(range(10)), SamplingParams(max_tokens=1))
    table.add(tid, req, RemoteKV(tid, "h", 1, (7, 3, 5), 10, "digest", 42))
    assert table.pin(tid, [7, 3], 0, 2, "digest", 1) is not None  # a second reader, mid-read
    assert table.release(tid).first_token == 42  # the first reader is done
    assert table.take_freeable() == [] and table.pin(tid, [7], 0, 1, "digest", 1) is None
    table.unpin(tid)
    assert table.take_freeable() == [req] and table.expiries == 0 and len(table) == 0


def test_a_gpu_layer_is_read_once_its_event_has_completed():
    """On CUDA a layer counts as written when the host has queued it; the read waits for its event (here a
    stand-in with CUDA events' query(): no GPU on this machine) and asks to be tried again soon."""
    from quadrant.disagg.leases import LeaseTable
    from quadrant.disagg.transport import Wait
    from quadrant.engine.request import Request

    class Event:
        done = False

        def query(self) -> bool:
            return self.done

    tid = "g" * 16
    table = LeaseTable(60.0)
    req = Request("r", list(range(8)), SamplingParams(max_tokens=1))
    req.kv_transfer_id, req.block_table = tid, [4, 2]
    table.expect(tid, req, "digest", in_place=True)
    leases = table.start_step([(req, 8)])
    event = Event()
    assert table.layer_done(leases, event) is False  # nobody waits for one layer yet
    first = table.pin(tid, None, 0, 2, "digest", 1)
    assert isinstance(first, Wait) and first.soon
    assert table.layer_done(leases, Event()) is False and table.layer_done(leases, Event()) is False
    assert isinstance(table.pin(tid, None, 0, 2, "digest", 4), Wait) and not table.pin(tid, None, 0, 2, "digest", 4).soon
    assert table.layer_done(leases, Event()) is True  # a pull waits for 4 layers
    event.done = True
    assert table.pin(tid, None, 0, 2, "digest", 1) == (leases[0], [4, 2])
