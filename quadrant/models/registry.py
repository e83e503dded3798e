"""Lazy map from architecture names (quadrant family keys, HF model types, GGUF
`general.architecture`) to model classes; a model module is imported only when used."""

from __future__ import annotations

import importlib

from torch import nn

from quadrant.errors import UnsupportedError

_MODELS = {
    "llama": ("quadrant.models.llama", "LlamaForCausalLM"),
    "qwen2": ("quadrant.models.llama", "Qwen2ForCausalLM"),
    "qwen3": ("quadrant.models.llama", "Qwen2ForCausalLM"),
    "gemma3": ("quadrant.models.gemma3", "Gemma3ForCausalLM"),
    "mixtral": ("quadrant.models.moe", "MixtralForCausalLM"),  # GGUF: "llama" with expert tensors
    "qwen2moe": ("quadrant.models.moe", "MoeForCausalLM"),
    "qwen3moe": ("quadrant.models.moe", "MoeForCausalLM"),
    "olmoe": ("quadrant.models.moe", "MoeForCausalLM"),
    "dots1": ("quadrant.models.moe", "Dots1ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise UnsupportedError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
