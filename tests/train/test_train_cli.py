"""`quadrant data prepare`, `train` and `export` on the command line: bad input ends in one line."""

from __future__ import annotations

import json

import pytest

from quadrant.cli import main
from tests.train.conftest import write_config


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (a progress bar may come before it)
    assert last.startswith("error: ") and "Traceback" not in err and err.count("error: ") == 1, err
    return last


@pytest.mark.parametrize("model, tables, message", [
    (dict(hidden_size=30), {}, "hidden_size 30 is not divisible by num_attention_heads 4"),
    ({}, {"parallel": dict(tp=3)}, "tp 3 must divide num_attention_heads 4"),
    (dict(norm_placement="post"), {}, "norm_placement must be pre, sandwich or depth_scaled_sandwich"),
    (dict(hidden_sizes=32), {}, "unknown keys ['hidden_sizes']"),
    ({}, {"optim": dict(schedule="linear")}, "optim.schedule must be cosine, wsd or constant"),
    (dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2), {},
     "aux-loss-free balancing needs a router bias"),
    (dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2, router_bias=True),
     {"moe": dict(balance_loss_weight=0.01), "parallel": dict(pp=2)}, "balance loss is not supported with pipeline"),
    (dict(tie_word_embeddings=True), {"parallel": dict(pp=2)}, "tied embeddings cannot be split across pipeline stages"),
])
def test_impossible_configs(tmp_path, capsys, alice_corpus, model, tables, message):
    config = write_config(tmp_path, alice_corpus, model=model, **tables)
    assert message in _one_line_error(capsys, ["train", str(config)])
    assert not (tmp_path / "ckpt").exists()  # nothing started


def test_missing_and_empty_corpora(tmp_path, capsys, alice_corpus):
    config = write_config(tmp_path, tmp_path / "nowhere")
    assert "not a prepared corpus" in _one_line_error(capsys, ["train", str(config)])
    assert "no such training config" in _one_line_error(capsys, ["train", str(tmp_path / "none.toml")])
    assert "no such file or folder" in _one_line_error(capsys, ["data", "prepare", str(tmp_path / "x.txt"),
                                                                "-o", str(tmp_path / "c")])
    (tmp_path / "empty.txt").write_text("  \n")
    assert "the corpus is empty" in _one_line_error(capsys, ["data", "prepare", str(tmp_path / "empty.txt"),
                                                             "-o", str(tmp_path / "c")])


def test_train_then_resume_with_another_config_then_export(tmp_path, capsys, alice_corpus):
    stages = [dict(name="s", steps=2, seq_len=16, mixture={"alice": 1.0})]
    config = write_config(tmp_path, alice_corpus, stages=stages)
    assert main(["train", str(config), "--set", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "step 2/2 [s] | loss" in out and "MFU" in out
    other = write_config(tmp_path, alice_corpus, model=dict(num_hidden_layers=2), stages=stages)
    assert "another model config" in _one_line_error(capsys, ["train", str(other)])
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "model")]) == 0
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_hidden_layers"] == 4
    assert "already exists" in _one_line_error(capsys, ["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "model")])


def test_example_configs_parse():
    from pathlib import Path

    from quadrant.train.config import load_config

    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "train").glob("*.toml"))
    assert [p.name for p in examples] == ["moe.toml", "sft.toml", "tiny.toml"]
    for path in examples:
        config = load_config(path)
        assert config.total_steps > 0 and all(Path(p).is_absolute() for p in config.data.sources.values())
