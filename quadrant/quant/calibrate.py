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

from pathlib import Path

import torch
from torch import nn

from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.linear import Linear

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"


@torch.inference_mode()
def linear_inputs(model: nn.Module, token_ids: list[int], chunk: int = 256,
                  keep: int = 512) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For every Linear, by module name: max |x| per input channel [K] over all the tokens, and
    the first `keep` input rows [keep, K] (to score candidate scales on)."""
    stats: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            amax = x.abs().amax(0)
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
            have = samples.get(name)
            if have is None or have.shape[0] < keep:
                samples[name] = x[:keep] if have is None else torch.cat([have, x[: keep - have.shape[0]]])
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, Linear)]
    try:
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor(token_ids[start : start + chunk])
            model(ids, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)]))
    finally:
        for h in handles:
            h.remove()
    return stats, samples


def smoothing_scales(act: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] for activation absmax act [K] and weight [N, K]; 1 where a channel is silent."""
    w = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    s = act.clamp_min(1e-5).pow(alpha) / w.pow(1 - alpha)
    return torch.where(act > 0, s, torch.ones_like(s)).clamp(1e-2, 1e2)


def _fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (per token for activations, per output channel for weights)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


def best_scales(act: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                alphas: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> torch.Tensor:
    """The scales whose W8A8 product on the sampled inputs x [M, K] is closest to the float one.

    SmoothQuant's strength a trades activation range against weight range; the best a differs
    by layer (outlier-heavy inputs want more migration), so each layer takes the a that
    minimises its own output error, measured on the calibration text.
    """
    w = weight.detach().float()
    ref = x @ w.t()
    best, best_err = torch.ones_like(act), float("inf")
    for alpha in (0.0, *alphas):
        s = smoothing_scales(act, w, alpha) if alpha else torch.ones_like(act)
        err = float((_fake_int8_rows(x / s) @ _fake_int8_rows(w * s).t() - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


class Smoother:
    """Per-tensor rewrites (by Hugging Face name) that migrate activation outliers into weights.

    Built from a dense llama-family model's calibration statistics; `apply(name, tensor)`
    returns the tensor to store. Families with gain offsets (gemma) or MoE blocks are left
    as they are: their norms feed routers or carry (1 + w) gains.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, token_ids: list[int], alpha: float | None = None) -> None:
        """`alpha`: one migration strength for every layer; None searches each layer's own."""
        self.scales: dict[str, tuple[str, torch.Tensor]] = {}  # tensor name -> ("col" | "row" | "div", s)
        stats, samples = linear_inputs(model, token_ids)

        def scales(name: str, weight: torch.Tensor) -> torch.Tensor:
            if alpha is not None:
                return smoothing_scales(stats[name], weight, alpha)
            return best_scales(stats[name], samples[name], weight)

        layers = getattr(getattr(model, "model", None), "layers", [])
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            s = scales(f"{prefix}.self_attn.qkv_proj", attn.qkv_proj.weight)
            self._fold(s, f"{prefix}.input_layernorm.weight",
                       [f"{prefix}.self_attn.{p}_proj.weight" for p in "qkv"])
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

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor
        if name in self.scales:
            kind, s = self.scales[name]
            out = out.float() / s if kind == "div" else out.float() * s  # "col": weight columns (inputs)
        rows = self.scales.get(f"{name}#rows")
        if rows is not None:
            out = out.float() / rows[1][:, None]  # the up projection writes down_proj's input
        return out.to(tensor.dtype) if out is not tensor else out


def supports_smoothing(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (config is not None and not config.norm_offset and not config.sandwich_norm
            and not getattr(config, "num_experts", 0))
