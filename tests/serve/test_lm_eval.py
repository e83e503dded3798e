"""lm-evaluation-harness against a real server: `local-completions` scores multiple choice through
echo + logprobs (the loglikelihoods checked against transformers on the same GGUF), and
`local-chat-completions` runs generate_until. lm-eval finds the server's own tokenizer through
/tokenize and /tokenizer_info, so no tokenizer is fetched from a hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from tests.serve.conftest import start_server

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

MODEL = "smollm2:135m"
CAPITALS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "The capital of Germany is", "choices": ["Rome", "Berlin", "Lisbon"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "answer": 0},
]
QUESTIONS = [{"question": "What is the capital of France?", "answer": "Paris"},
             {"question": "What is 2 + 2?", "answer": "4"}]


@pytest.fixture(scope="module")
def server(default_gguf_path, tmp_path_factory):
    # Dense weights: the GGUF dequantised, as transformers computes it (the CPU speed plan rounds more).
    s = start_server(tmp_path_factory.mktemp("lm-eval-serve"), "--weight-format", "dense")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, rows in (("capitals", CAPITALS), ("qa", QUESTIONS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "capitals.yaml").write_text(
        "task: quadrant_capitals\n" + common.format(path=root / "capitals.jsonl") +
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    (root / "qa.yaml").write_text(
        "task: quadrant_qa\n" + common.format(path=root / "qa.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 24\n  do_sample: false\n'
        'metric_list:\n  - metric: exact_match\n')
    return root


def lm_eval(model: str, endpoint: str, task: str, tasks: Path, out: Path, *extra: str) -> list[dict]:
    """Run the lm_eval CLI; the samples it logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", f"base_url={endpoint},model={MODEL}",
           "--tasks", task, "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(out.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_loglikelihoods_match_transformers(server, tasks, tmp_path, default_gguf_path):
    samples = lm_eval("local-completions", server.url + "/v1/completions", "quadrant_capitals", tasks, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)
    assert len(samples) == len(CAPITALS)
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = CAPITALS[sample["doc_id"]]
        ours = [float(r[0][0]) for r in sample["resps"]]
        want = []
        for choice in doc["choices"]:
            # lm-eval's split: the whole text's tokens, the context's count of them first.
            context = tokenizer.encode(doc["question"], add_special_tokens=False)
            whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0], -1)
            want.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        assert ours == pytest.approx(want, abs=1e-3)
        predicted = max(range(len(want)), key=want.__getitem__)
        assert sample["acc"] == float(predicted == doc["answer"])  # lm-eval's verdict is transformers'


def test_generate_until_through_chat_completions(server, tasks, tmp_path):
    samples = lm_eval("local-chat-completions", server.url + "/v1/chat/completions", "quadrant_qa", tasks,
                      tmp_path, "--apply_chat_template")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        question = QUESTIONS[sample["doc_id"]]["question"]
        direct = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                max_tokens=24, temperature=0, stop=["\n\n"])
        assert sample["resps"][0][0] == direct.choices[0].message.content
        assert sample["resps"][0][0]  # a real answer, not an empty string
