"""Llama-family decoder: Llama 2/3, Mistral, SmolLM2, Qwen2, Qwen3 (and, by flags, Gemma 3).

One forward path: a flattened batch of tokens [T] with their positions and an
AttentionMetadata, whatever mix of prefill chunks and decode tokens it holds.
Variants are ModelConfig flags (qk_norm, qkv_bias, sandwich_norm, norm_offset,
embed_scale, sliding windows; MoE layers take a layers/moe FFN), not forks.
Parameter names follow Hugging Face, so the checkpoint name map is the
identity plus the packed projections below.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from quadrant.config import ModelConfig
from quadrant.kernels.fused_norm_rope import act_and_mul, use_fused
from quadrant.layers.attention import Attention, AttentionMetadata
from quadrant.layers.embedding import LMHead, VocabEmbedding
from quadrant.layers.linear import Linear, MergedLinear
from quadrant.layers.moe import SparseMoeBlock
from quadrant.layers.norm import RMSNorm
from quadrant.layers.rotary import RotaryEmbedding, rotate

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, signed sin), each [T, 1, D]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.layer_type = c.layer_types[layer_idx]  # type: ignore[index]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = MergedLinear(
            c.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=c.attention_bias or c.qkv_bias
        )
        self.o_proj = Linear(q_size, c.hidden_size, bias=c.attention_bias)
        self.qk_norm_full = c.qk_norm and c.qk_norm_full
        if c.qk_norm:
            q_dim, k_dim = (q_size, kv_size) if self.qk_norm_full else (self.head_dim, self.head_dim)
            self.q_norm = RMSNorm(q_dim, c.rms_norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(k_dim, c.rms_norm_eps, c.norm_offset)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=c.attn_scale if c.attn_scale is not None else self.head_dim**-0.5,
            sliding_window=c.layer_sliding_window(layer_idx),
            logit_softcap=c.attn_logit_softcapping,
        )

    def forward(self, hidden: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hk) D]
        if self.qk_norm_full:  # olmoe: one norm over all heads' q, one over all k, before the head split
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        num_qk = self.num_heads + self.num_kv_heads
        qk = qkv[:, : num_qk * self.head_dim].unflatten(-1, (num_qk, self.head_dim))  # [T, Hq + Hk, D]
        v = qkv[:, num_qk * self.head_dim :].unflatten(-1, (self.num_kv_heads, self.head_dim))  # [T, Hk, D]
        if hasattr(self, "q_norm") and not self.qk_norm_full:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])], dim=1)
        cos, sin = rope[self.layer_type]
        qk = rotate(qk, cos, sin)  # q and k rotated in one pass
        out = self.attn(qk[:, : self.num_heads], qk[:, self.num_heads :], v, meta)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": size, "up": size}, bias=config.mlp_bias)
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if use_fused(gate_up):
            return self.down_proj(act_and_mul(gate_up, "gelu_tanh" if self.gelu else "silu"))
        gate, up = self.gate_up_proj.split(gate_up)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = LlamaAttention(c, layer_idx)
        self.mlp: nn.Module = SparseMoeBlock(c, LlamaMLP) if c.is_moe_layer(layer_idx) else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
        # Hugging Face names: without sandwich norms, `post_attention_layernorm` is the
        # pre-FFN norm; with them (gemma3) it normalises the attention output.
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
        self.sandwich = c.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, meta)
        if self.sandwich:
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            hidden = self.post_feedforward_layernorm(self.mlp(hidden))
        else:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            hidden = self.mlp(hidden)
        return hidden, residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.embed_tokens = VocabEmbedding(c.vocab_size, c.hidden_size, scale=c.embed_scale)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_offset)
        self.build_rotary(c)

    def build_rotary(self, c: ModelConfig) -> None:
        """One cos/sin table per distinct layer type, shared by all layers of that type (rebuilt
        when training raises the RoPE base for a long-context stage)."""
        device = next(self.parameters()).device
        self.rotary = nn.ModuleDict()
        for kind in sorted(set(c.layer_types)):  # type: ignore[arg-type]
            sliding = kind == "sliding_attention"
            theta = c.rope_local_theta if sliding and c.rope_local_theta is not None else c.rope_theta
            # Gemma 3 scales only its global layers; other families have one kind of layer.
            scaling = None if sliding and c.rope_local_theta is not None else c.rope_scaling
            factors = None if sliding and c.rope_local_theta is not None else c.rope_freq_factors
            with torch.device(device):
                self.rotary[kind] = RotaryEmbedding(c.head_dim, c.max_position_embeddings, theta, scaling, factors)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        return {kind: cast(RotaryEmbedding, rot).cos_sin(positions, dtype) for kind, rot in self.rotary.items()}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, D]
        rope = self.rope_tables(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Checkpoint projection name -> (packed module, shard) it is loaded into (loader/weights.resolve_name).
    packed_modules: dict[str, tuple[str, str | None]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }
    # Tensor parallelism (parallel/tensor_parallel.py): module name suffix -> how it splits.
    tp_plan = {"qkv_proj": "column", "gate_up_proj": "column", "o_proj": "row", "down_proj": "row",
               "embed_tokens": "vocab", "lm_head": "vocab"}
    # GGUF tensor name (without ".weight"/".bias"; "{i}" is the layer) -> Hugging Face name.
    gguf_names = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
        "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
        "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
        "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
        "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
        "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
        "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
        "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
        "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
        "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
        "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
    }
    # llama.cpp's converter interleaves the rotary halves of q/k rows for the "llama"
    # GGUF architecture only; loading undoes it.
    gguf_rope_permuted = True
    # GGUF stores gemma-style norm gains as 1 + w; subtract this on load.
    gguf_norm_shift = 0.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied, config.final_logit_softcapping)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, D]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] (only the rows whose next token is wanted) -> fp32 logits [N, V]."""
        return self.lm_head(hidden).float()

    @classmethod
    def adapt_gguf_tensor(cls, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """Undo llama.cpp's conversion-time changes to a tensor (already renamed to HF)."""
        if cls.gguf_rope_permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            rows = tensor.shape[0]
            tensor = tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
        if cls.gguf_norm_shift and name.endswith("norm.weight"):
            tensor = tensor - cls.gguf_norm_shift
        return tensor


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 and Qwen3: llama layout with q/k/v bias (qwen2) or q/k norm (qwen3) flags."""

    gguf_rope_permuted = False
