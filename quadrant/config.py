"""Configuration dataclasses.

ModelConfig describes an architecture in one vocabulary whatever the source
(a Hugging Face config.json here, GGUF metadata in loader/gguf.py). Each config
checks itself in __post_init__ and raises ValueError naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from quadrant.quant.registry import format_spec

# Hugging Face `model_type` -> quadrant architecture family key (models/registry.py).
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "dots1": "dots1",
}

@dataclass
class ModelConfig:
    architecture: str  # family key: llama | qwen2 | qwen3 | gemma3 | mixtral | qwen2moe | qwen3moe | olmoe | dots1
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
    qk_norm_full: bool = False  # the q/k norms span all heads' q (k) projection, not one head (olmoe)
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"
    norm_offset: float = 0.0  # RMSNorm gain is (offset + w): gemma stores w around 0, so offset 1
    sandwich_norm: bool = False  # extra post-attention / post-FFN norms before the residual add (gemma3)
    embed_scale: float | None = None  # multiply token embeddings (gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None  # window of sliding_attention layers (keys with q - k < window)
    layer_types: list[str] | None = None  # per layer; None: all full_attention unless sliding_window set
    # Mixture of experts (layers/moe.py): in a MoE layer each token runs the top num_experts_per_tok
    # of num_experts gated MLPs, weighted by the router, plus any shared experts every token runs.
    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model
    num_experts_per_tok: int = 0  # k of the router's top-k
    moe_intermediate_size: int = 0  # one routed expert's MLP width; 0: intermediate_size (mixtral, olmoe)
    moe_layers: list[int] | None = None  # the MoE layers, the rest dense (intermediate_size); None: all
    router: Literal["softmax", "sigmoid"] = "softmax"  # scores; sigmoid (deepseek-v3, dots1) + e_score_correction_bias
    router_bias: bool = False  # a selection-only bias on every router (sigmoid routers always have it): aux-free balancing
    norm_topk_prob: bool = False  # rescale the k chosen weights to sum to 1 (mixtral, qwen3-moe)
    n_group: int = 1  # experts in n_group equal groups; top-k only within the topk_group best (deepseek-v3)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed weights, after renormalising (deepseek-v3)
    shared_expert_intermediate_size: int = 0  # qwen2-moe's `shared_expert` MLP width; 0: none
    shared_expert_gate: bool = False  # qwen2-moe: the shared expert's output times sigmoid(x . w)
    n_shared_experts: int = 0  # deepseek's `shared_experts`: one MLP of n * moe_intermediate_size; 0: none
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
        self._check_moe()

    def _check_moe(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: dense), got {self.num_experts}")
        if not self.num_experts:
            self.moe_layers = []
            return
        num_experts, top_k = self.num_experts, self.num_experts_per_tok
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts ({num_experts}), got {top_k}: "
                "lower num_experts_per_tok or raise num_experts"
            )
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers))
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(f"moe_layers {bad_layers} are not layers of a {self.num_hidden_layers}-layer model")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router must be softmax or sigmoid, got {self.router!r}")
        if self.n_group < 1 or num_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} must divide num_experts {num_experts}; use 1 for no groups")
        if self.n_group > 1:
            per_group = num_experts // self.n_group
            if per_group < 2:
                raise ValueError(f"grouped top-k ranks groups by their two best experts: n_group {self.n_group} "
                                 f"leaves {per_group} per group; lower n_group")
            if not 1 <= self.topk_group <= self.n_group or self.topk_group * per_group < top_k:
                raise ValueError(
                    f"topk_group must be in [1, n_group {self.n_group}] and its groups must hold "
                    f"num_experts_per_tok {top_k} experts, got topk_group {self.topk_group}"
                )
        if self.shared_expert_intermediate_size and self.n_shared_experts:
            raise ValueError("set shared_expert_intermediate_size (qwen2-moe) or n_shared_experts (deepseek), not both")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate needs a shared expert: set shared_expert_intermediate_size")

    def to_hf_config(self) -> dict[str, Any]:
        return to_hf_config(self)

    def shard(self, tp: int) -> "ModelConfig":
        """The part of the architecture one of `tp` tensor-parallel ranks builds: its query heads, its KV
        heads (one, replicated, when there are fewer KV heads than ranks) and its slice of every MLP
        width. Hidden size, vocabulary and experts stay whole (the embedding and the experts shard
        themselves). Raises ValueError naming what `tp` fails to divide."""
        if tp == 1:
            return self
        self.check_tensor_parallel(tp)
        kv = self.num_key_value_heads
        return replace(
            self,
            num_attention_heads=self.num_attention_heads // tp,
            num_key_value_heads=kv // tp if kv >= tp else 1,
            intermediate_size=self.intermediate_size // tp,
            moe_intermediate_size=self.moe_intermediate_size // tp,
            shared_expert_intermediate_size=self.shared_expert_intermediate_size // tp,
        )

    def check_tensor_parallel(self, tp: int) -> None:
        if tp == 1:
            return
        widths = {"attention heads": self.num_attention_heads, "intermediate size": self.intermediate_size}
        if self.num_experts:
            widths["expert intermediate size"] = self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            widths["shared expert intermediate size"] = self.shared_expert_intermediate_size
        for what, n in widths.items():
            if n % tp:
                raise ValueError(f"--tp {tp} must divide the model's {what} ({n})")
        kv = self.num_key_value_heads
        if kv % tp and tp % kv:
            raise ValueError(f"--tp {tp} must divide the model's {kv} KV heads or be a multiple of them")
        if self.qk_norm_full:
            raise ValueError(f"{self.architecture}: its q/k norms span all heads, which tensor parallelism "
                             f"does not shard yet; use --tp 1 (--ep works)")

    def is_moe_layer(self, layer: int) -> bool:
        return layer in (self.moe_layers or ())

    def layer_sliding_window(self, layer: int) -> int | None:
        assert self.layer_types is not None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Map a Hugging Face config.json (transformers 4.x or 5.x layout) to a ModelConfig."""
        model_type = cfg.get("model_type", "")
        if model_type.startswith("quadrant_"):
            # Trained here with options its Hugging Face family lacks (sandwich norms, q/k norms on a
            # llama, a router bias...): the base family, then the options the config spells out.
            base = cls.from_hf_config({**cfg, "model_type": model_type.removeprefix("quadrant_")})
            for key in _QUADRANT_OPTIONS:
                if key in cfg:
                    setattr(base, key, cfg[key])
            return base
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
            qkv_bias=arch == "qwen2" or (arch == "qwen2moe" and bool(cfg.get("qkv_bias", True))),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "gemma3", "qwen3moe", "olmoe", "dots1"),
            qk_norm_full=arch == "olmoe",
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
            use_window = (arch in ("llama", "mixtral") or cfg.get("use_sliding_window", False)
                          or (arch == "dots1" and bool(cfg.get("layer_types"))))
            if window and use_window:
                kwargs["sliding_window"] = window
                if cfg.get("layer_types"):
                    kwargs["layer_types"] = cfg["layer_types"]
            elif cfg.get("layer_types") and "sliding_attention" not in cfg["layer_types"]:
                kwargs["layer_types"] = cfg["layer_types"]
        if arch in ("mixtral", "qwen2moe", "qwen3moe", "olmoe", "dots1"):
            kwargs.update(_hf_moe(cfg, arch))
        if cfg.get("sandwich_norm"):
            kwargs["sandwich_norm"] = True
        return cls(**kwargs)


_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def to_hf_config(c: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for a llama-family or Mixtral/Qwen3-MoE ModelConfig (models converted
    from GGUF, quantised or trained here are written out as HF folders); from_hf_config reads it back
    unchanged. A model with sandwich norms (trained here) gets model_type "quadrant_<family>", which
    transformers refuses rather than silently dropping the extra norms."""
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
                  "qwen3moe": "qwen3_moe"}.get(c.architecture)
    if model_type is None:
        raise ValueError(f"writing a config.json for {c.architecture!r} models is not supported; "
                         f"give the Hugging Face folder instead of the GGUF file")
    if c.rope_freq_factors is not None:
        raise ValueError("GGUF rope frequency factors have no config.json form; give the Hugging Face folder")
    cfg: dict[str, Any] = {
        "architectures": [_HF_CLASSES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "hidden_act": c.hidden_act,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else c.eos_token_ids or None,
        "torch_dtype": c.dtype,
    }
    if c.sliding_window is not None:
        cfg["sliding_window"] = c.sliding_window
    if c.num_experts:
        if c.router != "softmax" or c.n_group > 1 or c.shared_expert_intermediate_size or c.n_shared_experts \
                or c.moe_layers != list(range(c.num_hidden_layers)):
            raise ValueError("writing a config.json is supported for Mixtral/Qwen3-MoE layouts only")
        cfg.update(num_local_experts=c.num_experts, num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                   moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                   router_aux_loss_coef=0.0, output_router_logits=False)
    # What the family's model type would read back differently is spelled out, under quadrant_<family>.
    back = ModelConfig.from_hf_config(cfg)
    options = {k: getattr(c, k) for k in _QUADRANT_OPTIONS if getattr(c, k) != getattr(back, k)}
    if options:
        cfg.update(model_type=f"quadrant_{model_type}", **options)
    return cfg


# Options a Hugging Face family fixes by its model type; a config that differs is written as
# "quadrant_<family>" with them spelled out (transformers refuses it instead of misreading it).
_QUADRANT_OPTIONS = ("sandwich_norm", "qk_norm", "qkv_bias", "norm_topk_prob", "router_bias")


def _hf_moe(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The MoE fields of a config.json. Sparse layers: qwen's mlp_only_layers and decoder_sparse_step,
    deepseek's first_k_dense_replace, whichever the config has; mixtral and olmoe have only MoE layers."""
    if cfg.get("clip_qkv") is not None:
        raise ValueError("clip_qkv (olmoe) is not supported")
    mlp_only = set(cfg.get("mlp_only_layers") or ())
    step = cfg.get("decoder_sparse_step") or 1
    first_dense = cfg.get("first_k_dense_replace") or 0
    shared_size = cfg.get("shared_expert_intermediate_size") or 0
    return dict(
        num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
        moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
        moe_layers=[i for i in range(cfg["num_hidden_layers"])
                    if i >= first_dense and i not in mlp_only and (i + 1) % step == 0],
        router="sigmoid" if arch == "dots1" else "softmax",
        router_bias=bool(cfg.get("router_bias", False)),
        norm_topk_prob=arch == "mixtral" or bool(cfg.get("norm_topk_prob", False)),  # mixtral always renormalises
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        shared_expert_intermediate_size=shared_size,
        shared_expert_gate=arch == "qwen2moe" and bool(shared_size),
        n_shared_experts=cfg.get("n_shared_experts") or 0,
    )


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
class ParallelConfig:
    """How many processes run one engine, and how they find each other.

    tp x ep worker processes (torch.distributed; gloo on CPU, NCCL on CUDA): attention and dense
    MLPs are split over `tensor_parallel_size` ranks, MoE experts over `expert_parallel_size`
    ranks (each expert's width also split over the tensor-parallel ranks). With several machines,
    each runs `nprocs // nnodes` workers and joins the rendezvous at master_addr:master_port.
    """

    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port (one machine only)
    # Expert-parallel load balancing: extra expert slots (copies of hot experts) over the group, and
    # engine steps between rebalances that move experts by the measured load (0: never).
    num_redundant_experts: int = 0
    eplb_interval: int = 0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "expert_parallel_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ValueError(f"{self.world_size} workers (tp x ep) do not split evenly over {self.nnodes} nodes")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need an agreed --master-port")
        if self.num_redundant_experts < 0 or self.eplb_interval < 0:
            raise ValueError("num_redundant_experts and eplb_interval must be >= 0")
        if (self.num_redundant_experts or self.eplb_interval) and self.expert_parallel_size == 1:
            raise ValueError("expert load balancing (redundant experts, --eplb-interval) needs --ep > 1")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master port must be in [0, 65536), got {self.master_port}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.expert_parallel_size

    @property
    def nprocs_per_node(self) -> int:
        return self.world_size // self.nnodes

    def check_model(self, model: ModelConfig) -> None:
        """One clear error, before any process starts, when the model cannot be split this way."""
        model.check_tensor_parallel(self.tensor_parallel_size)
        ep = self.expert_parallel_size
        if ep > 1:
            if not model.num_experts:
                raise ValueError(f"--ep {ep}: {model.architecture} is a dense model; expert parallelism needs experts")
            slots = model.num_experts + self.num_redundant_experts
            if self.num_redundant_experts > model.num_experts * (ep - 1):
                raise ValueError(f"at most {model.num_experts * (ep - 1)} redundant experts: one copy of each "
                                 f"expert per rank")
            if slots % ep:
                raise ValueError(f"--ep {ep} must divide the model's {model.num_experts} experts "
                                 f"(+ {self.num_redundant_experts} redundant)")


@dataclass
class KVTransferConfig:
    """Prefill/decode disaggregation: which side of the KV transfer this engine is (quadrant/disagg/).

    prefill: runs prompts for a remote decode engine, keeps each finished prompt's KV blocks under a
    lease and serves them from a KV server on kv_host:kv_port. decode: pulls a request's prompt KV
    from the prefill engine named in the request, then decodes. both: no transfer (colocated).
    """

    role: Literal["prefill", "decode", "both"] = "both"
    kv_host: str = "127.0.0.1"  # prefill: address the KV server binds and advertises
    kv_port: int = 0  # prefill: 0 picks a free port
    lease_seconds: float = 60.0  # prefill: a finished prompt's blocks wait this long for the decode side
    num_streams: int = 2  # decode: parallel connections per transfer (each pulls a share of the layers)
    load_failure_policy: Literal["recompute", "fail"] = "recompute"  # decode: a failed pull recomputes or errors
    transfer_timeout: float = 30.0  # decode: seconds each request to a KV server (hello, pull, done) may take
    # The data plane, on both sides: zmq frames gathered from the cache, or Mooncake Transfer Engine's
    # one-sided reads of the registered caches (disagg/mooncake.py; optional, TCP here, RDMA where built).
    kv_transport: Literal["zmq", "mooncake"] = "zmq"

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, got {self.role!r}")
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(f"kv load failure policy must be recompute or fail, got {self.load_failure_policy!r}")
        if self.kv_transport not in ("zmq", "mooncake"):
            raise ValueError(f"kv transport must be zmq or mooncake, got {self.kv_transport!r}")
        if not 0 <= self.kv_port < 65536:
            raise ValueError(f"kv port must be in [0, 65536), got {self.kv_port}")
        if self.num_streams < 1 or self.lease_seconds <= 0 or self.transfer_timeout <= 0:
            raise ValueError("num_streams, lease_seconds and transfer_timeout must be positive")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (engine/spec/): a cheap proposer drafts up to `num_speculative_tokens`
    tokens per decoding request; one target forward verifies them all (lossless: greedy exact,
    rejection sampling otherwise).

    ngram: prompt lookup (the longest n-gram of `prompt_lookup_min..max` tokens ending the sequence,
    found earlier in it, proposes what followed). draft: a smaller model sharing the target's tokenizer
    (`model`; default the target itself), optionally cut to its first `draft_layers` layers. eagle: a
    one-layer head over the target's hidden states (`model`: its folder, from `quadrant train --eagle`).
    Each request drafts as many tokens as pay for themselves given its measured acceptance and
    `draft_cost`, the cost of one more token in a verifying row relative to a one-token step (None:
    the measured times of the compiled CPU decode graphs, which verification steps run through too,
    else 0.25 on CPU and 0.05 on GPU), and backs off while none do (engine/spec/policy.py); no step
    speculates when more than `max_batch_size` requests decode together.
    """

    method: Literal["none", "ngram", "draft", "eagle"] = "none"
    num_speculative_tokens: int = 4
    model: str | None = None  # draft: the draft model (catalogue name, .gguf or folder); None: the target
    draft_layers: int | None = None  # draft: keep only the first N layers of the draft model
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    draft_cost: float | None = None
    max_batch_size: int = 32
    # Token trees (1: chains). ngram: distinct continuations a tree may hold; eagle: the head's top tokens
    # taken at each node it expands, and the nodes it expands at each depth (EAGLE-2).
    tree_branches: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("none", "ngram", "draft", "eagle"):
            raise ValueError(f"speculative method must be ngram, draft or eagle, got {self.method!r}")
        if self.method == "eagle" and self.model is None:
            raise ValueError("--speculative-method eagle needs --speculative-model: a head folder from "
                             "`quadrant train --eagle MODEL`")
        if not 1 <= self.num_speculative_tokens <= 15:
            raise ValueError(f"num_speculative_tokens must be in [1, 15], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt lookup n-gram sizes need 1 <= min <= max")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise ValueError(f"draft_layers must be >= 1, got {self.draft_layers}")
        if self.model is not None and self.method not in ("draft", "eagle"):
            raise ValueError("a speculative model needs --speculative-method draft or eagle")
        if self.draft_layers is not None and self.method != "draft":
            raise ValueError("draft layers need --speculative-method draft")
        if (self.draft_cost is not None and not 0.0 <= self.draft_cost <= 1.0) or self.max_batch_size < 1:
            raise ValueError("draft_cost must be in [0, 1] and max_batch_size >= 1")
        if not 1 <= self.tree_branches <= 8:
            raise ValueError(f"speculative tree branches must be in [1, 8], got {self.tree_branches}")
        if self.tree_branches > 1 and self.method not in ("ngram", "eagle"):
            raise ValueError("token trees (--speculative-tree-branches > 1) are drafted by --speculative-method "
                             "ngram or eagle; draft models draft chains")

    def resolved_draft_cost(self, device: str) -> float:
        if self.draft_cost is not None:
            return self.draft_cost
        return 0.05 if device.startswith("cuda") else 0.25

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class EngineConfig:
    model: str  # catalogue name, .gguf file or Hugging Face folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # auto: for quantised GGUF on CPU, compact weights for decode-sized batches and bf16 for prefill
    # (quant/formats.cpu_plan); the checkpoint's own precision otherwise. Or one format for all.
    weight_format: str = "auto"  # auto, or a format of quant/registry.py
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # auto: triton on CUDA, torch elsewhere. triton on CPU runs the kernels under TRITON_INTERPRET=1 (tests).
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    load_format: Literal["auto", "dummy"] = "auto"  # dummy: random weights of the config's shape (benchmarks)
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (CUDA only)
    cpu_compile: bool = True  # CPU: decode steps through torch.compile'd graphs, compiled in the background
    # ... every graph compiled before the engine serves; else batch size 1 in the background and the
    # others when first needed (engine/cpu_compiled.py says why a server compiles first)
    cpu_compile_at_start: bool = False
    # Overlapped scheduling: step N+1 scheduled, and step N-1's outputs processed, while step N runs.
    # Needs a one-process engine without speculation or a KV connector. None: $QUADRANT_ASYNC_SCHEDULING (off).
    async_scheduling: bool | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.kv_transfer.role != "both" and self.kv_transfer.kv_transport == "mooncake" \
                and self.parallel.world_size > 1:
            raise ValueError("--kv-transport mooncake reads KV tensors in place, and --tp/--ep worker processes "
                             "keep theirs to themselves: use --kv-transport zmq with them")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weight_format != "auto":
            spec = format_spec(self.weight_format)  # ValueError naming the formats
        if self.weight_format != "auto" and not spec.gpu and not self.device.startswith("cpu"):
            raise ValueError(f"weight format {self.weight_format} runs on the CPU only so far; on {self.device} "
                             f"use w8a8, w4a8 or dense (a quantised folder is then dequantised at load)")
        if self.parallel.world_size > 1 and ":" in self.device:
            raise ValueError(f"with --tp/--ep the workers take cuda:0, cuda:1, ... by local rank, not {self.device}; "
                             "choose the GPUs with CUDA_VISIBLE_DEVICES")
        if self.parallel.eplb_interval and self.weight_format not in ("auto", "dense"):
            raise ValueError("--eplb-interval moves float expert weights between ranks: use --weight-format dense")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load format must be auto or dummy, got {self.load_format!r}")
        if self.speculative.tree_branches > 1 and self.kv_transfer.role != "both":
            raise ValueError("token trees do not combine with --role prefill/decode yet: a verified tree's KV moves "
                             "wait for the next step, and a pulled prompt may land in the blocks they target first")
        if self.speculative.tree_branches > 1 and self.cache.quantized:
            raise ValueError("token trees move accepted K/V between slots, which 8-bit caches' shared scales do not "
                             "allow: use --kv-cache-dtype auto or --speculative-tree-branches 1")

    @property
    def resolved_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device.startswith("cuda") else "torch"
