"""Hugging Face folders: config.json + (sharded) *.safetensors, read memory-mapped, and written.

Tensors are yielded one at a time straight from the mapped file, so loading
never holds a second full copy of the weights. A new folder is written beside
its destination and moved into place at the end, so it appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from quadrant.config import ModelConfig
from quadrant.errors import ModelLoadError, UnsupportedError

if TYPE_CHECKING:
    from quadrant.tokenizer import Tokenizer


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> ModelConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read ({e})") from e
    try:
        return ModelConfig.from_hf_config(raw)
    except KeyError as e:
        raise ModelLoadError(f"{folder / 'config.json'}: missing field {e}") from e
    except ValueError as e:
        raise UnsupportedError(f"{folder}: {e}") from e


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:
            # safetensors validates header offsets against the file size and raises here.
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from e


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; moved to `out` when the block ends, removed if it raises,
    so the new folder appears whole or not at all (model folders, training corpora)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if out.parent.exists() else None))
    try:
        yield tmp
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(out: Path, config: dict[str, Any], tokenizer: Tokenizer | None,
                 write_weights: Callable[[Path], None]) -> None:
    """A new model folder at `out` (which must not exist): `write_weights(folder)` writes the
    safetensors, then config.json and the tokenizer files; on any failure nothing is left."""
    with staged_folder(out) as tmp:
        write_weights(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
