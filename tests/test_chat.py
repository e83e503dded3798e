"""Chat templates rendered exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import pytest

from quadrant.chat import ChatTemplateError, render_chat
from quadrant.loader.source import open_model

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋 你好"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  spaces\n\nand lines  "}],
]

# Templates of other families, to exercise loops, namespaces, raise_exception and tojson.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STRICT = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system message must come first') }}{% endif %}"
    "{{ m['role'] | upper }}: {{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(default_gguf_path):
    hf = transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)
    return open_model(default_gguf_path).tokenizer(), hf


@pytest.mark.parametrize("template", ["model", LLAMA3, STRICT])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_render_matches_transformers(tokenizers, template, add_generation_prompt, conversation):
    ours, hf = tokenizers
    source = ours.chat_template if template == "model" else template
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, chat_template=source, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)
    got = render_chat(source, messages, add_generation_prompt=add_generation_prompt, special_tokens=ours.special_tokens)
    assert got == want


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        render_chat(STRICT, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="non-empty"):
        render_chat(LLAMA3, [])


def test_sandbox_blocks_escapes():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="unsafe|not safely|access"):
        render_chat(evil, [{"role": "user", "content": "a"}])
