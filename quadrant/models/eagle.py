"""An EAGLE-style draft head: one decoder layer that predicts the target's next hidden state.

At position p the head reads the target's final hidden state at p - 1 (the state that predicted
token p) and token p's embedding, fuses them (`fc` over the two side by side), runs one decoder
layer with its own paged K/V, and outputs its guess of the target's final hidden state at p. The
target's LM head, cut to the `draft_vocab` tokens the target emits most often (EAGLE-3's reduced
vocabulary: the 135M default model's head is a fifth of its weights), turns that guess into the
next draft. Drafting further than one token feeds the head its own guesses as hidden states.

The head borrows the target's token embedding at load time (no copy on disk); its own weights are
`fc`, the layer, a final norm and the cut LM head. A head folder holds `eagle.json` (the layer's
ModelConfig, the target it was trained for, the draft vocabulary's size) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quadrant.config import ModelConfig
from quadrant.errors import QuadrantError
from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.norm import RMSNorm
from quadrant.layers.rotary import RotaryEmbedding
from quadrant.models.llama import LlamaDecoderLayer

CONFIG_FILE = "eagle.json"
WEIGHTS_FILE = "model.safetensors"


def head_config(target: ModelConfig) -> ModelConfig:
    """The head's one layer: the target's shapes, full attention, a dense MLP."""
    return dataclasses.replace(target, num_hidden_layers=1, layer_types=None, sliding_window=None,
                               num_experts=0, num_experts_per_tok=0, moe_layers=None, moe_intermediate_size=0,
                               shared_expert_intermediate_size=0, n_shared_experts=0, n_group=1, topk_group=1)


class EagleHead(nn.Module):
    draft_vocab: torch.Tensor  # [Vd] int64: the target's token id of each draft logit

    def __init__(self, config: ModelConfig, draft_vocab: torch.Tensor, target_name: str = "") -> None:
        super().__init__()
        self.config = config
        self.target_name = target_name
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(config, 0)
        with torch.no_grad():  # quadrant's linear layers start empty (checkpoints fill them): a fresh head's init
            for name, param in self.layer.named_parameters():
                if "norm" not in name:
                    param.normal_(0.0, 0.02) if param.dim() > 1 else param.zero_()
        self.norm = RMSNorm(hidden, config.rms_norm_eps, config.norm_offset)
        self.lm_head = nn.Linear(hidden, len(draft_vocab), bias=False)  # the target's rows for draft_vocab
        self.register_buffer("draft_vocab", draft_vocab.to(torch.long), persistent=True)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, config.rope_freq_factors)
        self._embed: Any = None  # the target's token embedding, bound by bind_embedding (not a submodule)

    def bind_embedding(self, embed: nn.Module) -> None:
        object.__setattr__(self, "_embed", embed)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                features: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; features: [T, D], the target's (or the head's own) final hidden
        state one position earlier -> the head's guess of the target's final hidden state [T, D]."""
        if self._embed is None:
            raise QuadrantError("the EAGLE head has no token embedding: bind the target's first")
        return self.from_embeddings(self._embed(input_ids).to(features.dtype), positions, meta, features)

    def from_embeddings(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                        features: torch.Tensor) -> torch.Tensor:
        """forward() from the tokens' embeddings [T, D] (training computes them once, up front)."""
        x = self.fc(torch.cat([embeds, features], dim=-1))
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        hidden, residual = self.layer(x, None, {"full_attention": (cos, sin)}, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> fp32 logits over the draft vocabulary [N, Vd]."""
        return self.lm_head(hidden).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> fp32 logits over the target's whole vocabulary [N, V], -inf off the draft vocabulary
        (the head never proposes those, so a sampled draft's distribution is zero there)."""
        small = self.draft_logits(hidden)
        full = small.new_full((small.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self.draft_vocab] = small
        return full

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if not k.startswith("rotary.")}
        save_file(tensors, str(out / WEIGHTS_FILE))
        record = {"target": self.target_name, "draft_vocab_size": len(self.draft_vocab),
                  "config": dataclasses.asdict(self.config), **(extra or {})}
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=1))
        return out


def is_eagle_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_head(folder: str | Path, target: ModelConfig, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> EagleHead:
    """A trained head, checked against the target it will draft for."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_eagle_folder(folder):
        raise QuadrantError(f"{folder}: not an EAGLE head (no {CONFIG_FILE}); train one with `quadrant train --eagle`")
    record = json.loads((folder / CONFIG_FILE).read_text())
    config = ModelConfig(**record["config"])
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if getattr(config, name) != getattr(target, name):
            raise QuadrantError(f"{folder}: this EAGLE head was trained for {record.get('target') or 'another model'} "
                                f"({name} {getattr(config, name)}, the target has {getattr(target, name)})")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    head = EagleHead(config, tensors["draft_vocab"], record.get("target", ""))
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise QuadrantError(f"{folder}: EAGLE head weights do not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return head.to(device=device, dtype=dtype).eval()
