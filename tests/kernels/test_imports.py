"""Kernels are leaves: they import other kernels, torch and Triton, and from the rest of quadrant
only the torch-only grids (quant/grids.py). Layers call the kernels' `*_ref` for their CPU path,
never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import quadrant.kernels

ALLOWED = ("quadrant.kernels", "quadrant.quant.grids")


def _quadrant_imports(path: Path) -> set[str]:
    """Every quadrant module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "quadrant" or n.startswith("quadrant.")}


def test_kernels_import_no_layers_engine_or_formats():
    folder = Path(quadrant.kernels.__file__).parent
    outside = {f"{f.name}: {name}" for f in sorted(folder.glob("*.py")) for name in _quadrant_imports(f)
               if not name.startswith(ALLOWED)}
    assert not outside
