"""The benchmark scripts run end to end on tiny shapes (their figures come from real runs, recorded
in BENCHMARKS.md; here only that each script works and reports every workload)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_decode_smoke(tmp_path):
    """CPU, tiny model: copy bandwidth, batch-1 against roofline and transformers, a throughput
    run, and the Triton decode-attention kernel (interpreter) with a full and an int8 cache."""
    out = tmp_path / "rows.json"
    _load("gpu_decode").main(["--smoke", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())
    names = [r["workload"] for r in rows]
    assert sum("batch 1" in n for n in names) == 4  # two shapes x (roofline, transformers)
    assert any("ShareGPT-like" in n for n in names)
    assert sum("decode attention" in n for n in names) == 4
    assert all(r["ours"] > 0 for r in rows)


def test_overlap_smoke(capsys, default_gguf_path):
    _load("overlap").main(["--smoke"])
    out = capsys.readouterr().out
    assert "overlapped scheduling" in out
    for batch in (1, 2):  # a row per batch size, with its on/off ratio and the share of overlapped steps
        assert re.search(rf"│\s+{batch} │.*\d\.\d\dx │.*\d+% │", out), out


def test_gpu_moe_smoke(capsys):
    """CPU, tiny expert shapes: the Triton fused MoE (interpreter) and the loop, bf16-free."""
    _load("gpu_moe").main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "int8 (w8a16)" in out and "tiny" in out


def test_train_mfu_smoke(capsys):
    """CPU, tiny llama: the training step and transformers' in one table, with MFU."""
    rows = _load("train_mfu").main(["--smoke", "--device", "cpu"])
    assert [r["workload"] for r in rows] == ["quadrant train step", "transformers LlamaForCausalLM"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert "training MFU" in capsys.readouterr().out


def test_train_stability_and_sparsity_smoke(capsys, alice_corpus, monkeypatch):
    """Two steps of every variant on the repository's Alice corpus (the real runs fetch the books)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # their shared corpus module
    corpus = ["--corpus", str(alice_corpus), str(alice_corpus)]
    _load("train_stability").main(["--steps", "2", "--batch", "1", "--seq-len", "16", "--lrs", "1e-3", *corpus])
    out = capsys.readouterr().out
    assert "depth-scaled sandwich + TinyInit" in out and "held-out loss" in out
    _load("train_sparsity").main(["--steps", "2", "--batch", "2", "--seq-len", "16", *corpus])
    out = capsys.readouterr().out
    assert "MoE 8x(F/2) top-2" in out and "dense-4x" in out


def test_parallel_benchmarks_smoke(capsys):
    """Two real worker processes count their collectives' bytes: exactly the layer plan's; the cost
    model prints every deployment and the published peers."""
    measured, analytic = _load("parallel_cpu").collective_bytes(batch=2, steps=2)
    assert measured == analytic and analytic["all_reduce"] > 0
    _load("parallel_cost_model").main([])
    out = capsys.readouterr().out
    assert "Llama-3-70B tp=8" in out and "DeepSeek-V3 ep=32" in out and "SGLang" in out


def test_kv_transfer_benchmark_smoke():
    """The KV transfer benchmark moves an int8 prompt's blocks (checked byte for byte inside, over
    pyzmq and, where it is installed, Mooncake) and times its peers."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401

        mooncake = ["quadrant Mooncake TCP reads, 2 streams"]
    except ImportError:
        mooncake = []
    rows = _load("kv_transfer").run("smollm2-135m", 64, "int8", [2], repeats=1)
    assert [r["what"] for r in rows] == ["quadrant pyzmq, 2 streams", *mooncake, "raw TCP socket, 1 stream",
                                         "memcpy (torch copy_)"]
    assert all(r["gbps"] > 0 and r["bytes"] == rows[0]["bytes"] for r in rows)


def test_disagg_simulator_smoke(capsys):
    """Made-up step costs: one request alone gets the hand-computed TTFT and TPOT, colocated and 1P1D; with
    long prompts and a tight TPOT, disaggregation beats colocation per GPU, and loses when the KV transfer
    alone breaks the TTFT SLO. The script prints both tables with its stored costs."""
    sim = _load("disagg_simulator")
    cost = sim.StepCost(fixed_s=0.01, per_prefill_token_s=1e-4, per_decode_row_s=1e-4, per_context_token_s=1e-6)
    engine = sim.Engine(cost, max_num_batched_tokens=2048, max_num_seqs=64)
    link = sim.Link(bytes_per_token=1e3, bytes_per_s=1e6, latency_s=0.005)  # 1,000 tokens: 1.005 s
    (alone,) = sim.simulate(sim.Colocated(engine), [sim.Request(0.5, 1000, 11)])
    assert alone.ttft == pytest.approx(0.01 + 1000 * 1e-4)
    # each decode step: fixed + one row + its context (prompt + tokens so far: 1001, 1002, ... 1010)
    assert alone.tpot == pytest.approx(0.01 + 1e-4 + 1e-6 * (1001 + 1010) / 2)
    (split,) = sim.simulate(sim.Disaggregated(engine, engine, link), [sim.Request(0.5, 1000, 11)])
    assert split.ttft == pytest.approx(0.01 + 1000 * 1e-4 + 0.005 + 1.0)  # prompt, then the transfer
    assert split.tpot == pytest.approx(alone.tpot)

    engine = sim.Engine(sim.StepCost(fixed_s=0.01, per_prefill_token_s=1e-4, per_decode_row_s=1e-4,
                                     per_context_token_s=0.0), max_num_batched_tokens=2048, max_num_seqs=64)
    lengths = [(1000, 100)] * 200
    slo = sim.SLO(ttft_s=0.5, tpot_s=0.013)
    colocated = sim.goodput(sim.Colocated(engine, 2), lengths, slo) / 2
    fast = sim.Link(bytes_per_token=1e3, bytes_per_s=1e9, latency_s=1e-3)
    disaggregated = sim.goodput(sim.Disaggregated(engine, engine, fast), lengths, slo) / 2
    # 0.25 s a prompt: alone within the TTFT SLO, but the link carries only 4 prompts a second
    slow = sim.goodput(sim.Disaggregated(engine, engine, sim.Link(1e3, 4e6, 0.0)), lengths, slo) / 2
    too_slow = sim.goodput(sim.Disaggregated(engine, engine, link), lengths, slo)  # 1 s a prompt: past the SLO
    # colocated: each prompt that joins a step stretches it by 0.1 s, which its decode rows feel in their TPOT
    assert disaggregated > 1.5 * colocated > 0
    assert 0 < slow < colocated and too_slow == 0

    sim.main(["--num-requests", "300"])
    out = capsys.readouterr().out
    assert "CPU check" in out and "1P1D (1 core each)" in out and "3P1D" in out and "TCP 25 Gb/s" in out
    assert "DistServe" in out and "Splitwise" in out
