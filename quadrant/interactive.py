"""`quadrant chat`: an interactive terminal chat, streamed, with history.

Commands: /bye (or Ctrl-D) leaves, /clear forgets the conversation, /? helps.
A message wrapped in triple quotes (\"\"\" ... \"\"\") may span lines. Ctrl-C
while the model answers stops that answer and frees its KV blocks; Ctrl-C at
the prompt does not leave (as in Ollama).
"""

from __future__ import annotations

import signal
import sys
from typing import TextIO

from quadrant.engine.engine import LLMEngine
from quadrant.sampling_params import SamplingParams

HELP = """Commands:
  /bye      leave (Ctrl-D too)
  /clear    forget the conversation so far
  /?        this help
Wrap a message in \"\"\" to write several lines."""


def read_message(prompt: str = ">>> ", out: TextIO = sys.stdout) -> str | None:
    """One user message; None at end of input."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        try:
            lines.append(input("... "))
        except EOFError:
            break
    text = "\n".join(lines)
    return text.rstrip()[:-3] if text.rstrip().endswith('"""') else text


def stream_answer(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, out: TextIO) -> str | None:
    """Print the answer as it comes; None if Ctrl-C stopped it (its request is aborted)."""
    text = []
    stream = engine.stream(prompt_ids, params)
    try:
        for o in stream:
            delta = o.outputs[0].text_delta
            text.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        stream.close()  # aborts the request now, freeing its blocks
        out.write("\n[stopped]\n")
        return None
    out.write("\n\n")
    return "".join(text)


def chat_loop(model: str, system: str | None = None, temperature: float = 0.7, max_tokens: int = 1024,
              out: TextIO = sys.stdout, engine_kwargs: dict | None = None) -> None:
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)  # validates before the load
    # Ctrl-C must reach us as KeyboardInterrupt even if our parent started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine = LLMEngine.from_model(model, **(engine_kwargs or {}))
    engine.require_tokenizer()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out.write(f"quadrant chat with {model}. /? for help, /bye to leave.\n")
    while True:
        try:
            message = read_message()
        except KeyboardInterrupt:
            out.write("\nUse /bye or Ctrl-D to leave.\n")
            continue
        if message is None or message.strip() == "/bye":
            out.write("\n" if message is None else "")
            return
        if not message.strip():
            continue
        if message.strip() in ("/?", "/help"):
            out.write(HELP + "\n")
            continue
        if message.strip() == "/clear":
            history = history[:1] if system else []
            out.write("Conversation cleared.\n")
            continue
        history.append({"role": "user", "content": message})
        prompt_ids = engine.chat_prompt(history)
        if len(prompt_ids) >= engine.max_model_len:
            history.pop()
            out.write(f"That conversation is too long for the context ({engine.max_model_len} tokens); /clear to start over.\n")
            continue
        answer = stream_answer(engine, prompt_ids, params, out)
        if answer is None:
            history.pop()  # a stopped answer is not part of the conversation
        else:
            history.append({"role": "assistant", "content": answer})
