"""The training benchmarks' corpus: public-domain books from the Canterbury corpus, shipped in the
PyPI sdist of `brotli` (tests/testdata), fetched with pip (a package registry, not a model hub) and
prepared once under $QUADRANT_HOME/data. Each book is split 95/5 into a training and a held-out part.

Books: alice29.txt (Carroll, Alice's Adventures in Wonderland, 1865), plrabn12.txt (Milton, Paradise
Lost, 1667), asyoulik.txt (Shakespeare, As You Like It, c. 1599), lcet10.txt (a 1990s Library of
Congress conference report, a US federal government work).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BROTLI = "brotli==1.2.1"
BOOKS = ("alice29.txt", "plrabn12.txt", "asyoulik.txt", "lcet10.txt")


def canterbury(tokenizer_ref: str = "smollm2:135m") -> tuple[Path, Path]:
    """(train corpus, held-out corpus) folders, prepared with `tokenizer_ref`'s tokenizer."""
    from quadrant import envs
    from quadrant.loader.source import open_pulled
    from quadrant.train.data import prepare

    root = envs.quadrant_home() / "data" / f"canterbury-{tokenizer_ref.replace(':', '-').replace('/', '_')}"
    train, held = root / "train", root / "heldout"
    if train.is_dir() and held.is_dir():
        return train, held
    tokenizer = open_pulled(tokenizer_ref).tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        BROTLI, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("brotli-*.tar.gz"))
        parts: dict[str, list[Path]] = {"train": [], "heldout": []}
        with tarfile.open(sdist) as tar:
            for book in BOOKS:
                member = next(m for m in tar.getmembers() if m.name.endswith(f"tests/testdata/{book}"))
                text = tar.extractfile(member).read().decode("latin-1").replace("\r\n", "\n")  # type: ignore[union-attr]
                cut = text.rfind("\n\n", 0, int(len(text) * 0.95))
                for split, piece in (("train", text[:cut]), ("heldout", text[cut:])):
                    path = Path(tmp) / split / book
                    path.parent.mkdir(exist_ok=True)
                    path.write_text(piece)
                    parts[split].append(path)
        root.mkdir(parents=True, exist_ok=True)
        prepare(parts["train"], train, tokenizer, tokenizer_ref, progress=False)
        prepare(parts["heldout"], held, tokenizer, tokenizer_ref, progress=False)
    return train, held
