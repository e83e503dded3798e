"""Tokenizer for quadrant, backed by the Hugging Face `tokenizers` library.

Builds from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or from GGUF tokenizer metadata
(byte-level BPE "gpt2" or SentencePiece "llama" vocabularies), giving the same ids as transformers, plus an
incremental detokenizer that turns streamed ids into UTF-8-safe text deltas.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split patterns for GGUF `tokenizer.ggml.pre` values whose models split text with their own regex
# (then byte-encode without a second regex). They are the patterns of each model's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Same as Llama 3 but one digit per piece.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# Llama 3's tokenizer.json sets ignore_merges (a whole pre-token found in the vocab is kept), as llama.cpp does.
_IGNORE_MERGES_PRE = frozenset(k for k, v in _SPLIT_PRE.items() if v is _LLAMA3_SPLIT)
# GPT-2's own regex (what ByteLevel(use_regex=True) applies).
_GPT2_PRE = frozenset(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"))
# The GPT-2 regex after isolating every digit: StarCoder-family tokenizers (SmolLM uses the StarCoder tokenizer).
_DIGITS_GPT2_PRE = frozenset(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"))

_SUPPORTED_GGUF_MODELS = ("gpt2", "llama")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spells every token with it)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:  # whitespace/control bytes move above U+00FF so no token contains a raw space
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _template(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
              add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """A post-processor adding BOS/EOS the way transformers' update_post_processor does."""
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def _dedupe(ids: Sequence[int | None]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


@dataclass
class Tokenizer:
    """Text <-> ids, with the special-token facts generation and chat templates need."""

    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: list[int]  # primary eos first, then other end-of-turn ids
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    add_eos_token: bool = False
    unk_token_id: int | None = None

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _text_of(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self._text_of(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._text_of(self.eos_token_id)

    @property
    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., ...} for the ones this tokenizer has (chat-template variables)."""
        ids = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        out = {}
        for name, token_id in zip(_SPECIAL_NAMES, ids):
            text = self._text_of(token_id)
            if text is not None:
                out[name] = text
        return out

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # BOS/EOS come from the fields rather than the backend post-processor, so the dataclass is the truth.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    # ------------------------------------------------------------------ Hugging Face folder
    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; only fast (tokenizers) folders are supported.")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")

        def special(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            return value if isinstance(value, str) else None

        texts = {name: special(name) for name in _SPECIAL_NAMES}
        # transformers registers the named tokens as special, so skip_special_tokens drops them.
        named = [AddedToken(t, special=True, normalized=False)
                 for t in texts.values() if t is not None and backend.token_to_id(t) is not None]
        if named:
            backend.add_special_tokens(named)
        ids = {name: (backend.token_to_id(t) if t is not None else None) for name, t in texts.items()}

        generation = _read_json(path / "generation_config.json")
        gen_eos = generation.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        eos_ids = _dedupe([ids["eos_token"], *gen_eos])
        bos_id = ids["bos_token"]
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]

        # Explicit config flags win (transformers rebuilds the post-processor from them); otherwise keep
        # whatever tokenizer.json's post-processor does, e.g. Llama 3 prepending <|begin_of_text|>.
        probed_bos, probed_eos = _probe_post_processor(backend, bos_id, eos_ids[0] if eos_ids else None)
        add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else probed_bos
        add_eos = bool(config["add_eos_token"]) if "add_eos_token" in config else probed_eos
        eos_id = eos_ids[0] if eos_ids else None
        # Replacing the post-processor only drops offset trimming (ByteLevel), which ids never depend on.
        backend.post_processor = _template(
            backend.id_to_token(bos_id) if bos_id is not None else None, bos_id,
            backend.id_to_token(eos_id) if eos_id is not None else None, eos_id, add_bos, add_eos)

        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            pad_token_id=ids["pad_token"],
            add_bos_token=add_bos,
            chat_template=_read_chat_template(path, config),
            add_eos_token=add_eos,
            unk_token_id=ids["unk_token"],
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json as a Hugging Face
        folder holds them, so `from_pretrained_dir` (and transformers) read the same tokenizer back."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, object] = {"add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}
        config.update(self.special_tokens)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_fields(cls, fields: dict[str, object]) -> Tokenizer:
        model = fields.get("tokenizer.ggml.model")
        if model not in _SUPPORTED_GGUF_MODELS:
            raise ValueError(
                f"Unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
                f"quadrant supports {', '.join(map(repr, _SUPPORTED_GGUF_MODELS))}."
            )
        if not fields.get("tokenizer.ggml.tokens"):
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens; cannot build a tokenizer.")
        tokens = [str(t) for t in fields["tokenizer.ggml.tokens"]]  # type: ignore[union-attr,attr-defined]
        raw_types = fields.get("tokenizer.ggml.token_type")
        token_types = [int(t) for t in raw_types] if raw_types is not None else [_NORMAL] * len(tokens)  # type: ignore[union-attr,attr-defined]
        if len(token_types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types.")

        def token_id(key: str) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is None or not 0 <= int(value) < len(tokens):  # type: ignore[call-overload]
                return None
            return int(value)  # type: ignore[call-overload]

        bos_id, unk_id, pad_id = token_id("bos_token_id"), token_id("unknown_token_id"), token_id("padding_token_id")
        eos_ids = _dedupe([token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")])

        if model == "gpt2":
            backend = _byte_level_backend(tokens, token_types, fields)
            # Byte-level vocabularies only get BOS when the file asks (transformers' default).
            default_add_bos = False
        else:
            backend = _sentencepiece_backend(tokens, token_types, fields, unk_id)
            # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            default_add_bos = True

        # CONTROL tokens are special (skipped on decode), USER_DEFINED ones are plain added tokens; both must be
        # matched whole in text, e.g. "<|im_start|>" -> one id.
        special_ids = {i for i, t in enumerate(token_types) if t == _CONTROL}
        special_ids.update(i for i in (bos_id, unk_id, pad_id, *eos_ids) if i is not None)
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
        user_defined = [AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(token_types) if t == _USER_DEFINED and i not in special_ids]
        if user_defined:
            backend.add_tokens(user_defined)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            logger.warning("GGUF tokenizer has %d tokens but the built vocabulary has %d",
                           len(tokens), backend.get_vocab_size(with_added_tokens=True))

        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", default_add_bos))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        eos_id = eos_ids[0] if eos_ids else None
        backend.post_processor = _template(
            tokens[bos_id] if bos_id is not None else None, bos_id,
            tokens[eos_id] if eos_id is not None else None, eos_id, add_bos, add_eos)
        template = fields.get("tokenizer.chat_template")
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            pad_token_id=pad_id,
            add_bos_token=add_bos,
            chat_template=template if isinstance(template, str) else None,
            add_eos_token=add_eos,
            unk_token_id=unk_id,
        )


# ---------------------------------------------------------------------- GGUF builders
def _byte_level_backend(tokens: list[str], token_types: list[int], fields: dict[str, object]) -> tokenizers.Tokenizer:
    """Byte-level BPE ("gpt2"): GGUF stores tokens already spelled in the byte alphabet, plus the merges."""
    spell = _byte_to_unicode()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types)):
        if kind in (_CONTROL, _USER_DEFINED) or set(token) <= alphabet:
            # Added tokens are stored as raw text (e.g. "<｜end▁of▁sentence｜>"); keeping that text at its id lets
            # the added-token matcher find it, and ByteLevel decoding falls back to the raw UTF-8 for it.
            key = token
        else:  # a normal token stored as plain text: respell it so merges and the pre-tokenizer agree
            key = "".join(spell[b] for b in token.encode("utf-8"))
        vocab.setdefault(key, i)  # first id wins on duplicate spellings

    merges: list[tuple[str, str]] = []
    dropped = 0
    for merge in fields.get("tokenizer.ggml.merges") or []:  # type: ignore[union-attr,attr-defined]
        parts = str(merge).split(" ")
        if len(parts) == 2 and parts[0] in vocab and parts[1] in vocab and parts[0] + parts[1] in vocab:
            merges.append((parts[0], parts[1]))
        else:  # BPE() rejects merges outside the vocab; one bad line should not sink the whole tokenizer
            dropped += 1
    if dropped:
        logger.warning("Dropped %d GGUF merges that do not match the vocabulary", dropped)
    if not merges:
        logger.warning("GGUF byte-level tokenizer has no merges; text will encode to single bytes")

    pre = fields.get("tokenizer.ggml.pre")
    pre = str(pre) if pre is not None else "default"
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES_PRE))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names."""
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _DIGITS_GPT2_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in _GPT2_PRE:
        logger.warning("Unknown GGUF pre-tokenizer %r; falling back to the GPT-2 regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_backend(tokens: list[str], token_types: list[int], fields: dict[str, object],
                           unk_id: int | None) -> tokenizers.Tokenizer:
    """SentencePiece BPE ("llama"): no merges in the file, so rebuild them from the scores, as llama.cpp merges."""
    scores_field = fields.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores_field] if scores_field is not None else [-float(i) for i in range(len(tokens))]  # type: ignore[union-attr,attr-defined]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = _merges_from_scores(tokens, scores, token_types)

    add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
        unk_token=tokens[unk_id] if unk_id is not None else None))
    # SentencePiece writes spaces as "▁" and prepends one to the text (only at its very start, not after
    # special tokens: transformers' non-legacy Llama behaviour). split=False keeps "▁▁" tokens reachable.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # undo the prepended space
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best piece score first.

    SentencePiece merges the adjacent pair whose joined piece scores highest, so ranking merges by the joined
    piece's score reproduces it. Ties (two splits of one piece) go longer-left first, as transformers does.
    """
    normal: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types)):
        # control/unknown/byte/unused pieces are never produced by merging text
        if kind in (_NORMAL, _USER_DEFINED):
            normal.setdefault(token, i)
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for piece, piece_id in normal.items():
        if len(piece) < 2:
            continue
        splits = [(normal[piece[:k]], normal[piece[k:]], k) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        for _, _, k in sorted(splits):
            # (key..., insertion order) so equal keys keep transformers' order: piece id, then split ids
            candidates.append((-scores[piece_id], -k, k - len(piece), len(candidates), piece[:k], piece[k:]))
    candidates.sort(key=lambda c: c[:4])
    return [(c[4], c[5]) for c in candidates]


# ---------------------------------------------------------------------- folder helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _read_chat_template(path: Path, config: dict) -> str | None:
    # transformers prefers the standalone files over the copy inside tokenizer_config.json.
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _probe_post_processor(backend: tokenizers.Tokenizer, bos_id: int | None,
                          eos_id: int | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS / EOS around a sequence."""
    if backend.post_processor is None:
        return False, False
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            break
    else:
        return False, False
    add_bos = bos_id is not None and prefix == [bos_id]
    add_eos = eos_id is not None and suffix == [eos_id]
    if (prefix and not add_bos) or (suffix and not add_eos):
        logger.warning("tokenizer.json post-processor adds %s ... %s, which quadrant does not reproduce",
                       prefix, suffix)
    return add_bos, add_eos


# ---------------------------------------------------------------------- streaming
class IncrementalDetokenizer:
    """Turns a growing id list into text deltas whose concatenation equals tokenizer.decode(all_ids, skip_special_tokens).

    With prompt_ids the deltas cover only the generated part: decode(prompt + generated) minus decode(prompt).
    Each step decodes a short window [prefix_offset:] and emits what it adds beyond [prefix_offset:read_offset],
    so the cost per step does not grow with the sequence length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids]
        self._prompt_len = len(self._ids)
        self._prefix_offset = self._read_offset = len(self._ids)
        self._chunks: list[str] = []
        backend = tokenizer.backend
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._byte_fallback = isinstance(backend.model, models.BPE) and bool(backend.model.byte_fallback)

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    @property
    def ids(self) -> list[int]:
        return self._ids[self._prompt_len:]

    def step(self, new_ids: Sequence[int] | int) -> str:
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        self._ids.extend(int(i) for i in new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    # -- internals
    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _is_anchor(self, pos: int) -> bool:
        """A token a window may start at without changing how the tokens after it decode."""
        token_id = self._ids[pos]
        if self.skip_special_tokens and token_id in self._special_ids:
            return False  # skipped, so ByteFallback runs on both sides of it join up
        if self._byte_fallback:
            token = self.tokenizer.backend.id_to_token(token_id)
            if token is not None and _BYTE_TOKEN.match(token):
                return False  # mid byte-run: starting here could cut a multi-byte character
        return True

    def _context(self) -> str:
        """Text of the window's already-emitted part, moving the window back while it decodes to nothing.

        An empty context would let window-start effects (SentencePiece's Strip of the prepended space) land on
        the new text, so the window must start at a token that yields text and is a safe boundary.
        """
        text = self._decode(self._prefix_offset, self._read_offset)
        while self._prefix_offset > 0 and (text == "" or not self._is_anchor(self._prefix_offset)):
            self._prefix_offset -= 1
            text = self._decode(self._prefix_offset, self._read_offset)
        return text

    def _advance(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        context = self._context()
        window = self._decode(self._prefix_offset)
        # A trailing U+FFFD means the last token ended mid-character; wait for the rest of its bytes.
        if not final and window.endswith("\ufffd"):
            return ""
        if window.startswith(context):
            delta = window[len(context):]
        else:  # the window did not decode stably; fall back to the exact (but O(n)) full decode
            delta = self._exact_delta()
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta

    def _exact_delta(self) -> str:
        prompt_text = self._decode(0, self._prompt_len)
        full = self._decode(0)
        generated = full[len(prompt_text):] if full.startswith(prompt_text) else full
        emitted = self.text
        return generated[len(emitted):] if generated.startswith(emitted) else ""
