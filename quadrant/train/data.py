"""Training data: `quadrant data prepare` token shards, and the packed, rank-sharded, resumable loader.

A prepared corpus is a folder: `manifest.json`, then per shard `NNNNN.tokens` (uint32 ids, documents
back to back, each ended by EOS), `NNNNN.docs` (int64 offsets where documents start) and, for chat
data, `NNNNN.mask` (uint8, 1 on assistant tokens: the only ones with a loss).

The loader cuts a source into windows of seq_len + 1 tokens. Global sample g of a stage takes a
source drawn by the stage's mixture weights (a seeded draw per sample) and that source's next window
in a seeded permutation, so a batch is a pure function of (seed, stage, step): resuming needs only
the step, and rank r of a data-parallel group of n takes samples r, r + n, ... of each global batch.
Positions restart at every document start (and at each window's start), so attention never crosses
documents, and a label whose token opens a new document, or is masked, is ignored (-100).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from quadrant.errors import QuadrantError
from quadrant.loader.safetensors import staged_folder
from quadrant.tokenizer import Tokenizer
from quadrant.train.config import StageConfig

IGNORE_INDEX = -100
MANIFEST = "manifest.json"


class DataError(QuadrantError, ValueError):
    """A corpus that cannot be prepared or read (the message names the fix)."""


# ---------------------------------------------------------------------------------------- prepare
@dataclass
class Document:
    ids: list[int]
    mask: list[int] | None = None  # chat data: 1 where the token is trained on


def iter_documents(paths: list[Path], fmt: str, tokenizer: Tokenizer, text_key: str = "text") -> Iterator[Document]:
    """Tokenised documents: a text file is one document, a JSONL line one document (`text_key`),
    a chat JSONL line one conversation ({"messages": [...]}) rendered with the chat template."""
    for path in paths:
        if fmt == "text":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(tokenizer.encode(text))
            continue
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if fmt == "chat":
                    yield chat_document(record, tokenizer, f"{path}:{line_no}")
                elif not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise DataError(f"{path}:{line_no}: expected an object with a string {text_key!r}")
                elif record[text_key].strip():
                    yield Document(tokenizer.encode(record[text_key]))


def chat_document(record: Any, tokenizer: Tokenizer, where: str) -> Document:
    """A conversation as ids plus a mask that is 1 exactly on the assistant turns' tokens.

    The template renders the conversation once; each assistant turn's characters are those the
    rendering of messages[:i + 1] adds to that of messages[:i] with the generation prompt, i.e. its
    content and end-of-turn marker. A token is trained on when it starts inside such a span."""
    from quadrant.chat import render_chat

    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f"{where}: expected an object with a 'messages' list")
    if tokenizer.chat_template is None:
        raise DataError("the tokenizer has no chat template; chat data needs one")
    messages = record["messages"]
    special = tokenizer.special_tokens
    try:
        text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=False, special_tokens=special)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = len(render_chat(tokenizer.chat_template, messages[:i], True, special)) if i else 0
            end = len(render_chat(tokenizer.chat_template, messages[: i + 1], False, special))
            if text[:end] != render_chat(tokenizer.chat_template, messages[: i + 1], False, special):
                raise DataError(f"{where}: the chat template does not render prefixes of the conversation "
                                "as prefixes; cannot find the assistant tokens")
            spans.append((start, end))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [int(any(s <= off[0] < e for s, e in spans)) for off in enc.offsets]
    return Document(list(enc.ids), mask)


def prepare(inputs: Iterable[str | Path], out: str | Path, tokenizer: Tokenizer, tokenizer_ref: str,
            fmt: str = "auto", text_key: str = "text", shard_tokens: int = 1 << 24, progress: bool = True) -> Path:
    """Tokenise text/JSONL/chat-JSONL files into a new corpus folder `out` (atomically)."""
    out = Path(out).expanduser()
    if out.exists():
        raise DataError(f"{out} already exists; choose a new output folder (nothing was written)")
    paths: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl", ".md")))
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not paths:
        raise DataError("no input files (give .txt, .md or .jsonl files or folders holding them)")
    if fmt == "auto":
        fmt = "jsonl" if all(p.suffix == ".jsonl" for p in paths) else "text"
    if fmt not in ("text", "jsonl", "chat"):
        raise DataError(f"format must be text, jsonl or chat, got {fmt!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end documents with")
    with staged_folder(out) as tmp:
        writer = _ShardWriter(tmp, shard_tokens, with_mask=fmt == "chat")
        bar = tqdm(desc="prepare", unit=" tok", unit_scale=True, disable=not progress)
        for doc in iter_documents(paths, fmt, tokenizer, text_key):
            # Text documents end with EOS; a conversation ends as its template ends it.
            ids = doc.ids if doc.mask is not None or (doc.ids and doc.ids[-1] == eos) else [*doc.ids, eos]
            writer.add(ids, doc.mask)
            bar.update(len(ids))
        bar.close()
        writer.close(fmt, tokenizer_ref, tokenizer.vocab_size, eos, [p.name for p in paths])
        if writer.num_tokens == 0:
            raise DataError(f"the corpus is empty: no text in {len(paths)} input file(s)")
    return out


def write_corpus(out: str | Path, documents: Iterable[np.ndarray], vocab_size: int, eos_token_id: int,
                 source: str = "synthetic") -> Path:
    """A corpus folder from ready token arrays (generated data: benchmarks on random tokens)."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; choose a new output folder (nothing was written)")
    with staged_folder(out) as tmp:
        writer = _ShardWriter(tmp, 1 << 24, with_mask=False)
        for doc in documents:
            writer.add(list(doc), None)
        writer.close("tokens", source, vocab_size, eos_token_id, [source])
    return out


class _ShardWriter:
    def __init__(self, folder: Path, shard_tokens: int, with_mask: bool) -> None:
        self.folder, self.shard_tokens, self.with_mask = folder, shard_tokens, with_mask
        self.shards: list[dict[str, Any]] = []
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._count = 0

    def add(self, ids: list[int], mask: list[int] | None) -> None:
        self._ids.append(np.asarray(ids, dtype=np.uint32))
        if self.with_mask:
            self._masks.append(np.asarray(mask, dtype=np.uint8))
        self._count += len(ids)
        if self._count >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        stem = f"{len(self.shards):05d}"
        tokens = np.concatenate(self._ids)
        starts = np.cumsum([0] + [len(a) for a in self._ids[:-1]]).astype(np.int64)
        tokens.tofile(self.folder / f"{stem}.tokens")
        starts.tofile(self.folder / f"{stem}.docs")
        if self.with_mask:
            np.concatenate(self._masks).tofile(self.folder / f"{stem}.mask")
        self.shards.append({"stem": stem, "num_tokens": int(len(tokens)), "num_documents": len(self._ids)})
        self._ids, self._masks, self._count = [], [], 0

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    def close(self, fmt: str, tokenizer_ref: str, vocab_size: int, eos_token_id: int, inputs: list[str]) -> None:
        """Write the last shard and the manifest."""
        self._flush()
        manifest = {
            "version": 1, "format": fmt, "tokenizer": tokenizer_ref, "vocab_size": vocab_size,
            "eos_token_id": eos_token_id, "num_tokens": self.num_tokens,
            "num_documents": sum(s["num_documents"] for s in self.shards), "has_mask": self.with_mask,
            "shards": self.shards, "inputs": inputs,
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------------------- read
class TokenCorpus:
    """A prepared corpus as one flat token stream (memory-mapped shards), with document starts."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        path = self.folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.folder}: not a prepared corpus (no {MANIFEST}); run `quadrant data prepare`")
        self.manifest = json.loads(path.read_text())
        # Shards stay memory-mapped, never concatenated: a window reads only the pages it spans.
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        starts, offset = [], 0
        self._offsets = [0]
        for shard in self.manifest["shards"]:
            stem = self.folder / shard["stem"]
            self._tokens.append(np.memmap(f"{stem}.tokens", dtype=np.uint32, mode="r"))
            starts.append(np.fromfile(f"{stem}.docs", dtype=np.int64) + offset)
            if self.manifest.get("has_mask"):
                self._masks.append(np.memmap(f"{stem}.mask", dtype=np.uint8, mode="r"))
            offset += shard["num_tokens"]
            self._offsets.append(offset)
        if offset == 0:
            raise DataError(f"{self.folder}: the corpus is empty")
        self.num_tokens = offset
        self.has_mask = bool(self._masks)
        self.doc_starts = np.concatenate(starts)  # [num_documents], sorted
        self.vocab_size = int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, end: int, mask: bool = False) -> np.ndarray:
        """Tokens (or mask bytes) [start, end) of the flat stream, across shard boundaries."""
        parts = self._masks if mask else self._tokens
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        out, pos = [], start
        for i in range(first, len(parts)):
            if pos >= end:
                break
            lo = pos - self._offsets[i]
            take = min(end, self._offsets[i + 1]) - pos
            out.append(np.asarray(parts[i][lo : lo + take]))
            pos += take
        return out[0] if len(out) == 1 else np.concatenate(out)

    def num_windows(self, seq_len: int) -> int:
        return max(1, (self.num_tokens - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids [S], labels [S], positions [S]) of window `index` (tokens index*S .. index*S + S)."""
        start = index * seq_len
        end = min(start + seq_len + 1, self.num_tokens)
        if end - start < seq_len + 1:  # a corpus shorter than one window: wrap around to fill it
            n = self.num_tokens
            reps = -(-(seq_len + 1) // n)
            tokens = np.tile(self.read(0, n).astype(np.int64), reps)[: seq_len + 1]
            doc_start = np.zeros(seq_len + 1, dtype=bool)
            doc_start[np.arange(0, seq_len + 1, n)] = True
            for s in self.doc_starts:
                doc_start[np.arange(s, seq_len + 1, n)] = True
            trained = (np.ones(seq_len + 1, dtype=bool) if not self.has_mask
                       else np.tile(self.read(0, n, mask=True).astype(bool), reps)[: seq_len + 1])
        else:
            tokens = self.read(start, end).astype(np.int64)
            doc_start = np.zeros(seq_len + 1, dtype=bool)
            lo, hi = np.searchsorted(self.doc_starts, [start, end])
            doc_start[self.doc_starts[lo:hi] - start] = True
            trained = (np.ones(seq_len + 1, dtype=bool) if not self.has_mask
                       else self.read(start, end, mask=True).astype(bool))
        doc_start[0] = True  # a window starts a (possibly partial) document
        labels = tokens[1:].copy()
        labels[doc_start[1:] | ~trained[1:]] = IGNORE_INDEX
        # Position = distance to the latest document start at or before each token.
        idx = np.arange(seq_len)
        last_start = np.maximum.accumulate(np.where(doc_start[:seq_len], idx, 0))
        return tokens[:seq_len], labels, idx - last_start


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, IGNORE_INDEX where no loss
    positions: torch.Tensor  # [B, S] int64, 0 at each document start

    @classmethod
    def from_windows(cls, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> "Batch":
        """Stack TokenCorpus.window results (ids, labels, positions) into a batch."""
        ids, labels, positions = (torch.from_numpy(np.stack(col)) for col in zip(*rows))
        return cls(ids, labels, positions)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.positions.to(device))

    def split(self, n: int) -> list["Batch"]:
        return [Batch(*parts) for parts in zip(self.input_ids.chunk(n), self.labels.chunk(n), self.positions.chunk(n))]


class PackedLoader:
    """The deterministic batches of a curriculum for one data-parallel rank."""

    def __init__(self, sources: dict[str, str], seed: int = 0, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.corpora = {name: TokenCorpus(path) for name, path in sources.items()}
        vocab = {c.vocab_size for c in self.corpora.values()}
        if len(vocab) > 1:
            raise DataError(f"the sources were tokenised with different vocabularies ({sorted(vocab)})")
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self._plans: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._orders: dict[tuple[int, int, int, int], np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return next(iter(self.corpora.values())).vocab_size

    def batch(self, stage_index: int, stage: StageConfig, stage_step: int, global_batch: int) -> Batch:
        """This rank's share of global batch `stage_step` of a stage: [global_batch / dp_size, seq_len]."""
        mixture, seq_len = stage.mixture, stage.seq_len
        if global_batch % self.dp_size:
            raise DataError(f"global_batch {global_batch} is not divisible by the data-parallel size {self.dp_size}")
        names = sorted(mixture)
        first = stage_step * global_batch
        samples = range(first + self.dp_rank, first + global_batch, self.dp_size)
        choice, rank_in_source = self._plan(stage_index, names, mixture, stage.steps * global_batch)
        rows = []
        for g in samples:
            corpus = self.corpora[names[choice[g]]]
            k = int(rank_in_source[g])
            num = corpus.num_windows(seq_len)
            epoch, i = divmod(k, num)
            order = self._order(stage_index, int(choice[g]), epoch, num)
            rows.append(corpus.window(int(order[i]), seq_len))
        return Batch.from_windows(rows)

    def _order(self, stage_index: int, source: int, epoch: int, num: int) -> np.ndarray:
        """The seeded order of a source's windows in one epoch (cached: consecutive samples share it)."""
        key = (stage_index, source, epoch, num)
        if key not in self._orders:
            if len(self._orders) >= 8:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = np.random.default_rng([self.seed, stage_index, source, epoch]).permutation(num)
        return self._orders[key]

    def _plan(self, stage_index: int, names: list[str], mixture: dict[str, float],
              num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Per global sample of the stage: its source, and how many earlier samples took that source."""
        key = (stage_index, num_samples)
        if key not in self._plans:  # the whole stage at once: later steps reuse it
            weights = np.array([mixture[n] for n in names], dtype=np.float64)
            rng = np.random.default_rng([self.seed, stage_index])
            choice = rng.choice(len(names), size=num_samples, p=weights / weights.sum())
            rank = np.zeros(num_samples, dtype=np.int64)
            for s in range(len(names)):
                hit = choice == s
                rank[hit] = np.arange(hit.sum())
            self._plans = {key: (choice, rank)}  # one stage at a time
        return self._plans[key]
