"""The tokenizer over HTTP, as vLLM serves it: /tokenize, /detokenize and /tokenizer_info.

Clients that count tokens or score text against the server's own tokenizer use these:
lm-eval's API models detect them and then need no local copy of the tokenizer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from quadrant.errors import QuadrantError
from quadrant.serve import protocol as P
from quadrant.serve.errors import OpenAIError
from quadrant.serve.model_pool import ModelPool


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[P.ChatMessage] | None = None  # the chat template applied first
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def add_tokenizer_routes(app: FastAPI, pool: ModelPool) -> None:
    def tokenizer(state: Any) -> Any:
        tok = state.ready().engine.tokenizer
        if tok is None:
            raise OpenAIError(400, "this model has no tokenizer", code="no_tokenizer")
        return tok

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state = await pool.get(body.model)
        tok = tokenizer(state)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            try:
                ids = await state.ready().call(lambda e: e.chat_prompt(messages, body.add_generation_prompt))
            except (QuadrantError, ValueError) as e:
                raise OpenAIError(400, str(e), param="messages") from None
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        state = await pool.get(body.model)
        tok = tokenizer(state)
        vocab = state.ready().engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise OpenAIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        state = pool.primary
        tok = tokenizer(state)
        special = tok.special_tokens
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special.get("eos_token"),
                "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
                "unk_token": special.get("unk_token"), "chat_template": tok.chat_template,
                "model_max_length": state.max_model_len, "vocab_size": tok.vocab_size,
                "add_bos_token": tok.add_bos_token}
