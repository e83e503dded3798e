"""The `quadrant` command as a user runs it: a real subprocess, stdout/stderr and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType

from tests.gguf_files import write_tiny_llama_gguf


def quadrant(*args: str, env_home=None, stdin: str | None = None, timeout: float = 300):
    import os

    env = dict(os.environ)
    if env_home is not None:
        env["QUADRANT_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "quadrant", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=timeout)


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0]


def test_run_default_model_answers_paris(default_gguf_path):
    proc = quadrant("run", "smollm2:135m", "What is the capital of France?", "--max-tokens", "48")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_run_accepts_a_gguf_path_and_stdin(default_gguf_path):
    proc = quadrant("run", str(default_gguf_path), "--max-tokens", "40", stdin="What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_show_describes_the_model(default_gguf_path):
    proc = quadrant("show", str(default_gguf_path))
    assert proc.returncode == 0, proc.stderr
    for field in ("architecture", "llama", "Q4_1", "8192", "apache-2.0", "<|im_start|>", "parameters"):
        assert field in proc.stdout


def test_unknown_model_lists_what_exists(tmp_path):
    proc = quadrant("run", "nosuchmodel:7b", "hi", env_home=tmp_path)
    assert_one_line_error(proc, "nosuchmodel:7b", "smollm2:135m")


def test_missing_path(tmp_path):
    assert_one_line_error(quadrant("run", str(tmp_path / "none.gguf"), "hi"), "no such file")


def test_corrupt_gguf(tmp_path, default_gguf_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf_path.read_bytes()[:5_000_000])
    assert_one_line_error(quadrant("run", str(bad), "hi"), "cut.gguf")


def test_unsupported_architecture(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "mamba.gguf", arch="mamba")
    assert_one_line_error(quadrant("run", str(path), "hi"), "mamba", "not supported")


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "q2k.gguf", weight_type=GGMLQuantizationType.Q2_K)
    assert_one_line_error(quadrant("run", str(path), "hi", "--raw"), "Q2_K")


def test_prompt_longer_than_context(default_gguf_path):
    proc = quadrant("run", "smollm2:135m", "--raw", stdin="hello " * 9000)
    assert_one_line_error(proc, "prompt has", "8192")


@pytest.mark.parametrize("flag,value", [("--max-tokens", "0"), ("--temperature", "-1")])
def test_bad_sampling_flag(flag, value, default_gguf_path):
    assert_one_line_error(quadrant("run", "smollm2:135m", "hi", flag, value), flag.strip("-").replace("-", "_"))


@pytest.mark.parametrize("cache_dtype", ["int8", "fp8"])
def test_run_with_an_8bit_kv_cache_completes_paris(cache_dtype, default_gguf_path):
    # A raw completion: the chat answer's first token is a 0.13-nat coin toss between "The" and
    # "L'Étoile" for this 135M model, which an int8 cache with groups of 16 tips (BENCHMARKS.md).
    proc = quadrant("run", "smollm2:135m", "The capital of France is", "--raw", "--max-tokens", "8",
                    "--kv-cache-dtype", cache_dtype)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_bad_kv_quant_group_is_one_line(default_gguf_path):
    assert_one_line_error(quadrant("run", "smollm2:135m", "hi", "--kv-cache-dtype", "int8", "--kv-quant-group", "3"),
                          "kv quant group")


def test_eagle_options_are_checked_in_one_line(tmp_path, default_gguf_path):
    assert_one_line_error(quadrant("train", "--eagle", "smollm2:135m"), "--eagle needs --output")
    assert_one_line_error(quadrant("train", "config.toml", "--epochs", "3"), "--epochs only apply to --eagle")
    assert_one_line_error(quadrant("run", "smollm2:135m", "hi", "--speculative-method", "eagle"),
                          "eagle needs --speculative-model")
    assert_one_line_error(quadrant("run", "smollm2:135m", "hi", "--speculative-method", "eagle",
                                   "--speculative-model", str(tmp_path)), "not an EAGLE head")


def test_dummy_load_of_an_unknown_architecture_is_one_line():
    assert_one_line_error(quadrant("bench", "no-such-arch", "--load-format", "dummy"), "not a shipped architecture")


def test_quantize_show_and_run_a_quantized_folder(default_gguf_path, tmp_path):
    out = tmp_path / "smol-int8"
    proc = quadrant("quantize", "smollm2:135m", "--format", "int8", "-o", str(out), "--allow-requantize")
    assert proc.returncode == 0, proc.stderr
    assert "int8" in proc.stdout and out.is_dir()
    show = quadrant("show", str(out))
    assert show.returncode == 0 and "int8" in show.stdout and "size on disk" in show.stdout
    run = quadrant("run", str(out), "The capital of France is", "--raw", "--max-tokens", "8")
    assert run.returncode == 0 and "Paris" in run.stdout
    # Refusals are one line and write nothing.
    assert_one_line_error(quadrant("quantize", "smollm2:135m", "--format", "int8", "-o", str(out),
                                   "--allow-requantize"), "already exists")
    assert_one_line_error(quadrant("quantize", "smollm2:135m", "--format", "w4a8", "-o", str(tmp_path / "x")),
                          "already quantised", "--allow-requantize")
    assert not (tmp_path / "x").exists()
