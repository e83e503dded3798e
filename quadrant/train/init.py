"""Initialisation for training from scratch: TinyInit and depth-scaled sandwich-norm gains.

TinyInit draws every matrix from N(0, sqrt(1 / (2 d L))), scaled by width d and depth L (Xavier
scales by width alone), and the embedding from N(0, embed_std) with embed_std near 1. With
depth-scaled sandwich norm each sub-layer's output is RMS-normalised before the residual add, its
gain starting at c / sqrt(L): every layer then adds a contribution of RMS c / sqrt(L), so the
residual stream's scale after L layers, sqrt(embed_std^2 + 2 c^2), does not grow with depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quadrant.config import ModelConfig
from quadrant.layers.embedding import VocabEmbedding
from quadrant.layers.moe import Experts, Router
from quadrant.layers.norm import RMSNorm
from quadrant.train.config import InitConfig

# Sandwich-norm names (layers' Hugging Face names): the norms on sub-layer outputs.
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, init: InitConfig) -> None:
    """Initialise every parameter of a freshly built model in place, deterministically from init.seed."""
    gen = torch.Generator().manual_seed(init.seed)
    std = init.matrix_std(config.hidden_size, config.num_hidden_layers)
    post_gain = (init.post_norm_scale / math.sqrt(config.num_hidden_layers)
                 if init.norm_placement == "depth_scaled_sandwich" else 1.0)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, VocabEmbedding):
                _normal(param, init.embedding_std(), gen)
            elif isinstance(module, RMSNorm):
                gain = post_gain if config.sandwich_norm and name.rsplit(".", 1)[-1] in POST_NORMS else 1.0
                param.fill_(gain - module.offset)
            elif isinstance(module, Router) and pname == "e_score_correction_bias":
                param.zero_()
            elif pname == "bias":
                param.zero_()
            elif param.dim() >= 2 or isinstance(module, Experts):
                _normal(param, std, gen)
            else:
                raise AssertionError(f"no initialisation rule for {name}.{pname}")


def _normal(param: torch.Tensor, std: float, gen: torch.Generator) -> None:
    # Drawn on the CPU in fp32, then copied: the same numbers on every device and dtype.
    param.copy_(torch.randn(param.shape, generator=gen) * std)
