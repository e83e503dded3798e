"""Tool calling: tools into the prompt, calls out of the text, `required` and named choices by grammar.

Each model family writes its calls its own way; the format is read off the chat template:
  hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Hermes, Qwen 2/2.5/3)
  mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]       (Mistral)
  llama3   {"name": ..., "parameters": {...}}, after <|python_tag|> or alone (Llama 3.1+)
A template that never mentions tools (the default SmolLM2's) gets them described in a system
message and is asked for the hermes form, which it then also sees its own past calls in.

With tool_choice `required` or a named function the output is constrained by a Lark grammar whose
calls are JSON-schema checked (llguidance), so even a 135M model emits a valid call; with `auto`
the text is parsed and a call that does not parse, or names no given tool, stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from quadrant.sampling_params import StructuredOutput

FormatName = Literal["hermes", "mistral", "llama3"]
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_PARALLEL = 8  # calls one answer may make under a grammar (parallel_tool_calls)
# llguidance's JSON options inside a Lark grammar: compact, as engine/structured.py's JSON.
_COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


class ToolError(ValueError):
    """Bad tools or tool_choice: a 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def format_for(template: str | None) -> tuple[FormatName, bool]:
    """(the call format, whether the template renders `tools` itself) for a chat template."""
    template = template or ""
    native = "tools" in template
    if "[TOOL_CALLS]" in template:
        return "mistral", native
    if "<tool_call>" in template:
        return "hermes", native
    if native and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3", native
    return "hermes", native


@dataclass
class ToolCalling:
    """One request's tools, its choice and the format its model writes calls in."""

    tools: list[dict[str, Any]]  # OpenAI's [{"type": "function", "function": {...}}]
    choice: str  # "none", "auto", "required" or a function's name
    parallel: bool
    format: FormatName
    native: bool  # the template renders tools itself

    @classmethod
    def parse(cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
              template: str | None) -> ToolCalling | None:
        """The request's tool calling, checked; None when it has no tools (ToolError if it is malformed)."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("tool_choice", "needs tools")
            return None
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise ToolError(f"tools.{i}", 'each tool must be {"type": "function", "function": {...}}')
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ToolError(f"tools.{i}.function.name", "must be 1-64 letters, digits, _ . or -")
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise ToolError(f"tools.{i}.function.parameters", "must be a JSON schema object")
            names.append(name)
        if len(set(names)) != len(names):
            raise ToolError("tools", "function names must be unique")
        if tool_choice is None:
            choice = "auto"
        elif isinstance(tool_choice, str):
            if tool_choice not in ("none", "auto", "required"):
                raise ToolError("tool_choice", "must be none, auto, required or a named function")
            choice = tool_choice
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            choice = tool_choice["function"].get("name")
            if choice not in names:
                raise ToolError("tool_choice", f"names no given tool: {choice!r}")
        else:
            raise ToolError("tool_choice", 'must be a string or {"type": "function", "function": {"name": ...}}')
        fmt, native = format_for(template)
        return cls(tools, choice, parallel is not False, fmt, native)

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [t["function"] for t in self.tools]

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    # -- the prompt ----------------------------------------------------------------------------
    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template should see it. A template without tools of its own gets them
        in a system message, and past calls and results as text it can read."""
        if self.native:  # templates read arguments as objects (they tojson them); OpenAI sends JSON text
            return [_arguments_as_objects(m) for m in messages]
        out = [_as_text(m) for m in messages]
        prompt = _SYSTEM_PROMPT.format(tools="\n".join(json.dumps(f, ensure_ascii=False) for f in self.functions))
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out

    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools} if self.native else {}

    # -- the grammar ---------------------------------------------------------------------------
    def constraint(self) -> StructuredOutput | None:
        """For `required` and a named function: a grammar that admits only well-formed calls."""
        if self.choice in ("none", "auto"):
            return None
        chosen = [f for f in self.functions if self.choice == "required" or f["name"] == self.choice]
        args = "parameters" if self.format == "llama3" else "arguments"
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   args: f.get("parameters") or {"type": "object"}},
                  "required": ["name", args], "additionalProperties": False} for f in chosen]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        more = _MAX_PARALLEL - 1 if self.parallel and self.choice == "required" else 0
        if self.format == "mistral":
            array = {"type": "array", "items": call, "minItems": 1, "maxItems": more + 1, **_COMPACT}
            return StructuredOutput("lark", f'start: "[TOOL_CALLS]" %json{json.dumps(array)}')
        if self.format == "llama3":
            return StructuredOutput("lark", f"start: %json{json.dumps({**call, **_COMPACT})}")
        repeat = f' ("\\n" tc){{0,{more}}}' if more else ""
        return StructuredOutput("lark", f'start: tc{repeat}\n'
                                        f'tc: "<tool_call>\\n" %json{json.dumps({**call, **_COMPACT})} "\\n</tool_call>"')

    # -- the answer ----------------------------------------------------------------------------
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer; no calls when nothing in it parses as one."""
        known = {f["name"] for f in self.functions}
        if self.format == "mistral":
            head, marker, rest = text.partition("[TOOL_CALLS]")
            calls = _calls(_loads(rest.strip()), "arguments", known) if marker else []
            return (_content(head) if calls else _content(text)), calls
        if self.format == "llama3":
            body = text.strip().removeprefix("<|python_tag|>").strip()
            parts = [p for p in (body.split(";") if body.startswith("{") else []) if p.strip()]
            calls = []
            for part in parts:
                found = _calls(_loads(part.strip()), "parameters", known)
                if not found:
                    return _content(text), []
                calls += found
            return (None, calls) if calls else (_content(text), [])
        calls, kept, at = [], [], 0
        for m in _HERMES.finditer(text):
            found = _calls(_loads(m.group(1)), "arguments", known)
            if found:
                calls += found
                kept.append(text[at:m.start()])
                at = m.end()
        kept.append(text[at:])
        return (_content("".join(kept)) if calls else _content(text)), calls

    def stream(self) -> ToolStream:
        return ToolStream(self)


_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.DOTALL)
_SYSTEM_PROMPT = ("You may call the functions below. To call one, answer with exactly\n<tool_call>\n"
                  '{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
                  "Functions:\n{tools}")
_MARKERS: dict[FormatName, str] = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}


def _as_text(m: dict[str, Any]) -> dict[str, Any]:
    """A message with tool calls or a tool result, as plain text in the hermes form."""
    m = dict(m)
    if m.get("role") == "assistant" and m.get("tool_calls"):
        blocks = []
        for call in m.pop("tool_calls"):
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass
            blocks.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args},
                                                       ensure_ascii=False) + "\n</tool_call>")
        m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
    elif m.get("role") == "tool":
        m = {"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    if m.get("content") is None:
        m["content"] = ""
    return m


def _arguments_as_objects(m: dict[str, Any]) -> dict[str, Any]:
    if m.get("role") != "assistant" or not m.get("tool_calls"):
        return m
    calls = []
    for call in m["tool_calls"]:
        fn = dict(call.get("function", {})) if isinstance(call, dict) else {}
        if isinstance(fn.get("arguments"), str):
            fn["arguments"] = _loads(fn["arguments"]) or {}
        calls.append({**call, "function": fn} if isinstance(call, dict) else call)
    return {**m, "tool_calls": calls}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def _calls(value: Any, args_key: str, known: set[str]) -> list[ToolCall]:
    """ToolCalls from a parsed call or list of calls; [] if any of them is not a call to a known tool."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in known:
            return []
        args = item.get(args_key, item.get("arguments", item.get("parameters", {})))
        if isinstance(args, str):
            args = _loads(args)
        if not isinstance(args, dict):
            return []
        calls.append(ToolCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


class ToolStream:
    """A streamed answer's text split into content deltas and whole tool calls, as they complete.

    Content streams as it comes, except text that may begin a call, which waits until it is one or
    is not; a call goes out once its text is complete (OpenAI's deltas: index, id, type and name
    first, then the arguments in pieces)."""

    ARG_PIECE = 32  # characters of arguments per delta

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.pending = ""  # text not yet sent as content
        self.num_calls = 0
        self.num_sent = 0  # characters sent as content
        self.in_call = False

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool-call deltas to send now) after `delta`; `final` flushes."""
        self.pending += delta
        fmt = self.calling.format
        marker = _MARKERS[fmt]
        content, deltas = "", []
        if not self.in_call and fmt == "llama3":
            # A llama3 call is the whole answer: JSON (or <|python_tag|>) first, or it is all content.
            head = self.pending.lstrip()
            if not self.num_sent and head.startswith(("{", "<|python_tag|>")):
                self.in_call = True
            elif final or self.num_sent or (head and not "<|python_tag|>".startswith(head)):
                content, self.pending = self.pending, ""
        elif not self.in_call:
            at = self.pending.find(marker)
            if at >= 0:
                content, self.pending, self.in_call = self.pending[:at], self.pending[at:], True
            else:
                keep = _partial_marker(self.pending, marker)
                content, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        if self.in_call:
            closed = self._complete_calls(final)
            if closed is not None:
                text, calls = closed
                if calls:
                    for call in calls:
                        deltas += self._deltas(call)
                else:
                    content += text  # it was not a call after all
        if final and self.pending:
            content, self.pending = content + self.pending, ""
        self.num_sent += len(content)
        return content, deltas

    def _complete_calls(self, final: bool) -> tuple[str, list[ToolCall]] | None:
        """The calls whose text is complete, taken out of `pending` (None while a call is still open)."""
        fmt = self.calling.format
        if fmt == "hermes":
            end = self.pending.find("</tool_call>")
            if end < 0 and not final:
                return None
            cut = len(self.pending) if end < 0 else end + len("</tool_call>")
            text, self.pending, self.in_call = self.pending[:cut], self.pending[cut:], False
            _, calls = self.calling.extract(text)
            return text, calls
        if not final:
            return None  # mistral and llama3 calls run to the end of the answer
        text, self.pending, self.in_call = self.pending, "", False
        _, calls = self.calling.extract(text)
        return text, calls

    def _deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        index = self.num_calls
        self.num_calls += 1
        out = [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]
        args = call.arguments
        out += [{"index": index, "function": {"arguments": args[i : i + self.ARG_PIECE]}}
                for i in range(0, len(args), self.ARG_PIECE)]
        return out


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
