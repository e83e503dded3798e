"""Configuration dataclasses.

ModelConfig describes an architecture in one vocabulary whatever the source
(a Hugging Face config.json here, GGUF metadata in loader/gguf.py). Each config
checks itself in __post_init__ and raises ValueError naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Hugging Face `model_type` -> quadrant architecture family key (models/registry.py).
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

@dataclass
class ModelConfig:
    architecture: str  # family key: llama | qwen2 | qwen3 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", ...}; applies to full-attention layers
    rope_freq_factors: list[float] | None = None  # per-frequency divisors (GGUF rope_freqs tensor)
    rope_local_theta: float | None = None  # rope base of sliding-window layers (gemma3); None: rope_theta
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (llama's attention_bias)
    qkv_bias: bool = False  # bias on q/k/v only (qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (qwen3, gemma3)
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"
    norm_offset: float = 0.0  # RMSNorm gain is (offset + w): gemma stores w around 0, so offset 1
    sandwich_norm: bool = False  # extra post-attention / post-FFN norms before the residual add (gemma3)
    embed_scale: float | None = None  # multiply token embeddings (gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None  # window of sliding_attention layers (keys with q - k < window)
    layer_types: list[str] | None = None  # per layer; None: all full_attention unless sliding_window set
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "float32"  # dtype the checkpoint stores its dense weights in

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ValueError(f"unsupported layer types {sorted(bad)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window size")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")

    def layer_sliding_window(self, layer: int) -> int | None:
        assert self.layer_types is not None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Map a Hugging Face config.json (transformers 4.x or 5.x layout) to a ModelConfig."""
        model_type = cfg.get("model_type", "")
        if model_type == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        arch = HF_MODEL_TYPES.get(model_type)
        if arch is None:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {sorted(HF_MODEL_TYPES)}"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        kwargs: dict[str, Any] = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=cfg.get("tie_word_embeddings", arch == "gemma3"),
            attention_bias=bool(cfg.get("attention_bias", False)) and arch != "qwen2",
            qkv_bias=arch == "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "gemma3"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=_hf_dtype(cfg),
        )
        if kwargs["hidden_act"] not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"activation {kwargs['hidden_act']!r} is not supported")
        rope_params = cfg.get("rope_parameters")
        if arch == "gemma3":
            full, local = _gemma3_rope(cfg, rope_params)
            kwargs.update(
                rope_theta=full.get("rope_theta", 1_000_000.0),
                rope_scaling=_scaling_only(full),
                rope_local_theta=local.get("rope_theta", 10_000.0),
                norm_offset=1.0,
                sandwich_norm=True,
                embed_scale=float(cfg["hidden_size"]) ** 0.5,
                attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
                final_logit_softcapping=cfg.get("final_logit_softcapping"),
                sliding_window=cfg.get("sliding_window"),
                layer_types=cfg.get("layer_types")
                or _gemma3_layer_types(cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)),
            )
        else:
            params = rope_params if isinstance(rope_params, dict) else {}
            kwargs["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
            kwargs["rope_scaling"] = _scaling_only(params) or _scaling_only(cfg.get("rope_scaling") or {})
            window = cfg.get("sliding_window")
            use_window = arch == "llama" or cfg.get("use_sliding_window", False)
            if window and use_window:
                kwargs["sliding_window"] = window
                if cfg.get("layer_types"):
                    kwargs["layer_types"] = cfg["layer_types"]
            elif cfg.get("layer_types") and "sliding_attention" not in cfg["layer_types"]:
                kwargs["layer_types"] = cfg["layer_types"]
        return cls(**kwargs)


def _hf_dtype(cfg: dict[str, Any]) -> str:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def _scaling_only(params: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling part of a rope dict; None for plain RoPE."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return scaling


def _gemma3_rope(cfg: dict[str, Any], rope_params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(rope_params, dict) and "full_attention" in rope_params:
        return dict(rope_params["full_attention"]), dict(rope_params.get("sliding_attention") or {})
    full = dict(cfg.get("rope_scaling") or {})
    full["rope_theta"] = cfg.get("rope_theta", 1_000_000.0)
    return full, {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}


def _gemma3_layer_types(num_layers: int, pattern: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # fixed pool size (tests); overrides the two below
    kv_cache_memory: int | None = None  # bytes for K and V of all layers
    memory_fraction: float | None = None  # or: this share of the memory free after loading and a warm-up pass
    # With none of the three: room for one sequence of the model's full context.
    # auto: the activation dtype. fp8 (e4m3, GPU) and int8 (CPU) store 8-bit codes with one fp32
    # scale per quant_group tokens per sequence per KV head, quantised as the tokens are written.
    cache_dtype: Literal["auto", "fp8", "int8"] = "auto"
    quant_group: int = 16  # N of the 8-bit cache: tokens per scale; a power of two dividing block_size

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 0.95:
            raise ValueError("memory_fraction must be in (0, 0.95]")
        if self.cache_dtype not in ("auto", "fp8", "int8"):
            raise ValueError(f"kv cache dtype must be auto, fp8 or int8, got {self.cache_dtype!r}")
        group = self.quant_group
        if self.quantized and (group < 1 or group & (group - 1) or group > self.block_size):
            raise ValueError(
                f"kv quant group must be a power of two no larger than the block size {self.block_size}, got {group}"
            )

    @property
    def quantized(self) -> bool:
        return self.cache_dtype != "auto"

    def torch_dtype(self, activation_dtype: torch.dtype) -> torch.dtype:
        """Element type of the K/V tensors."""
        return {"auto": activation_dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[self.cache_dtype]

    def bytes_per_block(self, model: ModelConfig, dtype: torch.dtype) -> int:
        """K and V of one block over all layers, scales included; `dtype` is the activation dtype."""
        per_token = model.head_dim * torch.empty((), dtype=self.torch_dtype(dtype)).element_size()
        scales = 4 * self.block_size // self.quant_group if self.quantized else 0
        return 2 * model.num_hidden_layers * model.num_key_value_heads * (self.block_size * per_token + scales)

    def blocks_for(self, model: ModelConfig, dtype: torch.dtype, free_bytes: int | None = None) -> int:
        """Pool size from num_blocks, kv_cache_memory, memory_fraction x free_bytes, or one full context."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_memory is not None:
            budget = self.kv_cache_memory
        elif self.memory_fraction is not None:
            assert free_bytes is not None, "memory_fraction needs the free memory measured"
            budget = int(self.memory_fraction * free_bytes)
        else:
            return -(-model.max_position_embeddings // self.block_size)
        blocks = budget // self.bytes_per_block(model, dtype)
        if blocks < 1:
            raise ValueError(f"a KV cache budget of {budget} bytes holds no block of {self.block_size} tokens")
        return blocks


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens in one forward pass (prefill chunk budget)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


@dataclass
class EngineConfig:
    model: str  # catalogue name, .gguf file or Hugging Face folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # auto: for quantised GGUF on CPU, compact weights for decode-sized batches and bf16 for prefill
    # (quant/formats.cpu_plan); the checkpoint's own precision otherwise. Or one format for all.
    weight_format: Literal["auto", "dense", "int8", "w4a16", "w8a16"] = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # auto: triton on CUDA, torch elsewhere. triton on CPU runs the kernels under TRITON_INTERPRET=1 (tests).
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    load_format: Literal["auto", "dummy"] = "auto"  # dummy: random weights of the config's shape (benchmarks)
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (CUDA only)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weight_format not in ("auto", "dense", "int8", "w4a16", "w8a16"):
            raise ValueError(f"weight_format must be auto, dense, int8, w4a16 or w8a16, got {self.weight_format!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load format must be auto or dummy, got {self.load_format!r}")

    @property
    def resolved_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device.startswith("cuda") else "torch"
