"""The benchmark scripts run end to end on tiny shapes (their figures come from real runs, recorded
in BENCHMARKS.md; here only that each script works and reports every workload)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
