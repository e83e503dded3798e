"""Helpers for training tests: tiny training configs written as TOML (the corpus fixture,
`alice_corpus`, is in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_MODEL = dict(architecture="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)  # numbers, booleans, strings and lists read the same in TOML


def write_config(folder: Path, corpus: Path, model: dict | None = None, stages: list[dict] | None = None,
                 **tables: dict) -> Path:
    """A training TOML in `folder`: TINY_MODEL updated by `model`, one source `alice`, given tables."""
    lines = ["[model]"] + [f"{k} = {_toml_value(v)}" for k, v in {**TINY_MODEL, **(model or {})}.items()]
    lines += ["", "[data]", f"sources = {{ alice = {json.dumps(str(corpus))} }}"]
    for stage in stages or [dict(name="main", steps=10, seq_len=32, mixture={"alice": 1.0})]:
        lines += ["", "[[stages]]"] + [f"{k} = {_toml_value(v)}" for k, v in stage.items()]
    defaults = {"optim": dict(lr=3e-3, warmup_steps=2), "checkpoint": dict(folder=str(folder / "ckpt")),
                "train": dict(global_batch=4, metrics_file=str(folder / "metrics.jsonl"))}
    for name, table in {**defaults, **{k: {**defaults.get(k, {}), **v} for k, v in tables.items()}}.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path = folder / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
