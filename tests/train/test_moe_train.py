"""MoE training: aux-loss-free balancing moves each router's bias toward balance, the sequence-level
balance loss trains the router, expert load is reported, and the export serves the same logits."""

from __future__ import annotations

import torch

from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.moe import Experts, Router
from quadrant.train.config import load_config
from quadrant.train.trainer import Trainer
from tests.train.conftest import write_config

MOE = dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2, router_bias=True, norm_topk_prob=True)


def test_bias_balancing_and_balance_loss(tmp_path, alice_corpus, default_tokenizer):
    config = write_config(tmp_path, alice_corpus, model=MOE, moe=dict(bias_update_speed=0.01, balance_loss_weight=0.01),
                          checkpoint=dict(export=str(tmp_path / "export")))
    trainer = Trainer(load_config(config), default_tokenizer, log=lambda _: None)
    routers = [m for m in trainer.model.modules() if isinstance(m, Router)]
    experts = [m for m in trainer.model.modules() if isinstance(m, Experts)]
    gate_before = routers[0].weight.detach().clone()
    loads: list[torch.Tensor] = []
    original = trainer._update_router_bias

    def spy() -> float:
        loads.append(experts[0].tokens_per_expert.clone().float())
        return original()

    trainer._update_router_bias = spy  # type: ignore[method-assign]
    records = trainer.run()
    assert all(r.expert_load is not None and r.expert_load >= 1.0 for r in records)
    # Every step moved each bias entry by exactly +-speed, toward the under-loaded experts.
    bias = routers[0].e_score_correction_bias
    expected = sum(0.01 * torch.sign(load.mean() - load) for load in loads)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)
    assert bias.abs().sum() > 0
    assert not torch.equal(routers[0].weight.detach(), gate_before)  # the router learns (balance loss + CE)
    # The exported MoE, bias included, serves the training model's logits.
    from quadrant.loader.source import open_model

    served = open_model(tmp_path / "export").load_model()
    ids = torch.tensor(default_tokenizer.encode("The rabbit hole went straight on"))
    meta = AttentionMetadata.for_packed_sequences([len(ids)])
    with torch.no_grad():
        expected_logits = trainer.model.lm_head(trainer.model.model(ids, torch.arange(len(ids)), meta))
        got = served.compute_logits(served(ids, torch.arange(len(ids)), meta))
    torch.testing.assert_close(got, expected_logits, rtol=1e-5, atol=1e-5)
