"""Sparse upcycling (`quadrant upcycle`): a dense llama-family model turned into a Mixtral-layout MoE.

Every expert starts as a copy of the layer's dense FFN and the router is random (small, seeded).
Mixtral renormalises its top-k routing weights to sum to one, so with identical experts the
MoE's output equals the dense model's whatever the router picks: the new model starts exactly
where the dense one is, ready to be trained apart, and meanwhile gives the MoE path (routing,
fused experts, quantised experts) real weights and a real tokenizer to run on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from quadrant.errors import QuadrantError
from quadrant.loader.safetensors import write_folder

_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's expert projections


class UpcycleError(QuadrantError, ValueError):
    """The model cannot be upcycled as asked (nothing was written)."""


def upcycle(model: str, out: str | Path, num_experts: int = 4, top_k: int = 2, seed: int = 0,
            progress: bool = True) -> Path:
    from quadrant.loader.source import open_pulled

    out = Path(out).expanduser()
    if out.exists():
        raise UpcycleError(f"{out} already exists; choose a new output folder (nothing was written)")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    source = open_pulled(model)
    if source.config.architecture != "llama" or source.config.num_experts:
        raise UpcycleError(f"upcycling takes a dense llama-family model, not {source.config.architecture!r}")
    config = source.hf_config()
    # A source trained here with options plain llama lacks keeps them, and the quadrant_ prefix.
    prefix = "quadrant_" if str(config.get("model_type", "")).startswith("quadrant_") else ""
    config.update(model_type=f"{prefix}mixtral", architectures=["MixtralForCausalLM"], num_local_experts=num_experts,
                  num_experts_per_tok=top_k, router_aux_loss_coef=0.0, output_router_logits=False)
    config.pop("mlp_bias", None)
    config.pop("quantization_config", None)  # the source's tensors arrive dequantised: the MoE is float
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(source.weights(), desc="upcycle", unit=" tensors", disable=not progress):
        stem, _, kind = name.rpartition(".")
        layer, _, proj = stem.rpartition(".mlp.")
        if proj in _EXPERT_NAMES and kind == "weight":
            for e in range(num_experts):
                tensors[f"{layer}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[proj]}.weight"] = tensor.clone()
            if proj == "gate_proj":
                router = torch.randn(num_experts, tensor.shape[1], generator=gen) * 0.02
                tensors[f"{layer}.block_sparse_moe.gate.weight"] = router.to(tensor.dtype)
        elif ".mlp." in name:
            raise UpcycleError(f"{name}: only bias-free gate/up/down MLPs can be upcycled")
        else:
            tensors[name] = tensor.contiguous()
    write_folder(out, config, source.tokenizer() if source.has_tokenizer() else None,
                 lambda folder: save_file(tensors, str(folder / "model.safetensors")))
    return out
