"""Scoring a text through the engine's own path: paged KV cache, prefill chunks, the chosen formats.

`score_tokens` feeds a token sequence in chunks, each attending to the earlier chunks
through the KV cache exactly as serving does (so an 8-bit cache or a weight format shows
its real cost), and returns the log-probabilities the model gave each next token. From
them: perplexity, and the KL divergence between two configurations' distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quadrant.engine.engine import LLMEngine
from quadrant.engine.request import Request
from quadrant.engine.step import ScheduledRow, WorkerRequest
from quadrant.sampling_params import SamplingParams


@dataclass
class Scores:
    logprobs: torch.Tensor  # [N - 1, V] fp32: log-softmax of the logits at positions 0 .. N-2
    targets: torch.Tensor  # [N - 1]: the tokens that followed

    @property
    def nll(self) -> torch.Tensor:
        """[N - 1] negative log-likelihood of each actual next token."""
        return -self.logprobs.gather(1, self.targets[:, None]).squeeze(1)

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))


@torch.inference_mode()
def score_tokens(engine: LLMEngine, token_ids: list[int], chunk: int = 128) -> Scores:
    """Log-probabilities of every next token of `token_ids` (at most the engine's context)."""
    if len(token_ids) < 2:
        raise ValueError("scoring needs at least two tokens")
    if len(token_ids) > engine.max_model_len:
        raise ValueError(f"{len(token_ids)} tokens do not fit the engine's {engine.max_model_len}-token context")
    req = Request(request_id="score", prompt_ids=list(token_ids), params=SamplingParams(max_tokens=1))
    if not engine.kv.allocate(req, len(token_ids)):
        raise MemoryError("the KV cache cannot hold the text; raise --kv-cache-memory")
    runner, model = engine.runner, engine.model
    mirror = WorkerRequest(req.request_id, req.prompt_ids, [], req.params, None, req.block_table)
    rows: list[torch.Tensor] = []
    try:
        done = 0
        while done < len(token_ids):
            n = min(chunk, len(token_ids) - done)
            ids, pos, meta = runner.prepare([(mirror, ScheduledRow(req.request_id, done, n))])
            hidden = model(ids, pos, meta)  # [n, D]
            rows.append(torch.log_softmax(model.compute_logits(hidden).float(), -1).cpu())
            done += n
    finally:
        engine.kv.free(req)
    logprobs = torch.cat(rows)[:-1]
    return Scores(logprobs, torch.tensor(token_ids[1:]))


def kl_divergence(p: Scores, q: Scores) -> torch.Tensor:
    """[N - 1] KL(p || q) per position, in nats: how far q's next-token distribution is from p's."""
    return (p.logprobs.exp() * (p.logprobs - q.logprobs)).sum(-1)
