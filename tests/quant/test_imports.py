"""Module boundaries of quant/: the grids are a torch-only leaf, and the quantised-folder format
(quant/folder.py) sits below both its writer (quant/quantize.py) and its reader
(loader/source.py), so those two need not import each other at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import quadrant

ROOT = Path(quadrant.__file__).parent


def _imports(rel: str) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_grids_import_torch_only():
    assert {n.split(".")[0] for n in _imports("quant/grids.py")} <= {"__future__", "torch"}


def test_folder_format_imports_neither_its_writer_nor_its_reader():
    assert not {"quadrant.loader.source", "quadrant.quant.quantize"} & _imports("quant/folder.py")
    assert "quadrant.quant.quantize" not in _imports("loader/source.py")


def test_moved_names_stay_importable_from_their_old_homes():
    from quadrant.quant import folder, formats, grids, quantize

    assert formats.int4_groups is grids.int4_groups and formats.int8_per_token is grids.int8_per_token
    assert quantize.quantize_tensor is folder.quantize_tensor and quantize.QuantizeError is folder.QuantizeError


def test_format_registry_is_a_leaf_and_the_one_list():
    from quadrant.quant.formats import FORMATS
    from quadrant.quant.registry import GPU_FORMATS, QUANT_FORMATS, WEIGHT_FORMATS, format_spec

    assert {n.split(".")[0] for n in _imports("quant/registry.py")} <= {"__future__", "dataclasses", "types"}
    assert set(FORMATS) == set(WEIGHT_FORMATS)  # every registered format has its CPU kernels
    assert QUANT_FORMATS == ("int8", "w8a8", "w4a16", "w4a8") and GPU_FORMATS == ("dense", "w8a8", "w4a8")
    assert format_spec("w4a8").four_bit and format_spec("w4a8").activation_bits == 8
    with pytest.raises(ValueError, match="dense, int8, w8a8, w4a16, w4a8"):
        format_spec("q3")
