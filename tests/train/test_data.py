"""`quadrant data prepare` and the packed loader: documents, positions, labels, masks, determinism,
rank sharding and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quadrant.train.config import StageConfig
from quadrant.train.data import IGNORE_INDEX, DataError, PackedLoader, TokenCorpus, prepare


def test_prepare_writes_documents_with_eos(tmp_path, default_tokenizer):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "One fish."}) + "\n\n" + json.dumps({"text": "Two fish."}) + "\n")
    out = prepare([tmp_path / "docs.jsonl"], tmp_path / "c", default_tokenizer, "smollm2:135m", progress=False)
    corpus = TokenCorpus(out)
    eos = default_tokenizer.eos_token_id
    first = default_tokenizer.encode("One fish.")
    assert list(corpus.read(0, len(first) + 1)) == [*first, eos]
    assert corpus.doc_starts.tolist() == [0, len(first) + 1]
    assert corpus.manifest["num_documents"] == 2


def test_window_restarts_positions_and_drops_cross_document_labels(tmp_path, default_tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["a b c", "d e f g", "h i"]) + "\n")
    corpus = TokenCorpus(prepare([tmp_path / "a.jsonl"], tmp_path / "c", default_tokenizer, "t", progress=False))
    seq = len(corpus) - 1
    ids, labels, pos = corpus.window(0, seq)
    starts = corpus.doc_starts.tolist()
    for s in starts[1:]:
        assert pos[s] == 0 and pos[s - 1] > 0  # a document starts at position 0
        assert labels[s - 1] == IGNORE_INDEX  # the previous document's last token predicts nothing across
    inside = [j for j in range(seq) if j + 1 not in starts]
    assert np.array_equal(labels[inside], corpus.read(1, len(corpus)).astype(np.int64)[inside])


def test_loader_is_deterministic_rank_sharded_and_resumable(alice_corpus):
    stage = StageConfig(steps=5, seq_len=16, mixture={"alice": 1.0})
    whole = PackedLoader({"alice": str(alice_corpus)}, seed=3)
    batches = [whole.batch(0, stage, step, 8) for step in range(5)]
    again = PackedLoader({"alice": str(alice_corpus)}, seed=3).batch(0, stage, 3, 8)  # a fresh loader: resume
    assert torch.equal(again.input_ids, batches[3].input_ids)
    ranks = [PackedLoader({"alice": str(alice_corpus)}, seed=3, dp_rank=r, dp_size=2).batch(0, stage, 3, 8)
             for r in range(2)]
    merged = torch.stack([ranks[i % 2].input_ids[i // 2] for i in range(8)])
    assert torch.equal(merged, batches[3].input_ids)  # rank r takes samples r, r + 2, ...
    other_seed = PackedLoader({"alice": str(alice_corpus)}, seed=4).batch(0, stage, 3, 8)
    assert not torch.equal(other_seed.input_ids, batches[3].input_ids)


def test_mixture_weights_pick_sources(tmp_path, alice_corpus, default_tokenizer):
    (tmp_path / "b.txt").write_text("zebra " * 400)
    zebra = prepare([tmp_path / "b.txt"], tmp_path / "z", default_tokenizer, "t", progress=False)
    loader = PackedLoader({"alice": str(alice_corpus), "zebra": str(zebra)})
    zebra_id = default_tokenizer.encode(" zebra")[0]
    stage = StageConfig(steps=1, seq_len=16, mixture={"alice": 0.75, "zebra": 0.25})
    batch = loader.batch(0, stage, 0, 400)
    share = (batch.input_ids == zebra_id).float().mean(1).gt(0.5).float().mean().item()
    assert 0.18 < share < 0.32  # a quarter of the windows, within sampling noise (sd 0.02)


def test_chat_mask_covers_assistant_turns_only(tmp_path, default_tokenizer):
    conv = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                         {"role": "assistant", "content": "2 + 3 = 5."},
                         {"role": "user", "content": "And doubled?"},
                         {"role": "assistant", "content": "2 * 5 = 10."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(conv) + "\n")
    corpus = TokenCorpus(prepare([tmp_path / "chat.jsonl"], tmp_path / "c", default_tokenizer, "t", "chat",
                                 progress=False))
    ids, mask = corpus.read(0, len(corpus)), corpus.read(0, len(corpus), mask=True)
    trained = default_tokenizer.decode(ids[mask == 1].tolist())
    assert trained == "2 + 3 = 5.<|im_end|>\n2 * 5 = 10.<|im_end|>\n"
    _, labels, _ = corpus.window(0, len(ids) - 1)
    assert (labels != IGNORE_INDEX).sum() == int(mask[1:].sum())


@pytest.mark.parametrize("content, message", [
    ("", "the corpus is empty"),
    ("{not json\n", "not valid JSON"),
    (json.dumps({"body": "x"}) + "\n", "expected an object with a string 'text'"),
])
def test_bad_corpora_fail_before_writing(tmp_path, default_tokenizer, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / "in.jsonl"], tmp_path / "out", default_tokenizer, "t", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]  # no partial folder left


def test_missing_input_is_one_error(tmp_path, default_tokenizer):
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out", default_tokenizer, "t", progress=False)


def test_windows_across_shards_match_one_shard(tmp_path, default_tokenizer):
    from tests.conftest import ALICE

    paragraphs = [p for p in ALICE[1].read_text().split("\n\n") if p.strip()]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    one = TokenCorpus(prepare([tmp_path / "p.jsonl"], tmp_path / "one", default_tokenizer, "t", progress=False))
    many = TokenCorpus(prepare([tmp_path / "p.jsonl"], tmp_path / "many", default_tokenizer, "t", shard_tokens=1000,
                               progress=False))
    assert len(many.manifest["shards"]) > 5 and len(many) == len(one)
    for index in range(0, one.num_windows(100), 7):  # windows that straddle shard ends included
        for a, b in zip(one.window(index, 100), many.window(index, 100)):
            assert np.array_equal(a, b)
