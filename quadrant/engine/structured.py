"""Structured outputs: JSON schemas, regexes, choices and grammars enforced token by token (llguidance).

The driver owns one grammar matcher per constrained sequence (vLLM's split): before a step it
computes each sampling row's allowed-token bitmask (and one per speculative draft position), the
step carries the masks to the sampler, and after the step the matcher consumes the accepted
tokens. Grammars are compiled once per distinct spec and cached; the server compiles them on its
own threads before a request reaches the engine, so a bad schema is a 400 there and the engine
thread only copies a ready matcher. A matcher that refuses a token fails its request: no output
leaves the engine that its grammar did not accept.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from quadrant.errors import QuadrantError
from quadrant.sampling_params import StructuredOutput
from quadrant.tokenizer import Tokenizer

# Compact separators and no free whitespace: a small model given the choice pads JSON with
# newlines until max_tokens; this way every byte it writes is content.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


class GrammarError(QuadrantError, ValueError):
    """A schema, regex or grammar that cannot be compiled (or structured outputs are not installed)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a runtime dependency; only a broken install lacks it
        raise GrammarError("structured outputs need the llguidance package (pip install llguidance)") from e
    return llguidance


class StructuredOutputs:
    """Compiles constraints for one tokenizer and tracks each constrained sequence's matcher."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits') width, padding rows included
        self.mask_words = (vocab_size + 31) // 32
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._templates: OrderedDict[StructuredOutput, Any] = OrderedDict()  # spec -> fresh matcher

    # -- compiling (any thread) ------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self._lltokenizer is None:
            llg = _llguidance()
            self._lltokenizer = llg.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                eos_token=list(self.tokenizer.eos_token_ids) or None)
        return self._lltokenizer

    def compile(self, spec: StructuredOutput) -> Any:
        """A fresh matcher for `spec` (compiled once, then copied); GrammarError if it does not compile."""
        with self._lock:
            template = self._templates.get(spec)
            if template is not None:
                self._templates.move_to_end(spec)
                return template.deep_copy()
            tokenizer = self._tokenizer()
        llg = _llguidance()
        grammar = _grammar_text(llg, spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(f"{_NAMES[spec.kind]} does not compile: {_first_line(messages[0])}")
        template = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"{_NAMES[spec.kind]} does not compile: {_first_line(template.get_error())}")
        with self._lock:
            self._templates[spec] = template
            while len(self._templates) > _CACHE_SIZE:
                self._templates.popitem(last=False)
        return template.deep_copy()

    # -- the engine's side (its thread) ----------------------------------------------------------
    def masks(self, matcher: Any, drafts: list[int]) -> torch.Tensor:
        """The allowed tokens [len(drafts) + 1, mask_words] int32 bitmasks: after the tokens so far,
        then after each draft in turn (the matcher is rolled back afterwards)."""
        out = torch.empty(len(drafts) + 1, self.mask_words, dtype=torch.int32)
        consumed = 0
        for i in range(len(drafts) + 1):
            row = out[i]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
            if i < len(drafts):
                if not matcher.consume_token(drafts[i]):
                    raise GrammarError(f"draft token {drafts[i]} is outside the grammar")
                consumed += 1
        if consumed:
            matcher.rollback(consumed)
        return out

    @staticmethod
    def valid_prefix(matcher: Any, drafts: list[int]) -> int:
        """How many of the drafts, in order, the grammar accepts (drafts past that are never verified)."""
        return int(matcher.validate_tokens(drafts)) if drafts else 0

    @staticmethod
    def accept(matcher: Any, tokens: list[int]) -> str | None:
        """Advance the matcher over the step's accepted tokens; the error if it refuses one."""
        for token in tokens:
            if matcher.is_stopped():
                return None  # the grammar is complete; the token was EOS, which ends the request
            if not matcher.consume_token(token):
                return f"the structured-output grammar refused token {token}: {_first_line(matcher.get_error())}"
        return None


_NAMES = {"json_schema": "the JSON schema", "regex": "the regex", "choice": "the choice list",
          "grammar": "the grammar", "lark": "the Lark grammar"}


def _grammar_text(llg: Any, spec: StructuredOutput) -> str:
    try:
        if spec.kind == "json_schema":
            schema = json.loads(spec.spec)
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("the JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            choices = json.loads(spec.spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llg.grammar_from("choice", choices)
        if spec.kind == "grammar":
            return llg.grammar_from("grammar", spec.spec)  # GBNF (llama.cpp's format) or Lark
        return llg.LLMatcher.grammar_from_lark(spec.spec)
    except GrammarError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:  # llguidance reports bad input as ValueError
        raise GrammarError(f"{_NAMES[spec.kind]} does not compile: {_first_line(str(e))}") from None


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def allowed_tokens(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmasks [N, W] -> bool [N, vocab_size]: bit j of word i allows token 32 * i + j."""
    bits = torch.arange(32, dtype=torch.int32, device=masks.device)
    allowed = (masks.unsqueeze(-1) >> bits) & 1  # [N, W, 32]
    return allowed.reshape(masks.shape[0], -1)[:, :vocab_size].bool()
