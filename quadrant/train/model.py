"""The serving model's modules, run for training: packed sequences in, summed token loss out.

`TrainingModel` holds the very modules of a models/ family (`model`, `lm_head`), under the same
names, so checkpoints and exports use Hugging Face names with no translation. Its forward flattens
a [B, S] batch into the [T] token stream the model code takes, with an AttentionMetadata whose
sequences are the batch's documents (found where positions restart at 0): attention is causal
within each document and never crosses one. No KV cache is bound, so the attention backend takes
its cache-free path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.models.registry import model_class
from quadrant.train.data import IGNORE_INDEX


def build_model(config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """A fresh models/ family instance (uninitialised fp32 parameters) for `config`."""
    with torch.device(device):
        return model_class(config.architecture)(config)


def packed_metadata(positions: torch.Tensor) -> AttentionMetadata:
    """AttentionMetadata for a flattened batch: one sequence per run of positions starting at 0.
    positions: [B, S], each row starting at 0."""
    flat = positions.reshape(-1)
    starts = (flat == 0).nonzero().flatten().tolist()  # one host sync per step
    bounds = starts + [flat.numel()]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return AttentionMetadata.for_packed_sequences(lengths, flat.device)


class TrainingModel(nn.Module):
    """forward(input_ids, positions, labels) -> (summed loss over labelled tokens, number of them)."""

    model: Any  # the family's decoder (LlamaModel)
    lm_head: Any

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        self.config: ModelConfig = causal_lm.config
        self.model = causal_lm.model  # the same modules: parameter names match the served model's
        self.lm_head = causal_lm.lm_head
        self.family = type(causal_lm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(input_ids.reshape(-1), positions.reshape(-1), packed_metadata(positions))  # [T, D]
        return token_loss(self.lm_head(hidden), labels)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over labelled tokens in fp32, count of labelled tokens)."""
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()  # tensor parallel: the head's output is a sequence-sharded DTensor
    flat = labels.reshape(-1)
    loss = F.cross_entropy(logits.float(), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (flat != IGNORE_INDEX).sum()
