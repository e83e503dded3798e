"""Activation statistics and SmoothQuant scale migration for the 8-bit-activation formats.

Per-token int8 activations lose most where a few input channels carry outliers far above
the rest. SmoothQuant divides such a channel's activations by s and multiplies the weight
column that reads it by s (the product is unchanged), with s = amax(x)^a / amax(w)^(1-a):
the activation range flattens, the weights take the difference. The division is folded
into whatever writes the activation: the RMSNorm gain before q/k/v and gate/up, and the
up projection's rows before down. Statistics come from a public-domain text shipped in
the package (quant/data/calibration.txt), disjoint from the perplexity text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.linear import Linear
from quadrant.layers.moe import Experts, SparseMoeBlock
from quadrant.quant.grids import group_size_for, int4_groups

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"


@torch.inference_mode()
def linear_inputs(model: nn.Module, token_ids: list[int], chunk: int = 256,
                  keep: int = 512) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For every Linear and MoE block, by module name: max |x| per input channel [K] over all the
    tokens, and the first `keep` input rows [keep, K] (to score candidate scales on). For a MoE
    block also "{name}.experts.{e}.down": max |x| of expert e's down-projection input, over all the
    tokens (as a dense layer's down_proj gets it), not only the sampled rows."""
    stats: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}

    def update(name: str, amax: torch.Tensor) -> None:
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            update(name, x.abs().amax(0))
            have = samples.get(name)
            if have is None or have.shape[0] < keep:
                samples[name] = x[:keep] if have is None else torch.cat([have, x[: keep - have.shape[0]]])
            if isinstance(module, SparseMoeBlock) and module.experts.w13 is not None:
                for e in range(module.experts.num_experts):
                    update(f"{name}.experts.{e}.down", expert_down_input(module.experts, e, x).abs().amax(0))
        return record

    run_calibration(model, token_ids, [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
                                       if isinstance(m, (Linear, SparseMoeBlock))], chunk)
    return stats, samples


def run_calibration(model: nn.Module, token_ids: list[int], handles: list[Any], chunk: int = 256) -> None:
    """Run the calibration tokens through `model` in independent `chunk`-token sequences (no cache),
    so the hooks behind `handles` see every layer's inputs; the hooks are removed after."""
    try:
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor(token_ids[start : start + chunk])
            model(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)]))
    finally:
        for h in handles:
            h.remove()


def expert_down_input(experts: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) of expert e for block inputs x [M, H]: its down projection's input [M, I]."""
    gate_up = x @ experts.w13[e].float().t()  # [M, 2I]
    inter = experts.intermediate_size
    gate = F.silu(gate_up[:, :inter]) if experts.activation == "silu" else F.gelu(gate_up[:, :inter], approximate="tanh")
    return gate * gate_up[:, inter:]


Tie = Callable[[torch.Tensor], torch.Tensor]


def smoothing_scales(act: torch.Tensor, weight: torch.Tensor, alpha: float, tie: Tie | None = None) -> torch.Tensor:
    """s [K] for activation absmax act [K] and weight [N, K]; 1 where a channel is silent. `tie`
    maps per-channel maxima to shared ones where several input channels must take one s."""
    w = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    if tie is not None:
        act, w = tie(act), tie(w)
    s = act.clamp_min(1e-5).pow(alpha) / w.pow(1 - alpha)
    return torch.where(act > 0, s, torch.ones_like(s)).clamp(1e-2, 1e2)


def _fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (per token for activations, per output channel for weights)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def _fake_w4_then_int8(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """w4a8's weights as the CPU runs them: the 4-bit group grid, re-expressed per channel in int8."""
    codes, scale, lo = int4_groups(w, group_size_for(w.shape[-1], group))
    return _fake_int8_rows((codes * scale + lo).reshape(w.shape))


def weight_quantizer(fmt: str, group: int = 128) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda w: _fake_w4_then_int8(w, group)) if fmt == "w4a8" else _fake_int8_rows


def best_scales(act: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                quantize_weight: Callable[[torch.Tensor], torch.Tensor] = _fake_int8_rows,
                alphas: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), tie: Tie | None = None) -> torch.Tensor:
    """The scales whose W8A8 product on the sampled inputs x [M, K] is closest to the float one.

    SmoothQuant's strength a trades activation range against weight range; the best a differs
    by layer (outlier-heavy inputs want more migration), so each layer takes the a (or none)
    that minimises its own output error, measured on the calibration text with the weights
    quantised as the format stores them (`quantize_weight`).
    """
    w = weight.detach().float()
    ref = x @ w.t()
    best, best_err = torch.ones_like(act), float("inf")
    for alpha in (0.0, *alphas):
        s = smoothing_scales(act, w, alpha, tie) if alpha else torch.ones_like(act)
        err = float((_fake_int8_rows(x / s) @ quantize_weight(w * s).t() - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


# One expert's projection in a Hugging Face name: "<layer>.<block>.experts.<e>.<proj>.weight".
_EXPERT_WEIGHT = re.compile(r"\.[a-z_]+\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# Hugging Face names of the weights that read a MoE block's input: router, experts' gate/up, shared experts.
_FFN_INPUT_READERS = ("gate.weight", "w1.weight", "w3.weight", "gate_proj.weight", "up_proj.weight",
                      "shared_expert_gate.weight")


class Smoother:
    """Per-tensor rewrites (by Hugging Face name) that migrate activation outliers into weights.

    Built from a llama-family model's calibration statistics; `apply(name, tensor)` returns
    the tensor to store. Families with (1 + w) gains (gemma) are left as they are. The o
    projection's input is the attention's mix of v rows, so its scales go into v_proj's rows:
    one s per (kv head, dim), shared by the query heads that read that kv head.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, token_ids: list[int], alpha: float | None = None,
                 fmt: str = "w8a8", group: int = 128) -> None:
        """`alpha`: one migration strength for every layer; None searches each layer's own for `fmt`."""
        self.scales: dict[str, tuple[str, torch.Tensor]] = {}  # tensor name -> ("col" | "row" | "div", s)
        self.ffn_readers: dict[str, torch.Tensor] = {}  # MoE layer prefix -> s for its FFN-input readers
        self.expert_down: dict[str, torch.Tensor] = {}  # "{layer prefix}.{expert}" -> s of its down input
        stats, samples = linear_inputs(model, token_ids)
        quantize_weight = weight_quantizer(fmt, group)

        def scales(name: str, weight: torch.Tensor, tie: Tie | None = None) -> torch.Tensor:
            if alpha is not None:
                return smoothing_scales(stats[name], weight, alpha, tie)
            return best_scales(stats[name], samples[name], weight, quantize_weight, tie=tie)

        config = getattr(model, "config", None)
        layers = getattr(getattr(model, "model", None), "layers", [])
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            s = scales(f"{prefix}.self_attn.qkv_proj", attn.qkv_proj.weight)
            self._fold(s, f"{prefix}.input_layernorm.weight",
                       [f"{prefix}.self_attn.{p}_proj.weight" for p in "qkv"])
            if config is not None and not config.attention_bias:  # a v bias would need the row scaling too
                tie = _kv_tie(config.num_attention_heads, config.num_key_value_heads, config.head_dim)
                s = scales(f"{prefix}.self_attn.o_proj", attn.o_proj.weight, tie)
                self.scales[f"{prefix}.self_attn.o_proj.weight"] = ("col", s)
                heads_per_kv = config.num_attention_heads // config.num_key_value_heads
                per_kv = s.view(config.num_key_value_heads, heads_per_kv, config.head_dim)[:, 0].reshape(-1)
                self.scales[f"{prefix}.self_attn.v_proj.weight#rows"] = ("row", per_kv)
            if isinstance(mlp, SparseMoeBlock):
                # The FFN norm feeds the router, every expert's gate/up and any shared expert: one s
                # for all of them, scored on the experts' stacked gate/up weights.
                hidden = mlp.experts.w13.shape[-1]
                s = scales(f"{prefix}.mlp", mlp.experts.w13.reshape(-1, hidden))
                self.scales[f"{prefix}.post_attention_layernorm.weight"] = ("div", s)
                self.ffn_readers[f"{prefix}."] = s
                self._smooth_expert_down(prefix, mlp, samples[f"{prefix}.mlp"], stats, quantize_weight, alpha)
                continue
            if config is not None and config.mlp_bias:
                continue  # the up projection's bias would need the row scaling too
            s = scales(f"{prefix}.mlp.gate_up_proj", mlp.gate_up_proj.weight)
            self._fold(s, f"{prefix}.post_attention_layernorm.weight",
                       [f"{prefix}.mlp.gate_proj.weight", f"{prefix}.mlp.up_proj.weight"])
            s = scales(f"{prefix}.mlp.down_proj", mlp.down_proj.weight)
            self.scales[f"{prefix}.mlp.down_proj.weight"] = ("col", s)
            self.scales[f"{prefix}.mlp.up_proj.weight#rows"] = ("row", s)

    def _fold(self, s: torch.Tensor, norm: str, readers: list[str]) -> None:
        self.scales[norm] = ("div", s)
        for name in readers:
            self.scales[name] = ("col", s)

    def _smooth_expert_down(self, prefix: str, block: SparseMoeBlock, x: torch.Tensor, stats: dict[str, torch.Tensor],
                            quantize_weight: Callable[[torch.Tensor], torch.Tensor], alpha: float | None) -> None:
        """Each expert's down projection reads act(gate) * up: its scales go into that expert's up rows.
        The activation range is the whole calibration text's, the candidates scored on the sampled
        tokens, as for a dense down_proj (the routed tokens are a subset with the same channels)."""
        for e in range(block.experts.num_experts):
            h = expert_down_input(block.experts, e, x)  # [M, I]
            amax, w2 = stats[f"{prefix}.mlp.experts.{e}.down"], block.experts.w2[e]
            s = smoothing_scales(amax, w2, alpha) if alpha is not None else best_scales(amax, h, w2, quantize_weight)
            self.expert_down[f"{prefix}.{e}"] = s

    def _expert_down_scale(self, name: str) -> tuple[str, torch.Tensor] | None:
        """("row", s) for an expert's up projection, ("col", s) for its down projection (per-expert names)."""
        match = _EXPERT_WEIGHT.search(name)
        if match is None or not self.expert_down:
            return None
        s = self.expert_down.get(f"{name[: match.start()]}.{match.group(1)}")
        if s is None:
            return None
        return ("row", s) if match.group(2) in ("w3", "up_proj") else ("col", s) if match.group(2) in (
            "w2", "down_proj") else None

    def _moe_reader_scale(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if not name.endswith(_FFN_INPUT_READERS) or ".self_attn." in name:
            return None
        return next((s for prefix, s in self.ffn_readers.items()
                     if name.startswith(prefix) and tensor.shape[-1] == s.numel()), None)

    def column_scale(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The factor `apply` multiplies this tensor's input columns by (its input is divided by it;
        GPTQ rescales the input Hessian with it). None where the columns are left alone."""
        down = self._expert_down_scale(name)
        own = self.scales.get(name)
        out = None
        for s in (self._moe_reader_scale(name, tensor), down[1] if down is not None and down[0] == "col" else None,
                  own[1] if own is not None and own[0] == "col" else None):
            if s is not None:
                out = s if out is None else out * s
        return out

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor
        cols = self.column_scale(name, tensor)
        if cols is not None:
            out = out.float() * cols  # weight columns (inputs)
        down = self._expert_down_scale(name)
        if down is not None and down[0] == "row":
            out = out.float() / down[1][:, None]  # an expert's up rows write its down projection's input
        own = self.scales.get(name)
        if own is not None and own[0] == "div":
            out = out.float() / own[1]  # a norm gain
        rows = self.scales.get(f"{name}#rows")
        if rows is not None:
            out = out.float() / rows[1][:, None]  # the up projection writes down_proj's input
        return out.to(tensor.dtype) if out is not tensor else out


def _kv_tie(heads: int, kv_heads: int, head_dim: int) -> Tie:
    """Tie for o_proj's inputs (channel h * D + d, query head h reading kv head h // (heads / kv_heads)):
    each channel gets the max over the query heads of its kv head, at the same d."""
    def tie(v: torch.Tensor) -> torch.Tensor:
        grouped = v.view(kv_heads, heads // kv_heads, head_dim)
        return grouped.amax(1, keepdim=True).expand_as(grouped).reshape(-1)
    return tie


def plain_norm_gains(config: ModelConfig) -> bool:
    """Whether every norm multiplies by its stored gain alone, so a per-channel factor can be folded
    into it or through it (not gemma's 1 + w, nor its sandwich norms): smoothing and rotation need it."""
    return not config.norm_offset and not config.sandwich_norm


def supports_smoothing(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and plain_norm_gains(config)
