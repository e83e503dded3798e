"""Tests for quadrant's tokenizer, with transformers (and sentencepiece) as the reference."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers

from quadrant.tokenizer import IncrementalDetokenizer, Tokenizer

MIXED_TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog.\n"
    "你好，世界。今天天气很好。\n"
    "def add(a, b):\n    if a:\n        return a + b\n\treturn None\n\n\n"
    "emoji: 👨‍👩‍👧 🎉🔥 👍🏽 ünïcödé café\n"
    "digits 12345 3.14159 and 1,000,000\n"
    "spaces   between    words \t\ttabs\r\nCRLF  \n\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)
# Whitespace runs in front of digits: where SmolLM2's real pre-tokenizer (Digits, then GPT-2 regex) and
# transformers' GGUF loader (GPT-2 regex only) split differently.
SPACE_DIGIT_TEXT = "x  1\n\n  42 and    7 end"


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def smol(gguf_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf_fields)


@pytest.fixture(scope="session")
def hf_smol_reference(hf_gguf_tokenizer) -> tokenizers.Tokenizer:
    """transformers' backend from the GGUF with the pre-tokenizer of SmolLM2's own tokenizer.json
    (and of llama.cpp's 'smollm'): isolate every digit, then the GPT-2 regex."""
    backend = tokenizers.Tokenizer.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


def _training_lines() -> list[str]:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog token model python code return value "
             "while for if else print hello world data").split()
    lines = []
    for i in range(3000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if i % 7 == 0:
            line = "    " + line + "(x, y) = 42"
        if i % 11 == 0:
            line = line.capitalize() + f". {rng.randint(0, 99999)}"
        lines.append(line)
    return lines


# Llama 2's SentencePiece settings: BPE, byte fallback, no normalization, digits split.
_SPM_TRAIN_ARGS = dict(
    model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0,
    normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    allow_whitespace_only_pieces=True, user_defined_symbols=["<tool>"], minloglevel=2,
)


def _write_llama_gguf(path: Path, sp, *, add_bos: bool | None, add_space_prefix: bool | None) -> None:
    """A tokenizer-only GGUF (no tensors) for a SentencePiece model, as llama.cpp's converter lays it out."""
    import gguf

    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_byte(i):
            return gguf.TokenType.BYTE
        if sp.is_unused(i):
            return gguf.TokenType.UNUSED
        return gguf.TokenType.USER_DEFINED if tokens[i] == "<tool>" else gguf.TokenType.NORMAL

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    writer.add_token_types([int(token_type(i)) for i in range(len(tokens))])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style SentencePiece BPE (byte fallback, ~400 pieces) trained here, saved as GGUFs."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(**_SPM_TRAIN_ARGS, sentence_iterator=iter(_training_lines()), model_prefix=str(root / "m"), add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(root / "m.model"))
    _write_llama_gguf(root / "tiny.gguf", sp, add_bos=True, add_space_prefix=None)
    return root


@pytest.fixture(scope="session")
def spm_noprefix(tmp_path_factory):
    """The same kind of model trained without SentencePiece's dummy prefix, and its GGUF fields."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm_noprefix")
    spm.SentencePieceTrainer.train(**_SPM_TRAIN_ARGS, sentence_iterator=iter(_training_lines()), model_prefix=str(root / "m"), add_dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_file=str(root / "m.model"))
    _write_llama_gguf(root / "tiny.gguf", sp, add_bos=None, add_space_prefix=False)
    return sp, _tokenizer_fields(root / "tiny.gguf")


@pytest.fixture(scope="session")
def sp_processor(spm_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spm_dir / "m.model"))


@pytest.fixture(scope="session")
def spm_tok(spm_dir) -> Tokenizer:
    return Tokenizer.from_gguf_fields(_tokenizer_fields(spm_dir / "tiny.gguf"))


@pytest.fixture(scope="session")
def hf_spm(spm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spm_dir), gguf_file="tiny.gguf")


SPM_TEXTS = [
    "hello world",
    "The quick brown fox\njumps over   the lazy dog.\n\n    return value(x, y) = 42",
    " hello  world",
    "  leading spaces",
    "trailing  ",
    "中文 and emoji 👨‍👩‍👧 ünïcödé",  # outside the vocab: byte fallback
    "12345 3.14159",
    "a<tool>b <tool> c",
    "<s>hello</s> world",
    "\n\nnewline first",
    "tab\there",
    " ",
    "",
]


# ---------------------------------------------------------------------- GGUF, byte-level BPE (SmolLM2)
def test_smollm_ids_match_transformers(smol, hf_gguf_tokenizer):
    for text in (MIXED_TEXT, "Hello", " Hello", "a\n\n\n  b", "\t\t x", "   ", ""):
        assert smol.encode(text) == hf_gguf_tokenizer(text)["input_ids"], text


def test_smollm_pretokenizer_isolates_digits(smol, hf_smol_reference):
    # The 'smollm' pre-tokenizer splits off every digit before the GPT-2 regex (llama.cpp and SmolLM2's
    # tokenizer.json); transformers' GGUF loader omits that step, so "  1" differs there: "ĠĠ","1" vs "Ġ","Ġ","1".
    for text in (MIXED_TEXT, SPACE_DIGIT_TEXT):
        assert smol.encode(text) == hf_smol_reference.encode(text).ids
    assert smol.convert_ids_to_tokens(smol.encode("x  1")) == ["x", "ĠĠ", "1"]


def test_smollm_decode_matches_transformers(smol, hf_gguf_tokenizer):
    ids = hf_gguf_tokenizer(MIXED_TEXT)["input_ids"]
    for skip in (False, True):
        assert smol.decode(ids, skip_special_tokens=skip) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert smol.decode(ids) == MIXED_TEXT


def test_smollm_special_tokens(smol, hf_gguf_tokenizer, gguf_fields):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smol.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids[-1] == 2
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert smol.bos_token_id == hf_gguf_tokenizer.bos_token_id == 1
    assert smol.eos_token_id == hf_gguf_tokenizer.eos_token_id == 2
    assert smol.eos_token_ids == [2]
    assert smol.pad_token_id == hf_gguf_tokenizer.pad_token_id
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert smol.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                   "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert smol.add_bos_token is False
    assert smol.chat_template == gguf_fields["tokenizer.chat_template"] == hf_gguf_tokenizer.chat_template
    assert smol.vocab_size == len(hf_gguf_tokenizer) == 49152


def test_gguf_eot_and_eom_join_eos(gguf_fields):
    fields = dict(gguf_fields, **{"tokenizer.ggml.eot_token_id": 0, "tokenizer.ggml.eom_token_id": 2})
    assert Tokenizer.from_gguf_fields(fields).eos_token_ids == [2, 0]


def test_gguf_add_bos_flag(gguf_fields):
    tok = Tokenizer.from_gguf_fields(dict(gguf_fields, **{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id


def test_unknown_pre_falls_back_to_gpt2_regex(gguf_fields, hf_gguf_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf_fields(dict(gguf_fields, **{"tokenizer.ggml.pre": "no-such-pre"}))
    assert "no-such-pre" in caplog.text
    # GPT-2 regex alone is what transformers' GGUF loader uses for every pre it does not list.
    text = MIXED_TEXT + SPACE_DIGIT_TEXT
    assert tok.encode(text) == hf_gguf_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o"])
def test_split_pretokenizers_match_transformers(gguf_fields, pre):
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        pytest.skip("transformers layout changed")
    reference = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok = Tokenizer.from_gguf_fields(dict(gguf_fields, **{"tokenizer.ggml.pre": pre}))
    text = MIXED_TEXT + SPACE_DIGIT_TEXT + " I'M don't 1234567 HTTPServer\r\n\r\n"
    assert tok.backend.pre_tokenizer.pre_tokenize_str(text) == reference.pre_tokenize_str(text)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("model", ["bert", "rwkv", "t5-unknown", None])
def test_unsupported_gguf_model_raises(model):
    fields = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match="Unsupported GGUF tokenizer model"):
        Tokenizer.from_gguf_fields(fields)


def test_missing_tokens_raise():
    with pytest.raises(ValueError, match="tokens"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})


# ---------------------------------------------------------------------- GGUF, SentencePiece ("llama")
def test_spm_ids_and_decode_match_transformers(spm_tok, hf_spm):
    for text in SPM_TEXTS:
        ids = spm_tok.encode(text)
        assert ids == hf_spm(text)["input_ids"], text
        for skip in (False, True):
            assert spm_tok.decode(ids, skip_special_tokens=skip) == hf_spm.decode(ids, skip_special_tokens=skip)


def test_spm_matches_sentencepiece(spm_tok, sp_processor):
    # Not for text with a leading space or special-token text: there transformers (followed here) prepends
    # "▁" only when missing and only at the very start, while sentencepiece always prepends one.
    texts = [t for t in SPM_TEXTS if t and not t[0].isspace() and "<" not in t]
    texts.append("The quick brown fox\njumps over   the lazy dog.\n\n    return value(x, y) = 42 ёжик 😀")
    for text in texts:
        ids = spm_tok.encode(text)
        assert ids == [sp_processor.bos_id(), *sp_processor.encode(text)], text
        assert spm_tok.decode(ids, skip_special_tokens=True) == sp_processor.decode(ids) == text


def test_spm_byte_fallback_and_specials(spm_tok):
    tokens = spm_tok.convert_ids_to_tokens(spm_tok.encode("中", add_special_tokens=False))
    assert tokens == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]
    assert spm_tok.encode("<s>", add_special_tokens=False) == [spm_tok.bos_token_id]
    assert spm_tok.decode(spm_tok.encode("<s>hi</s>"), skip_special_tokens=True) == "hi"
    assert spm_tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert spm_tok.chat_template is not None and "[INST]" in spm_tok.chat_template


def test_spm_defaults_and_add_space_prefix(spm_noprefix):
    # transformers' GGUF loader ignores add_space_prefix=False; llama.cpp honours it, as here, so the
    # reference is the SentencePiece model itself (trained with add_dummy_prefix=False).
    sp, fields = spm_noprefix
    tok = Tokenizer.from_gguf_fields(fields)
    assert tok.add_bos_token is True  # absent in the file: llama.cpp's SentencePiece default
    for text in [t for t in SPM_TEXTS if "<" not in t]:
        ids = tok.encode(text)
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("hello", add_special_tokens=False))[0] != "▁hello"


# ---------------------------------------------------------------------- Hugging Face folder
@pytest.fixture(scope="session")
def smol_dir(hf_gguf_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smol_hf")
    hf_gguf_tokenizer.save_pretrained(str(path))
    return path


def test_from_pretrained_dir_matches_transformers(smol_dir, hf_gguf_tokenizer):
    tok = Tokenizer.from_pretrained_dir(smol_dir)
    for text in (MIXED_TEXT, SPACE_DIGIT_TEXT):
        assert tok.encode(text) == hf_gguf_tokenizer(text)["input_ids"]
    ids = tok.encode(MIXED_TEXT)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tok.bos_token_id == hf_gguf_tokenizer.bos_token_id
    assert tok.eos_token_ids == [hf_gguf_tokenizer.eos_token_id]
    assert tok.pad_token_id == hf_gguf_tokenizer.pad_token_id
    assert tok.add_bos_token is False
    assert tok.chat_template == hf_gguf_tokenizer.chat_template
    assert tok.special_tokens["bos_token"] == "<|im_start|>"


def test_from_pretrained_dir_config_variants(smol_dir, tmp_path):
    folder = tmp_path / "variant"
    shutil.copytree(smol_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    config["bos_token"] = {"content": "<|im_start|>", "special": True}  # serialized AddedToken form
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    tok = Tokenizer.from_pretrained_dir(folder)
    assert tok.chat_template == template
    assert tok.eos_token_ids == [2, 0]
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1

    (folder / "chat_template.json").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained_dir(folder).chat_template == "D"


def test_from_pretrained_dir_spm(hf_spm, tmp_path):
    from transformers import AutoTokenizer

    hf_spm.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.add_bos_token is True
    for text in SPM_TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"] == hf_spm(text)["input_ids"], text


def test_from_pretrained_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained_dir(tmp_path)


# ---------------------------------------------------------------------- incremental detokenizer
def _stream(tok: Tokenizer, ids: list[int], prompt: list[int], rng: random.Random | None,
            skip: bool = True) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5) if rng else 1
        deltas.append(detok.step(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("which", ["smol", "spm_tok"])
def test_incremental_matches_decode(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode(MIXED_TEXT)
    # the text must really split characters across tokens for this test to mean anything
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    rng = random.Random(1234)
    for chunking in (None, rng, rng, rng):
        for skip in (True, False):
            deltas, detok = _stream(tok, ids, [], chunking, skip)
            assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("which", ["smol", "spm_tok"])
def test_incremental_with_prompt(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode(MIXED_TEXT)
    rng = random.Random(7)
    checked = 0
    for cut in range(1, len(ids)):
        prompt, generated = ids[:cut], ids[cut:]
        prompt_text, full = tok.decode(prompt, True), tok.decode(ids, True)
        if not full.startswith(prompt_text):  # prompt ends inside a character: no well-defined split
            continue
        deltas, _ = _stream(tok, generated, prompt, rng if cut % 2 else None)
        assert "".join(deltas) == full[len(prompt_text):], cut
        assert not any("\ufffd" in d for d in deltas)
        checked += 1
    assert checked > len(ids) // 2


def test_incremental_leading_space_after_prompt(spm_tok, smol):
    for tok in (spm_tok, smol):
        prompt = tok.encode("Hello")
        generated = tok.encode(" world", add_special_tokens=False)
        if tok is spm_tok:  # continue the prompt the way the model would: "▁world", not a second "▁"
            generated = tok.encode("Hello world")[len(prompt):]
        deltas, _ = _stream(tok, generated, prompt, None)
        assert "".join(deltas) == " world"
        assert tok.decode(prompt + generated, True)[len(tok.decode(prompt, True)):] == " world"
    # SentencePiece strips the prepended space only at the very start of the text
    deltas, _ = _stream(spm_tok, spm_tok.encode("Hello"), [], None)
    assert "".join(deltas) == "Hello"
    deltas, _ = _stream(spm_tok, spm_tok.encode("Hello")[1:], [spm_tok.bos_token_id], None)
    assert "".join(deltas) == "Hello"


def test_incremental_holds_back_partial_characters(smol, spm_tok):
    for tok in (smol, spm_tok):
        ids = tok.encode("👨‍👩‍👧", add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        first = detok.step(ids[:1])
        assert first == "" or "\ufffd" not in first
        rest = detok.step(ids[1:])
        assert first + rest + detok.flush() == "👨‍👩‍👧"
        # an unfinished character is only released by flush()
        first_partial = next(k for k, i in enumerate(ids) if "\ufffd" in tok.decode([i]))
        detok = IncrementalDetokenizer(tok)
        assert "\ufffd" not in detok.step(ids[:first_partial + 1])
        assert detok.flush().endswith("\ufffd")


def test_incremental_skips_special_tokens(smol):
    ids = smol.encode("<|im_start|>assistant\nSure 中文<|im_end|>")
    deltas, detok = _stream(smol, ids, [], None)
    assert detok.text == "assistant\nSure 中文"
    deltas, detok = _stream(smol, ids, [], None, skip=False)
    assert detok.text == "<|im_start|>assistant\nSure 中文<|im_end|>"


def _tokenizer_fields(path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
