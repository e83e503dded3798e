"""Formatter: engine outputs as OpenAI JSON (completions or chat, whole or as stream chunks).

Choices, chunks, logprobs, the usage chunk and the non-streaming response body.
Pure data shaping: it neither reads streams nor sends anything (see streaming.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quadrant.engine.request import CompletionOutput, RequestOutput
from quadrant.serve import protocol as P


@dataclass
class Formatter:
    """Choices and chunks in the completions or the chat format, logprobs included."""

    rid: str
    model: str
    chat: bool
    tokenizer: Any
    n: int
    # The router's extension (quadrant/disagg/): each choice's token ids, and its prompt's on first sight.
    return_token_ids: bool = False
    prompt_ids: list[list[int]] = field(default_factory=list)
    _prompt_sent: set[int] = field(default_factory=set)

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, records: list | None, text_offset: int = 0) -> dict[str, Any] | None:
        if records is None:
            return None
        if self.chat:
            return {"content": [{
                "token": self._token(r.token_id), "logprob": r.logprob,
                "bytes": list(self._token(r.token_id).encode()),
                "top_logprobs": [{"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode())}
                                 for t, lp in r.top],
            } for r in records]}
        tokens = [self._token(r.token_id) for r in records]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in records],
                "top_logprobs": [{self._token(t): lp for t, lp in r.top} for r in records], "text_offset": offsets}

    def choice(self, index: int, c: CompletionOutput, final: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": c.finish_reason,
                                  "logprobs": self.logprobs(c.logprobs)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        if self.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        return choice

    def chunk(self, index: int, output: CompletionOutput | None = None, role: bool = False) -> dict[str, Any]:
        assert role or output is not None
        text = output.text_delta if output is not None else ""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": None, "logprobs": None}
        if output is not None:
            choice["finish_reason"] = output.finish_reason
            if output.logprobs_delta:
                choice["logprobs"] = self.logprobs(output.logprobs_delta)
        chunk = {"id": self.rid, "object": self.chunk_object, "created": P.now(), "model": self.model,
                 "choices": [choice]}
        if self.return_token_ids:
            choice["token_ids"] = list(output.token_ids_delta) if output is not None else []
            if index not in self._prompt_sent and self.prompt_ids:
                self._prompt_sent.add(index)
                chunk["prompt_token_ids"] = self.prompt_ids[index // self.n]
        return chunk

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk of a stream that asked for `stream_options.include_usage`: no choices, only usage."""
        return {"id": self.rid, "object": self.chunk_object, "created": P.now(),
                "model": self.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def completion(self, finals: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
        """The whole response of a non-streaming request; `finals` holds one output per prompt, in order."""
        choices = [self.choice(i * self.n + c.index, c, final=True) for i, out in enumerate(finals)
                   for c in out.outputs]
        completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        extra = {"prompt_token_ids": finals[0].prompt_token_ids} if self.return_token_ids else {}
        return {**extra,
            "id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": P.now(),
            "model": self.model, "choices": choices,
            "usage": P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens).model_dump(),
        }
