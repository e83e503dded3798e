"""Rotating the residual stream before quantisation (QuaRot / SpinQuant's offline rotation R1).

A few channels of a transformer's residual stream carry activations a hundred times larger than
the rest, and the weights that read them are shaped accordingly; both quantise badly. With an
orthogonal Q [D, D], the model whose residual stream is x Q computes exactly the same function:

    embeddings  E -> E Q                    readers (q/k/v, gate/up, routers)  W -> (W diag g) Q
    writers (o_proj, down projections)  W -> Q^T W      RMSNorm gains g -> 1 (folded into readers)
    LM head     H -> (H diag g_final) Q     (untied from the embeddings: their gains differ)

RMSNorm commutes with Q once its gain is 1 (the root mean square of x Q is that of x), so the
rotated checkpoint is an ordinary one of the same architecture and runs unchanged everywhere.
Q mixes every channel into every other, which spreads the outliers: the 8-bit activations of the
projections that read the stream lose far less (on SmolLM2 and its upcycled MoE, W8A8 loses about
half the perplexity it did). 4-bit weights gain little, and w4a8 lost, for a reason not yet pinned down
(BENCHMARKS.md), so `quadrant quantize` rotates for w8a8 by default. Families whose norms are
not plain RMSNorm gains (gemma's 1 + w, sandwich norms, LayerNorm biases) are refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch

from quadrant.loader.source import ModelSource
from quadrant.quant.calibrate import plain_norm_gains

# Tensors (Hugging Face names within a decoder layer) that read the residual stream after the
# layer's attention norm or its FFN norm, and those that write back into it.
_ATTENTION_READERS = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|q_a_proj|kv_a_proj_with_mqa)\.weight$")
_FFN_READERS = re.compile(
    r"\.(mlp|block_sparse_moe)\.(gate_proj|up_proj|gate|shared_expert_gate"
    r"|experts\.(\d+\.)?(w1|w3|gate_proj|up_proj|gate_up_proj)"
    r"|shared_experts?\.(gate_proj|up_proj))\.weight$")
_WRITERS = re.compile(r"\.(self_attn\.o_proj|(mlp|block_sparse_moe)\.(down_proj|experts\.(\d+\.)?(w2|down_proj)"
                      r"|shared_experts?\.down_proj))\.(weight|bias)$")
_LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class RotationError(ValueError):
    """The architecture cannot be rotated exactly."""


def random_orthogonal(dim: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] matrix (fp64), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes the distribution uniform


def rotation_refusal(source: ModelSource) -> str | None:
    """Why `source` cannot be rotated exactly, or None if it can."""
    if not plain_norm_gains(source.config):
        return f"{source.config.architecture} norms are not plain RMSNorm gains"
    return None


@dataclasses.dataclass
class RotatedSource(ModelSource):
    """`base`'s checkpoint with its residual stream rotated by `rotation`, read tensor by tensor."""

    base: ModelSource | None = None
    rotation: torch.Tensor | None = None  # Q [D, D], fp64
    seed: int = 0  # random_orthogonal's, which gave Q
    gains: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the norms' gains, by name

    @classmethod
    def of(cls, base: ModelSource, seed: int = 0) -> RotatedSource:
        reason = rotation_refusal(base)
        if reason is not None:
            raise RotationError(f"cannot rotate this model: {reason}")
        gains = {}
        # One pass first: the readers need their norm's gain before its turn, and a tensor no rule
        # covers is refused before anything is written.
        for name, tensor in base.weights():
            if name.endswith("layernorm.bias"):
                raise RotationError("cannot rotate this model: its norms have biases (LayerNorm)")
            if _role(name, tensor, base.config.hidden_size) == "norm":
                gains[name] = tensor.double()
        config = dataclasses.replace(base.config, tie_word_embeddings=False)
        return cls(base.path, config, base.gguf, base.quantized_format, base.quantized_group,
                   base=base, rotation=random_orthogonal(base.config.hidden_size, seed), seed=seed, gains=gains)

    def hf_config(self) -> dict[str, Any]:
        assert self.base is not None
        config = self.base.hf_config()
        config["tie_word_embeddings"] = False
        return config

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        assert self.base is not None and self.rotation is not None
        q = self.rotation
        tied = self.base.config.tie_word_embeddings
        for name, tensor in self.base.weights():
            role = _role(name, tensor, q.shape[0])
            if role == "embedding":
                yield name, _cast(tensor.double() @ q, tensor)
                if tied:
                    yield "lm_head.weight", self._head(tensor)
            elif role == "head":
                if not tied:
                    yield name, self._head(tensor)
            elif role == "norm":
                yield name, torch.ones_like(tensor)
            elif role in ("input_layernorm", "post_attention_layernorm"):  # a reader: its norm's gain, then Q
                layer = _LAYER.match(name)
                assert layer is not None
                gain = self.gains[f"model.layers.{layer.group(1)}.{role}.weight"]
                yield name, _cast((tensor.double() * gain) @ q, tensor)
            elif role == "writer":  # rows (or a bias) in the stream's basis
                yield name, _cast(q.t() @ tensor.double() if name.endswith(".weight") else tensor.double() @ q, tensor)
            else:
                yield name, tensor  # q/k norms, biases of readers, router correction biases: not in the stream

    def _head(self, head: torch.Tensor) -> torch.Tensor:
        assert self.rotation is not None
        return _cast((head.double() * self.gains["model.norm.weight"]) @ self.rotation, head)


def _role(name: str, tensor: torch.Tensor, hidden: int) -> str:
    """What a tensor is to the residual stream: "embedding", "head", "norm" (a gain set to 1), a
    reader (named by the norm whose gain it takes), "writer", or "other" (not in the stream's basis)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if name.endswith(_LAYER_NORMS) or name == "model.norm.weight":
        return "norm"
    layer = _LAYER.match(name)
    if layer is not None and _ATTENTION_READERS.search(name):
        return "input_layernorm"
    if layer is not None and _FFN_READERS.search(name):
        return "post_attention_layernorm"
    if _WRITERS.search(name):
        return "writer"
    if layer is not None and tensor.dim() >= 2 and hidden in tensor.shape[-2:]:
        raise RotationError(f"cannot rotate this model: no rule for {name}")
    return "other"


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rotated float weights in fp32 at least (a bf16 source's rotation keeps its precision)."""
    return value.to(torch.float32 if like.dtype in (torch.float16, torch.bfloat16, torch.float64) else like.dtype)
