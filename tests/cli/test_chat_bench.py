"""`quadrant chat` driven through its stdin like a person at the terminal (Ctrl-C as a real SIGINT),
and `quadrant bench` producing its table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.cli.test_cli import quadrant


def test_chat_conversation_clear_multiline_and_bye(default_gguf_path):
    script = 'What is the capital of France?\n/clear\n"""Name\nthree colors."""\n/?\n/bye\n'
    proc = quadrant("chat", "smollm2:135m", "--temperature", "0", "--max-tokens", "40", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Conversation cleared." in proc.stdout and "/bye" in proc.stdout  # the help text
    assert "Traceback" not in proc.stderr


def test_chat_ctrl_c_stops_the_answer_not_the_program(default_gguf_path):
    proc = subprocess.Popen([sys.executable, "-m", "quadrant", "chat", "smollm2:135m", "--temperature", "0",
                             "--max-tokens", "2000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ),
                            # CI may start us with SIGINT ignored (a background job); a terminal would not.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Write a very long story about a dragon who learns to bake bread.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        # Wait until the answer is streaming (well past the first prompt), then press Ctrl-C.
        while "".join(out).count(">>> ") < 1 or len("".join(out).split(">>> ", 1)[1]) < 40:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(out)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while "[stopped]" not in "".join(out):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(out)
            time.sleep(0.05)
        proc.stdin.write("/bye\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    assert "Traceback" not in proc.stderr.read()


def test_bench_prints_its_table(default_gguf_path):
    proc = quadrant("bench", "smollm2:135m", "--prompt-tokens", "64", "--decode-tokens", "8", "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr
    for row in ("load to first token", "prompt processing (64 tokens)", "decode, batch 1",
                "decode, 2 concurrent (aggregate)", "peak resident memory", "tok/s", "GiB"):
        assert row in proc.stdout


def test_bench_plot_writes_its_charts(default_gguf_path, tmp_path):
    pytest.importorskip("matplotlib")
    proc = quadrant("bench", "smollm2:135m", "--prompt-tokens", "32", "--decode-tokens", "6", "--concurrency", "4",
                    "--plot", str(tmp_path / "charts"))
    assert proc.returncode == 0, proc.stderr
    assert "concurrency sweep" in proc.stdout and "TTFT p99 ms" in proc.stdout
    for level in ("1", "2", "4"):
        assert any(line.split("│")[1].strip() == level for line in proc.stdout.splitlines()
                   if line.count("│") >= 6)  # one row per level
    for name in ("throughput.png", "latency.png"):
        png = (tmp_path / "charts" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
