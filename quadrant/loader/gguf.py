"""GGUF files: metadata -> ModelConfig and tokenizer fields, tensors -> HF-named float weights.

Read through the `gguf` package's memory-mapped reader. Every tensor's data
range is checked against the file size before use (a crafted or truncated
file must fail with a clear error, never read out of bounds), and tensors are
dequantised one at a time with quant/gguf_blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES

from quadrant.config import ModelConfig
from quadrant.errors import ModelLoadError, UnsupportedError
from quadrant.models.registry import model_class, supported_architectures
from quadrant.quant.gguf_blocks import SUPPORTED_TYPES, dequantize



_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 8}
# llama.cpp renormalises the top-k expert weights of these architectures whatever the file says;
# the others read {arch}.expert_weights_norm (default off).
_RENORMALISING_ARCHS = ("llama", "qwen3moe")


class GGUFModelFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises many types (ValueError, IndexError, struct errors)
            raise ModelLoadError(f"{self.path}: not a valid GGUF file ({type(e).__name__}: {e})") from e
        self._check_tensors()
        self.architecture = self.field("general.architecture")
        if self.architecture not in supported_architectures():
            raise UnsupportedError(
                f"{self.path}: architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(supported_architectures())}"
            )
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._summary: tuple[str, int] | None = None  # (quantization, parameters), kept past release_tensors

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            try:
                qtype = GGMLQuantizationType(int(t.tensor_type))
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{self.path}: tensor {t.name} has an unknown type id {int(t.tensor_type)}") from e
            if qtype not in SUPPORTED_TYPES:
                # Fail at open, before minutes of loading, not at the first odd tensor.
                raise UnsupportedError(
                    f"{self.path}: tensor {t.name} has type {qtype.name}, which quadrant does not support"
                )
            n_bytes = int(t.n_elements) // block * type_size
            if t.data_offset + n_bytes > size or t.data_offset < 0:
                raise ModelLoadError(f"{self.path}: truncated or corrupt: tensor {t.name} runs past the end of the file")

    def release_tensors(self) -> None:
        """Forget the tensor views into the mapped file, so the mapping can close (what `describe` reads
        of the tensors is kept)."""
        self._summary = (self.quantization(), self.num_parameters())
        self._tensors = {}
        self.reader.tensors = []
        self.reader.data = None  # type: ignore[assignment]

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def tokenizer_fields(self) -> dict[str, Any]:
        return {k: f.contents() for k, f in self.reader.fields.items() if k.startswith("tokenizer.")}

    def quantization(self) -> str:
        """The most common tensor type among the 2-D weights, e.g. 'Q4_1'."""
        if self._summary is not None:
            return self._summary[0]
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            if len(t.shape) >= 2:
                name = GGMLQuantizationType(int(t.tensor_type)).name
                counts[name] = counts.get(name, 0) + int(t.n_elements)
        return max(counts, key=counts.__getitem__) if counts else "F32"

    def num_parameters(self) -> int:
        if self._summary is not None:
            return self._summary[1]
        return sum(int(t.n_elements) for t in self.reader.tensors)

    def model_config(self) -> ModelConfig:
        arch = self.architecture

        def key(name: str, default: Any = None) -> Any:
            return self.field(f"{arch}.{name}", default)

        try:
            num_heads = key("attention.head_count")
            num_kv = key("attention.head_count_kv", num_heads)
            hidden = key("embedding_length")
            kwargs: dict[str, Any] = dict(
                architecture=arch,
                vocab_size=key("vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data),
                hidden_size=hidden,
                intermediate_size=key("feed_forward_length"),
                num_hidden_layers=key("block_count"),
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv,
                head_dim=key("attention.key_length") or hidden // num_heads,
                max_position_embeddings=key("context_length", 4096),
                rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
                rope_theta=key("rope.freq_base", 10000.0),
                tie_word_embeddings="output.weight" not in self._tensors,
                qkv_bias="blk.0.attn_q.bias" in self._tensors,
                qk_norm="blk.0.attn_q_norm.weight" in self._tensors,
                bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=[i for i in [self.field("tokenizer.ggml.eos_token_id")] if i is not None],
            )
        except (KeyError, TypeError) as e:
            raise ModelLoadError(f"{self.path}: GGUF metadata incomplete for {arch} ({e})") from e
        q_norm = self._tensors.get("blk.0.attn_q_norm.weight")
        # olmoe: one norm over all heads' q (and k), so its gain is longer than a head.
        kwargs["qk_norm_full"] = q_norm is not None and int(q_norm.n_elements) > kwargs["head_dim"]
        kwargs.update(self._moe_config(arch, kwargs["num_hidden_layers"], kwargs["intermediate_size"]))
        scaling_type = key("rope.scaling.type")
        if scaling_type == "linear":
            kwargs["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        elif scaling_type not in (None, "none"):
            raise UnsupportedError(f"{self.path}: rope scaling {scaling_type!r} is not supported")
        if "rope_freqs.weight" in self._tensors:
            kwargs["rope_freq_factors"] = self._dense("rope_freqs.weight").tolist()
        if key("attention.sliding_window") and arch == "llama":
            kwargs["sliding_window"] = key("attention.sliding_window")
        if arch == "gemma3":
            # llama.cpp's gemma3: every 6th layer global, local layers on rope base 10k.
            window = key("attention.sliding_window")
            n = kwargs["num_hidden_layers"]
            kwargs.update(
                hidden_act="gelu_pytorch_tanh",
                norm_offset=1.0,
                sandwich_norm=True,
                embed_scale=float(hidden) ** 0.5,
                attn_scale=float(kwargs["head_dim"]) ** -0.5,
                rope_local_theta=10000.0,
                sliding_window=window,
                layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)],
                final_logit_softcapping=key("final_logit_softcapping"),
                attn_logit_softcapping=key("attn_logit_softcapping"),
            )
        try:
            return ModelConfig(**kwargs)
        except ValueError as e:
            raise UnsupportedError(f"{self.path}: {e}") from e

    def _moe_config(self, arch: str, num_layers: int, intermediate_size: int) -> dict[str, Any]:
        """MoE fields from llama.cpp's expert metadata; a layer is MoE where it has a router tensor."""

        def key(name: str, default: Any = None) -> Any:
            return self.field(f"{arch}.{name}", default)

        num_experts = key("expert_count") or 0
        if not num_experts:
            return {}
        shared_count = key("expert_shared_count") or 0  # deepseek-style `shared_experts`
        has_shexp = any(name.endswith(".ffn_up_shexp.weight") for name in self._tensors)
        return dict(
            architecture="mixtral" if arch == "llama" else arch,
            num_experts=num_experts,
            num_experts_per_tok=key("expert_used_count") or 0,
            moe_intermediate_size=key("expert_feed_forward_length") or 0,
            moe_layers=[i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" in self._tensors],
            router="sigmoid" if key("expert_gating_func") == 2 else "softmax",  # gguf.ExpertGatingFuncType
            norm_topk_prob=bool(key("expert_weights_norm", arch in _RENORMALISING_ARCHS)),
            n_group=key("expert_group_count") or 1,
            topk_group=key("expert_group_used_count") or 1,
            routed_scaling_factor=float(key("expert_weights_scale") or 1.0),
            shared_expert_intermediate_size=(key("expert_shared_feed_forward_length") or intermediate_size)
            if has_shexp and not shared_count else 0,
            shared_expert_gate=any(name.endswith(".ffn_gate_inp_shexp.weight") for name in self._tensors),
            n_shared_experts=shared_count if has_shexp else 0,
        )

    def iter_tensors(self, config: ModelConfig, keep: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor) for every weight the model uses (those `keep` accepts)."""
        cls = model_class(config.architecture)
        names = _compile_name_map(cls.gguf_names)  # type: ignore[attr-defined]
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into the config's rope_freq_factors
            hf_name = _hf_name(t.name, names)
            if hf_name is None:
                raise UnsupportedError(f"{self.path}: unknown tensor {t.name!r} for architecture {config.architecture}")
            if keep is not None and not keep(hf_name):
                continue  # skipped before it is dequantised
            tensor = self._dense(t.name)
            yield hf_name, cls.adapt_gguf_tensor(hf_name, tensor, config)  # type: ignore[attr-defined]

    def tensor_bits(self, config: ModelConfig) -> dict[str, int]:
        """Hugging Face name -> bits per weight class of its GGUF type: 4 (Q4_*), 8 (Q5+/Q8), 16 (float)."""
        names = _compile_name_map(model_class(config.architecture).gguf_names)  # type: ignore[attr-defined]
        out = {}
        for t in self.reader.tensors:
            hf_name = _hf_name(t.name, names)
            if hf_name is not None:
                out[hf_name] = _BITS.get(GGMLQuantizationType(int(t.tensor_type)).name, 16)
        return out

    def _dense(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        qtype = int(t.tensor_type)
        if qtype not in SUPPORTED_TYPES:
            raise UnsupportedError(
                f"{self.path}: tensor {name} has type {GGMLQuantizationType(qtype).name}, which quadrant does not support"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.asarray(t.data)
        return dequantize(data, qtype, shape)


def _compile_name_map(gguf_names: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), hf) for g, hf in gguf_names.items()]


def _hf_name(gguf_name: str, names: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, hf in names:
        m = pattern.match(gguf_name)
        if m:
            groups = m.groups()
            hf_name = hf.replace("{i}", groups[0]) if len(groups) == 2 else hf
            return f"{hf_name}.{groups[-1]}"
    return None
