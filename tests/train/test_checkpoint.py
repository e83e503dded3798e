"""DCP checkpoints: resuming mid-run reproduces the uninterrupted run; export gives a folder that the
serving engine (and, for pre-norm llamas, transformers) loads with the training model's logits."""

from __future__ import annotations

import shutil

import pytest
import torch

from quadrant.layers.attention import AttentionMetadata
from quadrant.train import checkpoint as ckpt
from quadrant.train.config import load_config
from quadrant.train.trainer import Trainer
from tests.train.conftest import read_metrics, write_config


def test_resume_reproduces_the_uninterrupted_run(tmp_path, alice_corpus):
    config = write_config(tmp_path, alice_corpus, checkpoint=dict(every=4))
    full = Trainer(load_config(config), log=lambda _: None).run()
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == ["step-0000004", "step-0000008", "step-0000010"]
    # Interrupted after step 4: only that checkpoint survives; a new process resumes from it.
    shutil.rmtree(tmp_path / "ckpt" / "step-0000008")
    shutil.rmtree(tmp_path / "ckpt" / "step-0000010")
    (tmp_path / "metrics.jsonl").unlink()
    resumed = Trainer(load_config(config), log=lambda _: None)
    assert resumed.start_step == 4
    later = resumed.run()
    assert [r.step for r in later] == list(range(5, 11))
    for a, b in zip(full[4:], later):
        assert b.loss == a.loss and b.grad_norm == a.grad_norm  # same ops in the same order: bit-identical
    assert len(read_metrics(tmp_path)) == 6


def _logits(model, ids):
    with torch.no_grad():
        hidden = model.model(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)]))
        return model.lm_head(hidden).float()


@pytest.mark.parametrize("placement", ["pre", "depth_scaled_sandwich"])
def test_export_serves_the_training_models_logits(tmp_path, alice_corpus, default_tokenizer, placement):
    from quadrant.loader.source import open_model

    config = write_config(tmp_path, alice_corpus, model=dict(norm_placement=placement, tiny_init=True, qk_norm=False),
                          stages=[dict(name="main", steps=3, seq_len=32, mixture={"alice": 1.0})],
                          checkpoint=dict(export=str(tmp_path / "export")))
    trainer = Trainer(load_config(config), default_tokenizer, log=lambda _: None)
    trainer.run()
    ids = torch.tensor(default_tokenizer.encode("Alice was beginning to get very tired"))
    expected = _logits(trainer.model, ids)
    served = open_model(tmp_path / "export").load_model()
    got = served.compute_logits(served(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)])))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, the same modules and ops
    if placement == "pre":  # a plain llama: transformers reads it too (fp32; its kernels differ: 1e-4)
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-4)
    else:  # sandwich norms: a model type transformers refuses instead of dropping the extra norms
        assert '"quadrant_llama"' in (tmp_path / "export" / "config.json").read_text()


def test_checkpoint_of_another_config_is_refused(tmp_path, alice_corpus):
    Trainer(load_config(write_config(tmp_path, alice_corpus,
                                     stages=[dict(name="s", steps=1, seq_len=16, mixture={"alice": 1.0})])),
            log=lambda _: None).run()
    other = write_config(tmp_path, alice_corpus, model=dict(hidden_size=64),
                         stages=[dict(name="s", steps=2, seq_len=16, mixture={"alice": 1.0})])
    with pytest.raises(ckpt.CheckpointError, match="another model config .*hidden_size: 32 there, 64 here"):
        Trainer(load_config(other), log=lambda _: None)


def test_long_context_stage_raises_the_rope_base_and_the_export_keeps_it(tmp_path, alice_corpus, default_tokenizer):
    import json

    from quadrant.layers.rotary import RotaryEmbedding

    stages = [dict(name="short", steps=2, seq_len=16, mixture={"alice": 1.0}),
              dict(name="long", steps=1, seq_len=64, mixture={"alice": 1.0}, rope_theta=100000.0)]
    config = write_config(tmp_path, alice_corpus, stages=stages, checkpoint=dict(export=str(tmp_path / "export")))
    trainer = Trainer(load_config(config), default_tokenizer, log=lambda _: None)
    records = trainer.run()
    assert [r.stage for r in records] == ["short", "short", "long"]
    expected = RotaryEmbedding(8, 256, 100000.0)
    torch.testing.assert_close(trainer.model.model.rotary["full_attention"].cos_cached, expected.cos_cached)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["rope_theta"] == 100000.0
