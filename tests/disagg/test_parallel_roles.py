"""Prefill and decode engines whose model runs in --tp/--ep worker processes (real processes over gloo),
moving KV blocks to and from engines of another --tp over real zmq sockets: greedy output equal to a
colocated one-process engine (fp32: identical tokens, as tests/parallel holds tp=2 to tp=1), 8-bit
blocks with their scales, and no block or lease left behind on either side."""

from __future__ import annotations

import pytest
import torch

from quadrant import SamplingParams
from quadrant.config import CacheConfig, KVTransferConfig, SchedulerConfig
from quadrant.disagg.connector import KVConnector
from quadrant.disagg.protocol import KVLayout, KVTransferError
from quadrant.engine.kv_cache import join_kv_heads, kv_head_slice
from quadrant.engine.engine import LLMEngine
from tests.disagg.test_kv_transfer import decode_beside_colocated, free_blocks, prefill, wait_for
from tests.engine.conftest import GREEDY, prompts, reference, tiny  # noqa: F401 - fixtures
from tests.models.test_moe import _make as make_moe

pytest.importorskip("zmq")
pytestmark = pytest.mark.slow

INT8 = CacheConfig(num_blocks=64, cache_dtype="int8", quant_group=4)


def make(path: str, role: str = "both", cache: CacheConfig | None = None, tp: int = 1, ep: int = 1,
         **transfer) -> LLMEngine:
    return LLMEngine.from_model(path, cache=cache or CacheConfig(num_blocks=64),
                                scheduler=SchedulerConfig(max_num_batched_tokens=64),
                                tensor_parallel_size=tp, expert_parallel_size=ep,
                                kv_transfer=KVTransferConfig(role=role, **transfer))  # type: ignore[arg-type]


def tokens(outs: dict, n: int) -> list[list[int]]:
    return [outs[str(i)].outputs[0].token_ids for i in range(n)]


def check_pair(p: LLMEngine, d: LLMEngine, colocated: LLMEngine, prompts: list[list[int]]) -> None:
    """p's KV decoded on d equals colocated's own run; p freed its blocks at once (a staged lease holds a
    host copy) or once d said done, and d holds none."""
    total_p, total_d = free_blocks(p), free_blocks(d)
    params, got, want = decode_beside_colocated(p, d, colocated, prompts)
    assert tokens(got, len(prompts)) == tokens(want, len(prompts))
    assert all(kv["num_tokens"] == len(pr) for kv, pr in zip(params, prompts))
    wait_for(lambda: free_blocks(p) == total_p and p.connector.snapshot().active_leases == 0)
    assert free_blocks(d) == total_d
    snap = d.connector.snapshot()
    assert snap.failures == 0 and snap.transfers >= len(prompts)


@pytest.fixture(scope="module")
def engines(tiny):
    """Prefill and decode engines at tp=1 (in process) and tp=2 (worker processes), and a colocated one."""
    made = {"p1": make(tiny[0], "prefill"), "d1": make(tiny[0], "decode"), "colocated": make(tiny[0])}
    try:
        made["p2"] = make(tiny[0], "prefill", tp=2)
        made["d2"] = make(tiny[0], "decode", tp=2)
        yield made
    finally:
        for e in made.values():
            e.shutdown()


@pytest.mark.parametrize("pair", [("p2", "d1"), ("p1", "d2"), ("p2", "d2")])
def test_tp_prefill_and_decode_equal_a_colocated_engine(engines, prompts, pair):
    p, d = engines[pair[0]], engines[pair[1]]
    assert p.connector.holds_blocks == (pair[0] == "p1")  # worker processes: the lease keeps a host copy
    check_pair(p, d, engines["colocated"], prompts)


def test_int8_blocks_with_scales_between_tp2_engines(tiny, prompts):
    p = make(tiny[0], "prefill", INT8, tp=2)
    d = make(tiny[0], "decode", INT8, tp=2)
    colocated = make(tiny[0], cache=INT8)
    try:
        check_pair(p, d, colocated, prompts)
        # Whole 8-bit blocks with their scales moved, every head of them.
        assert d.connector.snapshot().bytes % INT8.bytes_per_block(colocated.model_config, torch.float32) == 0
    finally:
        for e in (p, d, colocated):
            e.shutdown()


def test_ep_prefill_of_a_moe_model_decodes_in_one_process(tmp_path, prompts):
    """Expert-parallel ranks each keep every KV head (attention is replicated): rank 0's tp group answers."""
    make_moe("mixtral", tmp_path)
    p = make(str(tmp_path), "prefill", ep=2)
    d, colocated = make(str(tmp_path), "decode"), make(str(tmp_path))
    try:
        check_pair(p, d, colocated, prompts)
    finally:
        for e in (p, d, colocated):
            e.shutdown()


def test_lease_expiry_frees_a_staged_copy(tiny, prompts):
    p = make(tiny[0], "prefill", lease_seconds=0.3, tp=2)
    try:
        prefill(p, [prompts[4]])
        assert free_blocks(p) == 64  # the blocks went back at once: the lease holds a host copy
        assert p.connector.snapshot().active_leases == 1
        wait_for(lambda: free_blocks(p) == 64 and p.connector.snapshot().active_leases == 0)  # housekeeping expires it
        assert p.connector.snapshot().lease_expiries == 1
    finally:
        p.shutdown()


def test_kv_heads_of_tp_ranks_join_into_the_models():
    # 2 KV heads over 4 ranks: ranks 0, 1 share head 0 and ranks 2, 3 head 1 (ModelConfig.shard's split).
    assert [kv_head_slice(2, r, 4) for r in range(4)] == [slice(0, 1), slice(0, 1), slice(1, 2), slice(1, 2)]
    assert [kv_head_slice(4, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    full = torch.randn(3, 2, 4, 8)  # blocks, heads, block size, head dim
    shards = [[[full[:, kv_head_slice(2, r, 4)]]] for r in range(4)]
    assert torch.equal(join_kv_heads(shards, 2)[0][0], full)
    shards = [[[full[:, kv_head_slice(2, r, 2)]]] for r in range(2)]
    assert torch.equal(join_kv_heads(shards, 2)[0][0], full)


def test_mooncake_with_worker_processes_is_refused_clearly(tiny, engines):
    with pytest.raises(ValueError, match="--kv-transport zmq"):
        make(tiny[0], "prefill", tp=2, kv_transport="mooncake")  # before any worker process starts
    layout = KVLayout.of(engines["p1"].model_config, CacheConfig(), torch.float32)
    with pytest.raises(KVTransferError, match="--kv-transport zmq"):
        KVConnector(KVTransferConfig(role="decode", kv_transport="mooncake"), layout, None, engines["p2"].executor)


def test_overlapped_pull_from_a_tp_prefill_waits_for_its_copy(engines, prompts, reference):
    """A --tp prefill engine copies a prompt's blocks out of its workers when the prompt is done: an
    overlapped pull waits for that copy, then decodes as a colocated engine does."""
    import uuid

    from tests.disagg.test_kv_transfer import overlapped, run_both

    p, d = engines["p2"], engines["d1"]
    ids = [uuid.uuid4().hex for _ in prompts]
    for i, (pr, tid) in enumerate(zip(prompts, ids)):
        d.add_request(pr, GREEDY, f"o{i}", overlapped(p, tid))
        p.add_request(pr, SamplingParams(max_tokens=1, temperature=0.0), f"po{i}",
                      {"do_remote_decode": True, "transfer_id": tid})
    got = run_both(p, d)
    assert [got[f"o{i}"].outputs[0].token_ids for i in range(len(prompts))] == reference
    assert p.connector.snapshot().early_reads == 0  # nothing is read before the copy exists
    wait_for(lambda: free_blocks(p) == 64 and p.connector.snapshot().active_leases == 0)
