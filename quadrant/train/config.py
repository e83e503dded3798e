"""Training configuration: one TOML file (`quadrant train CONFIG`) parsed into dataclasses that check
themselves, so an impossible shape or a missing corpus fails in one line before any work starts.

[model] is a ModelConfig (inline fields, or `config` = a shipped architecture / config.json) plus the
stability options (norm placement, TinyInit); [data] names the prepared corpora; [[stages]] is the
curriculum; [optim], [parallel], [checkpoint] and [train] are what their names say.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from quadrant.config import ModelConfig
from quadrant.errors import QuadrantError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainConfigError(QuadrantError, ValueError):
    """A training configuration that cannot run (the message names the fix)."""


NormPlacement = Literal["pre", "sandwich", "depth_scaled_sandwich"]


@dataclass
class InitConfig:
    """Weight initialisation and norm placement (the seeds' stability techniques)."""

    norm_placement: NormPlacement = "pre"
    post_norm_scale: float = 1.0  # c: depth-scaled sandwich post-norm gains start at c / sqrt(num_layers)
    tiny_init: bool = False  # matrices ~ N(0, sqrt(1 / (2 d L))) instead of N(0, init_std)
    init_std: float = 0.02  # std of matrices without TinyInit
    embed_std: float | None = None  # None: 1.0 with TinyInit (the seed keeps it near 1), else init_std
    seed: int = 0

    def __post_init__(self) -> None:
        if self.norm_placement not in ("pre", "sandwich", "depth_scaled_sandwich"):
            raise TrainConfigError(f"norm_placement must be pre, sandwich or depth_scaled_sandwich, "
                                   f"got {self.norm_placement!r}")
        if self.post_norm_scale <= 0 or self.init_std <= 0 or (self.embed_std is not None and self.embed_std <= 0):
            raise TrainConfigError("post_norm_scale, init_std and embed_std must be positive")

    def matrix_std(self, hidden_size: int, num_layers: int) -> float:
        return math.sqrt(1.0 / (2 * hidden_size * num_layers)) if self.tiny_init else self.init_std

    def embedding_std(self) -> float:
        if self.embed_std is not None:
            return self.embed_std
        return 1.0 if self.tiny_init else self.init_std


@dataclass
class StageConfig:
    """One curriculum stage: how long, on what mixture, at what sequence length and RoPE base."""

    steps: int
    seq_len: int
    mixture: dict[str, float]  # source name -> sampling weight (normalised)
    name: str = ""
    rope_theta: float | None = None  # raise the RoPE base from this stage on (long-context extension)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 2:
            raise TrainConfigError(f"stage {self.name!r}: steps must be >= 1 and seq_len >= 2")
        if not self.mixture or any(w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise TrainConfigError(f"stage {self.name!r}: mixture needs non-negative weights with a positive sum")


@dataclass
class DataConfig:
    sources: dict[str, str]  # name -> folder written by `quadrant data prepare`
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1  # on matrices only, not norms, biases or embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise TrainConfigError(f"optim.schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise TrainConfigError("optim: lr must be positive, min_lr_ratio in [0, 1], warmup_steps >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise TrainConfigError("optim.decay_fraction must be in (0, 1]")


@dataclass
class ParallelConfig:
    """Degrees of each parallelism; their product is the world size torchrun starts (dp fills the rest)."""

    tp: int = 1  # tensor parallel (with sequence parallel norms), through DTensor
    pp: int = 1  # pipeline stages (1F1B), through torch.distributed.pipelining
    dp_shard: int = -1  # FSDP2 degree; -1: whatever world_size / (tp * pp) leaves
    microbatches: int = 0  # pipeline microbatches per step; 0: 2 * pp
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or (self.dp_shard < 1 and self.dp_shard != -1):
            raise TrainConfigError("parallel: tp and pp must be >= 1, dp_shard >= 1 or -1")

    def resolve(self, world_size: int) -> int:
        """The data-parallel degree for `world_size` processes (raises when the degrees don't fit)."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise TrainConfigError(f"world size {world_size} is not divisible by tp * pp = {model_parallel}")
        dp = world_size // model_parallel
        if self.dp_shard != -1 and self.dp_shard != dp:
            raise TrainConfigError(f"dp_shard {self.dp_shard} * tp {self.tp} * pp {self.pp} != world size {world_size}")
        return dp


@dataclass
class CheckpointConfig:
    folder: str = "checkpoints"
    every: int = 0  # save every N steps (0: only at the end)
    save_final: bool = True  # save after the last step (benchmarks turn it off)
    resume: bool = True  # continue from the newest checkpoint in `folder` if one exists
    export: str | None = None  # write a Hugging Face-layout folder here at the end


@dataclass
class MoeTrainConfig:
    bias_update_speed: float = 1e-3  # aux-loss-free balancing: the router bias moves this much per step
    balance_loss_weight: float = 0.0  # DeepSeek-V3's sequence-level balance loss; 0: off


@dataclass
class TrainConfig:
    model: ModelConfig
    tokenizer: str  # a model reference (store name, GGUF or folder) whose tokenizer the corpus used
    init: InitConfig
    data: DataConfig
    stages: list[StageConfig]
    init_from: str | None = None  # a model reference whose weights (and config) training starts from (SFT)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    moe: MoeTrainConfig = field(default_factory=MoeTrainConfig)
    global_batch: int = 8  # sequences per optimizer step, all ranks together
    micro_batch: int = 0  # sequences per forward on one rank; 0: all of the rank's share (no accumulation)
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast, fp32 master weights and optimizer
    device: str = "auto"
    log_every: int = 1
    # A step is flagged when its loss (grad norm) exceeds this factor times its 20-step moving average.
    # Loss is a log-probability: 10% above the recent mean is already a jump; grad norms are noisier.
    loss_spike_factor: float = 1.1
    grad_spike_factor: float = 2.0
    metrics_file: str | None = None  # rank 0 appends one JSON line per step (loss, grad norm, lr, tok/s, MFU)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.micro_batch < 0:
            raise TrainConfigError("global_batch must be >= 1 and micro_batch >= 0")
        if not self.stages:
            raise TrainConfigError("the config needs at least one [[stages]] entry")
        for stage in self.stages:
            unknown = set(stage.mixture) - set(self.data.sources)
            if unknown:
                raise TrainConfigError(f"stage {stage.name!r} mixes unknown sources {sorted(unknown)}; "
                                       f"[data.sources] has {sorted(self.data.sources)}")
            if stage.seq_len > self.model.max_position_embeddings:
                raise TrainConfigError(f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds the model's "
                                       f"max_position_embeddings {self.model.max_position_embeddings}")
        if self.model.num_attention_heads % self.parallel.tp or self.model.num_key_value_heads % self.parallel.tp:
            raise TrainConfigError(f"tp {self.parallel.tp} must divide num_attention_heads "
                                   f"{self.model.num_attention_heads} and num_key_value_heads "
                                   f"{self.model.num_key_value_heads}")
        if self.model.num_hidden_layers < self.parallel.pp:
            raise TrainConfigError(f"pp {self.parallel.pp} stages need at least as many layers, "
                                   f"got {self.model.num_hidden_layers}")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.log_every < 1 or self.checkpoint.every < 0:
            raise TrainConfigError("train.log_every must be >= 1 and checkpoint.every >= 0")
        if self.moe.bias_update_speed < 0 or self.moe.balance_loss_weight < 0:
            raise TrainConfigError("moe.bias_update_speed and moe.balance_loss_weight must be >= 0")
        m = self.model
        if m.num_experts and self.moe.bias_update_speed > 0 and m.router != "sigmoid" and not m.router_bias:
            raise TrainConfigError("aux-loss-free balancing needs a router bias: set router_bias = true in [model] "
                                   "(or bias_update_speed = 0 in [moe])")
        if m.num_experts and self.moe.balance_loss_weight and self.parallel.pp > 1:
            raise TrainConfigError("the sequence balance loss is not supported with pipeline parallel")
        tp = self.parallel.tp
        if tp > 1 and (self.model.intermediate_size % tp or self.model.num_experts):
            raise TrainConfigError(f"tp {tp} must divide intermediate_size {self.model.intermediate_size} "
                                   "(and MoE models take dp_shard, not tp)")
        if 0 < self.parallel.microbatches < self.parallel.pp:
            raise TrainConfigError(f"1F1B needs at least as many microbatches as stages: microbatches "
                                   f"{self.parallel.microbatches} < pp {self.parallel.pp}")
        if self.parallel.pp > 1 and self.model.tie_word_embeddings:
            raise TrainConfigError("tied embeddings cannot be split across pipeline stages; "
                                   "set tie_word_embeddings = false in [model]")
        tied_tiny = self.init.tiny_init and self.model.tie_word_embeddings and self.init.embed_std is None
        if tied_tiny and not self.init_from:
            raise TrainConfigError("tiny_init draws the embedding from N(0, 1), which a tied LM head would turn into "
                                   "logits of scale sqrt(hidden_size): set embed_std or tie_word_embeddings = false")
        if self.checkpoint.export:
            check_exportable(self.model)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step within the stage) of global step `step`."""
        start = 0
        for i, stage in enumerate(self.stages):
            if step < start + stage.steps:
                return i, stage, step - start
            start += stage.steps
        raise IndexError(f"step {step} is past the last stage")


def check_exportable(model: ModelConfig) -> None:
    """Raise unless the model's config.json reads back as the same model (checked before training)."""
    import dataclasses

    try:
        back = ModelConfig.from_hf_config(model.to_hf_config())
    except ValueError as e:
        raise TrainConfigError(f"this model cannot be exported ({e}); remove checkpoint.export") from None
    diff = [f.name for f in dataclasses.fields(model)
            if f.name != "dtype" and getattr(model, f.name) != getattr(back, f.name)]
    if diff:
        raise TrainConfigError(f"this model's exported config.json would not read back ({', '.join(diff)}); "
                               "remove checkpoint.export")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise TrainConfigError(f"[{where}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**table)
    except TypeError as e:
        raise TrainConfigError(f"[{where}]: {e}") from None


def _model_config(table: dict[str, Any], base: Path) -> ModelConfig:
    table = dict(table)
    ref = table.pop("config", None)
    init_from = table.pop("init_from", None)
    if init_from is not None:
        from quadrant.loader.source import open_pulled

        c = open_pulled(init_from).config
        values = {f.name: getattr(c, f.name) for f in fields(ModelConfig)}
        values.update(table)
        table = values
    elif ref is not None:
        from quadrant.loader.source import open_config

        path = Path(ref) if Path(ref).is_absolute() or not (base / ref).exists() else base / ref
        c = open_config(str(path)).config
        values = {f.name: getattr(c, f.name) for f in fields(ModelConfig)}
        values.update(table)
        table = values
    table.setdefault("architecture", "llama")
    try:
        return _build(ModelConfig, table, "model")
    except ValueError as e:
        raise TrainConfigError(f"[model]: {e}") from None


_INIT_KEYS = {f.name for f in fields(InitConfig)}


def parse_config(raw: dict[str, Any], base: Path = Path(".")) -> TrainConfig:
    """A TrainConfig from the parsed TOML tables; relative paths are relative to `base`."""
    raw = dict(raw)
    model_table = dict(raw.pop("model", {}))
    init_table = {k: model_table.pop(k) for k in list(model_table) if k in _INIT_KEYS}
    init_from = model_table.get("init_from")
    tokenizer = model_table.pop("tokenizer", init_from or "smollm2:135m")
    init = _build(InitConfig, init_table, "model")
    model = _model_config(model_table, base)
    if init.norm_placement != "pre":  # the exported config carries it; serving builds sandwich norms from it
        model.sandwich_norm = True
    data_table = dict(raw.pop("data", {}))
    sources = {k: str(base / v) if not Path(v).is_absolute() else v for k, v in data_table.pop("sources", {}).items()}
    if not sources:
        raise TrainConfigError("[data.sources] must name at least one prepared corpus")
    data = _build(DataConfig, {"sources": sources, **data_table}, "data")
    stages = [_build(StageConfig, s, "stages") for s in raw.pop("stages", [])]
    sub = {
        "optim": _build(OptimConfig, raw.pop("optim", {}), "optim"),
        "parallel": _build(ParallelConfig, raw.pop("parallel", {}), "parallel"),
        "moe": _build(MoeTrainConfig, raw.pop("moe", {}), "moe"),
    }
    ckpt = dict(raw.pop("checkpoint", {}))
    for key in ("folder", "export"):
        if ckpt.get(key) and not Path(ckpt[key]).is_absolute():
            ckpt[key] = str(base / ckpt[key])
    sub["checkpoint"] = _build(CheckpointConfig, ckpt, "checkpoint")
    train = dict(raw.pop("train", {}))
    if train.get("metrics_file") and not Path(train["metrics_file"]).is_absolute():
        train["metrics_file"] = str(base / train["metrics_file"])
    if raw:
        raise TrainConfigError(f"unknown tables {sorted(raw)}; known: model, data, stages, optim, parallel, "
                               "checkpoint, moe, train")
    return _build(TrainConfig, {"model": model, "tokenizer": tokenizer, "init_from": init_from, "init": init,
                                "data": data,
                                "stages": stages, **sub, **train}, "train")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML training config; `overrides` maps "table.key" to a value (CLI flags)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such training config")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainConfigError(f"{path}: not valid TOML ({e})") from None
    for dotted, value in (overrides or {}).items():
        *tables, key = dotted.split(".")
        node = raw
        for t in tables:
            node = node.setdefault(t, {})
        node[key] = value
    return parse_config(raw, path.parent)
