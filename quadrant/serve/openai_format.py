"""Formatter: engine outputs as OpenAI JSON (completions or chat, whole or as stream chunks).

Choices, chunks, logprobs, the usage chunk and the non-streaming response body.
Pure data shaping: it neither reads streams nor sends anything (see streaming.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quadrant.engine.request import CompletionOutput, RequestOutput
from quadrant.serve import protocol as P
from quadrant.serve.tool_calls import ToolCalling, ToolStream


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
    # Completions' echo: each choice's text (and logprobs, when asked) starts with its prompt's.
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    _prompt_sent: set[int] = field(default_factory=set)
    _echoed: set[int] = field(default_factory=set)
    _text_offsets: dict[int, int] = field(default_factory=dict)  # streamed completions: where each choice is
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field: the prompt's records beside the choice
    tools: ToolCalling | None = None  # chat with tools: calls parsed out of the text (serve/tool_calls.py)
    _tool_streams: dict[int, ToolStream] = field(default_factory=dict)

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, records: list | None, text_offset: int = 0,
                 prompt: tuple[list[int], list] | None = None) -> dict[str, Any] | None:
        """`prompt` (completions' echo): the prompt tokens' records first, None for the first token."""
        if records is None and prompt is None:
            return None
        records = records or []
        if self.chat:
            return {"content": [{
                "token": self._token(r.token_id), "logprob": r.logprob,
                "bytes": list(self._token(r.token_id).encode()),
                "top_logprobs": [{"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode())}
                                 for t, lp in r.top],
            } for r in records]}
        ids = [r.token_id for r in records]
        token_logprobs: list[float | None] = [r.logprob for r in records]
        top: list[dict[str, float] | None] = [{self._token(t): lp for t, lp in r.top} for r in records]
        if prompt is not None:
            ids = prompt[0] + ids
            token_logprobs = [None if r is None else r.logprob for r in prompt[1]] + token_logprobs
            top = [None if r is None else {self._token(t): lp for t, lp in r.top} for r in prompt[1]] + top
        tokens = [self._token(t) for t in ids]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _echo(self, index: int, out: RequestOutput | None) -> tuple[str, tuple[list[int], list] | None]:
        """The prompt's text and (ids, records) to put before choice `index`'s own, once per choice."""
        if not self.echo or self.chat or index in self._echoed:
            return "", None
        self._echoed.add(index)
        prompt = index // self.n
        records = out.prompt_logprobs if out is not None else None
        return self.prompt_texts[prompt], (self.prompt_ids[prompt], records) if records is not None else None

    def choice(self, index: int, c: CompletionOutput, final: bool, out: RequestOutput | None = None) -> dict[str, Any]:
        echo_text, echo_logprobs = self._echo(index, out)
        choice: dict[str, Any] = {"index": index, "finish_reason": c.finish_reason,
                                  "logprobs": self.logprobs(c.logprobs, prompt=echo_logprobs)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            if self.tools is not None:
                content, calls = self.tools.extract(c.text)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content,
                                         "tool_calls": [call.to_openai() for call in calls]}
                    if c.finish_reason == "stop":
                        choice["finish_reason"] = "tool_calls"
        else:
            choice["text"] = echo_text + c.text
        if self.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        if self.prompt_logprobs and out is not None and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = [None if r is None else self._vllm_record(r) for r in out.prompt_logprobs]
        return choice

    def _vllm_record(self, r: Any) -> dict[str, dict[str, Any]]:
        """vLLM's shape of one prompt token's record: token id -> its logprob and text (top ones too)."""
        out = {str(t): {"logprob": lp, "decoded_token": self._token(t)} for t, lp in r.top}
        out[str(r.token_id)] = {"logprob": r.logprob, "decoded_token": self._token(r.token_id)}
        return out

    def chunk(self, index: int, output: CompletionOutput | None = None, role: bool = False,
              request_output: RequestOutput | None = None) -> dict[str, Any]:
        assert role or output is not None
        echo_text, echo_logprobs = self._echo(index, request_output) if output is not None else ("", None)
        text = echo_text + (output.text_delta if output is not None else "")
        tool_stream = None
        if self.chat and self.tools is not None and output is not None:
            tool_stream = self._tool_streams.setdefault(index, self.tools.stream())
            text, tool_deltas = tool_stream.feed(text, final=output.finish_reason is not None)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            if tool_stream is not None and tool_deltas:
                delta["tool_calls"] = tool_deltas
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": None, "logprobs": None}
        if output is not None:
            choice["finish_reason"] = output.finish_reason
            if tool_stream is not None and tool_stream.num_calls and output.finish_reason == "stop":
                choice["finish_reason"] = "tool_calls"
            if output.logprobs_delta or echo_logprobs is not None:
                lp = self.logprobs(output.logprobs_delta, self._text_offsets.get(index, 0), prompt=echo_logprobs)
                choice["logprobs"] = lp
                if lp is not None and "tokens" in lp:  # offsets run on across a completion's chunks
                    self._text_offsets[index] = self._text_offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
        chunk = {"id": self.rid, "object": self.chunk_object, "created": P.now(), "model": self.model,
                 "choices": [choice]}
        if self.return_token_ids:
            choice["token_ids"] = list(output.token_ids_delta) if output is not None else []
            if index not in self._prompt_sent and self.prompt_ids:
                self._prompt_sent.add(index)
                chunk["prompt_token_ids"] = self.prompt_ids[index // self.n]
        return chunk

    def chunks(self, index: int, output: CompletionOutput, request_output: RequestOutput) -> list[dict[str, Any]]:
        """The stream chunks for one output of choice `index`: one, except under tools, where each tool-call
        delta goes in a chunk of its own (as OpenAI streams them), the finish reason in an empty last one,
        and nothing goes out while text that may start a call is held back."""
        chunk = self.chunk(index, output=output, request_output=request_output)
        if not (self.chat and self.tools is not None):
            return [chunk]
        choice = chunk["choices"][0]
        tool_deltas = choice["delta"].pop("tool_calls", [])
        if not choice["delta"].get("content"):
            choice["delta"].pop("content", None)  # OpenAI's tool-call streams end on an empty delta
        finish = choice["finish_reason"]
        out = []
        if choice["delta"].get("content") or choice["logprobs"] is not None or "token_ids" in choice \
                or (finish is not None and not tool_deltas):
            out.append(chunk)
        if tool_deltas:
            choice["finish_reason"] = None
            for d in tool_deltas:
                out.append({**chunk, "choices": [{"index": index, "delta": {"tool_calls": [d]}, "finish_reason": None,
                                                  "logprobs": None}]})
            if finish is not None:
                out.append({**chunk, "choices": [{"index": index, "delta": {}, "finish_reason": finish,
                                                  "logprobs": None}]})
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk of a stream that asked for `stream_options.include_usage`: no choices, only usage."""
        return {"id": self.rid, "object": self.chunk_object, "created": P.now(),
                "model": self.model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def completion(self, finals: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
        """The whole response of a non-streaming request; `finals` holds one output per prompt, in order."""
        choices = [self.choice(i * self.n + c.index, c, final=True, out=out) for i, out in enumerate(finals)
                   for c in out.outputs]
        completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        extra = {"prompt_token_ids": finals[0].prompt_token_ids} if self.return_token_ids else {}
        return {**extra,
            "id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": P.now(),
            "model": self.model, "choices": choices,
            "usage": P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens).model_dump(),
        }
