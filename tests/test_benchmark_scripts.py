"""The benchmark scripts run end to end on tiny shapes (their figures come from real runs, recorded
in BENCHMARKS.md; here only that each script works and reports every workload)."""

from __future__ import annotations

import importlib.util
import json
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
    """The KV transfer benchmark moves an int8 prompt's blocks (checked byte for byte inside) and
    times its peers."""
    rows = _load("kv_transfer").run("smollm2-135m", 64, "int8", [2], repeats=1)
    assert [r["what"] for r in rows] == ["quadrant pyzmq, 2 streams", "raw TCP socket, 1 stream",
                                         "memcpy (torch copy_)"]
    assert all(r["gbps"] > 0 and r["bytes"] == rows[0]["bytes"] for r in rows)
