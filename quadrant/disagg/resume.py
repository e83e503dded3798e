"""The two steps' request bodies, and the bookkeeping that resumes a broken decode stream.

A prefill step is the client's body cut to one token whose KV is kept for a decode worker; a decode
step is the client's body plus the prefill's kv_transfer_params (and token ids asked for, when it
streams). `StreamTracker` follows what each choice has relayed (text, token ids, logprobs) so that a
stream that breaks mid-way can go on elsewhere as a completion of the prompt plus the tokens already
sent, translated back into the client's format, with no token repeated or lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

# -- request bodies of the two steps -------------------------------------------------------------

# logprobs stay: the prefill worker's first token travels on to the decode worker with its record.
_PREFILL_DROP = ("stream_options", "echo", "return_token_ids")
# Sampling fields a resumed choice keeps (its prompt, max_tokens and n are the router's).
_RESUME_KEEP = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "user")


def prefill_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The prompt alone: one token, not streamed, its KV kept for a remote decode worker."""
    out = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    out.update(max_tokens=1, stream=False, n=1, kv_transfer_params={"do_remote_decode": True})
    if chat and "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None, stream: bool) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if kv_transfer_params is not None:
        out["kv_transfer_params"] = kv_transfer_params
    if stream:  # token ids in the chunks: what a broken stream is resumed from
        out["return_token_ids"] = True
    return out


def num_prompts(body: dict[str, Any], chat: bool) -> int:
    prompt = body.get("prompt")
    if chat or not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


# -- streams -------------------------------------------------------------------------------------

def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def error_event(message: str, type_: str = "server_error") -> bytes:
    return sse({"error": {"message": message, "type": type_, "param": None, "code": None}})


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[bytes, str]]:
    """The events of an upstream stream: each as received (relayed byte for byte) and its data."""
    buffer = b""
    async for piece in response.aiter_bytes():
        buffer += piece
        while (end := buffer.find(b"\n\n")) >= 0:
            raw, buffer = buffer[:end + 2], buffer[end + 2:]
            lines = [line[5:] for line in raw.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
            yield raw, "\n".join(line[1:] if line.startswith(" ") else line for line in lines)


@dataclass
class ChoiceProgress:
    token_ids: list[int] = field(default_factory=list)  # relayed to the client
    num_chars: int = 0  # text relayed (a resumed choice's logprob text offsets go on from here)
    finished: bool = False


class StreamTracker:
    """What of one stream has reached the client: per choice, the token ids relayed and whether it
    finished; enough to resume the unfinished choices on another worker as /v1/completions requests
    whose chunks it turns back into the client's format (same id, same choice index).

    Payloads come in as `data:` strings; a payload comes out changed only where the router's own
    `return_token_ids` has to be stripped (the client did not ask for token ids) or translated.
    """

    def __init__(self, body: dict[str, Any], chat: bool) -> None:
        self.body, self.chat = body, chat
        self.keep_token_ids = body.get("return_token_ids") is True
        n = body.get("n", 1)
        self.n = n if isinstance(n, int) and n > 0 else 1
        self.num_prompts = num_prompts(body, chat)
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.choices = {i: ChoiceProgress() for i in range(self.num_prompts * self.n)}
        self.prompt_token_ids: dict[int, list[int]] = {}  # prompt index -> its ids (a choice's first chunk)
        self.id: str | None = None
        self.model: Any = body.get("model")
        self.created: int | None = None
        self.ids_complete = True  # every text relayed came with its token ids
        self.usage_sent = False
        self.done = False  # [DONE] went to the client
        self.new_tokens = 0  # tokens in the payload last accepted (TTFT/TPOT)

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def accept(self, data: str) -> str | None:
        """Record one payload of the decode stream; the payload to relay instead, or None: as it came."""
        self.new_tokens = 0
        if data.strip() == "[DONE]":
            self.done = True
            return None
        chunk = _json_object(data)
        if chunk is None:  # not ours to judge: relayed as it came
            return None
        self.id = self.id or chunk.get("id")
        self.created = self.created or chunk.get("created")
        self.model = chunk.get("model", self.model)
        changed = False
        if "prompt_token_ids" in chunk:
            ids = chunk["prompt_token_ids"]
            for c in chunk.get("choices") or []:
                if isinstance(ids, list) and isinstance(c, dict) and isinstance(c.get("index"), int):
                    self.prompt_token_ids.setdefault(c["index"] // self.n, ids)
            if not self.keep_token_ids:
                del chunk["prompt_token_ids"]
                changed = True
        if chunk.get("usage"):
            self.usage_sent = True
        for c in chunk.get("choices") or []:
            progress = self.choices.get(c.get("index", -1)) if isinstance(c, dict) else None
            if progress is None:
                continue
            text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            ids = c.get("token_ids")
            if isinstance(ids, list):
                progress.token_ids.extend(ids)
                self.new_tokens += len(ids)
                if not self.keep_token_ids:
                    del c["token_ids"]
                    changed = True
            elif text:
                self.ids_complete = False
                self.new_tokens += 1
            progress.num_chars += len(text) if isinstance(text, str) else 0
            if c.get("finish_reason") is not None:
                progress.finished = True
        return json.dumps(chunk, ensure_ascii=False) if changed else None

    def resumable(self) -> bool:
        return self.ids_complete and all(i // self.n in self.prompt_token_ids for i in self.unfinished())

    def unfinished(self) -> list[int]:
        return [i for i, p in self.choices.items() if not p.finished]

    def resume_body(self, index: int) -> dict[str, Any] | None:
        """Choice `index` as a /v1/completions request that continues it; None when no tokens are left."""
        body, progress = self.body, self.choices[index]
        out = {k: body[k] for k in _RESUME_KEEP if k in body}
        limit = (body.get("max_completion_tokens") or body.get("max_tokens")) if self.chat \
            else body.get("max_tokens", 16)  # OpenAI's default for completions
        if isinstance(limit, int):
            if limit - len(progress.token_ids) < 1:
                return None
            out["max_tokens"] = limit - len(progress.token_ids)
        else:
            out["max_tokens"] = None  # what the context has room for, as in the original request
        if self.chat and body.get("logprobs") is True:
            out["logprobs"] = body.get("top_logprobs") or 0
        elif not self.chat and isinstance(body.get("logprobs"), int):
            out["logprobs"] = body["logprobs"]
        out.update(prompt=self.prompt_token_ids[index // self.n] + progress.token_ids, stream=True, n=1,
                   return_token_ids=True)
        return out

    def translate(self, index: int, data: str) -> str | None:
        """A payload of choice `index`'s resumed stream in the client's format; None: nothing to relay."""
        self.new_tokens = 0
        progress = self.choices[index]
        chunk = _json_object(data)
        if chunk is None:
            return None
        if "error" in chunk:  # the resumed request failed inside the worker: the choice ends here
            progress.finished = True
            return data
        out = []
        for c in chunk.get("choices") or []:
            text = c.get("text") or ""
            ids = c.get("token_ids")
            reason = c.get("finish_reason")
            if isinstance(ids, list):
                progress.token_ids.extend(ids)
                self.new_tokens += len(ids)
            choice: dict[str, Any] = {"index": index, "finish_reason": reason}
            if self.chat:
                choice.update(delta={"content": text}, logprobs=_chat_logprobs(c.get("logprobs")))
            else:
                choice.update(text=text, logprobs=_shift_offsets(c.get("logprobs"), progress.num_chars))
            if self.keep_token_ids and isinstance(ids, list):
                choice["token_ids"] = ids
            progress.num_chars += len(text)
            progress.finished = progress.finished or reason is not None
            out.append(choice)
        if not out:  # its usage chunk: the client gets one for the whole stream at the end
            return None
        return json.dumps(self._chunk(out), ensure_ascii=False)

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        self.choices[index].finished = True
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": None}
        choice.update({"delta": {"content": ""}} if self.chat else {"text": ""})
        return self._chunk([choice])

    def usage_chunk(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompt_token_ids.values())
        completion = sum(len(p.token_ids) for p in self.choices.values())
        chunk = self._chunk([])
        chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}
        return chunk

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created or int(time.time()),
                "model": self.model, "choices": choices}


def _json_object(data: str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _chat_logprobs(lp: Any) -> dict[str, Any] | None:
    """Completions logprobs (tokens, token_logprobs, top_logprobs) in the chat format."""
    if not isinstance(lp, dict):
        return None
    tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or [{}] * len(tokens)
    return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": k, "logprob": x, "bytes": list(k.encode())}
                                          for k, x in (top or {}).items()]}
                        for t, v, top in zip(tokens, values, tops)]}


def _shift_offsets(lp: Any, shift: int) -> Any:
    if isinstance(lp, dict) and isinstance(lp.get("text_offset"), list):
        lp["text_offset"] = [o + shift for o in lp["text_offset"]]
    return lp
