"""End-to-end tuning of a 4-bit folder's float parameters against the float model.

GPTQ rounds each projection so that its own outputs on the calibration text move as little as
possible; what it cannot see is how the rounded layers' errors add up at the logits. Here every
4-bit code stays as GPTQ chose it, and the folder's float parameters (each group's scale and min,
and the RMSNorm gains) are tuned by gradient descent so that the quantised model's next-token
distribution on the calibration text matches the float model's (their KL divergence): the
end-to-end step of EfficientQAT (Chen et al., 2024) with norm tweaking (Li et al., 2023). The
format, the bytes and the kernels are unchanged; about one number in 64 of the folder moves.

The text is the shipped calibration chapters, ~27k tokens (`TUNING_TEXTS`); on the 6k of the
GPTQ calibration text alone the tuning fits that text and gains less elsewhere. Figures in
BENCHMARKS.md (SmolLM2-135M, 4-bit groups of 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.linear import Linear
from quadrant.layers.norm import RMSNorm
from quadrant.loader.safetensors import shard_files
from quadrant.loader.weights import load_weights, resolve_name
from quadrant.quant.calibrate import CALIBRATION_TEXT
from quadrant.quant.grids import int8_per_token


TUNING_TEXTS = (CALIBRATION_TEXT, CALIBRATION_TEXT.with_name("calibration_more.txt"))


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 28  # half of TUNING_TEXTS' ~53 windows: the default quantises in under 2 minutes (BENCHMARKS.md)
    lr: float = 6e-4  # Adam, on each group's log-scale and on its min in units of its step
    norm_lr: float = 6e-5  # on the norm gains (absolute: they sit near 1)
    seq_len: int = 512  # tokens per step, one calibration window (fewer where the model's context is shorter)
    # The matmuls' dtype: "auto" is bf16 where the CPU multiplies it natively (AMX, AVX512-BF16:
    # ~1.8 s a step on SmolLM2-135M against ~2.7-3.5 in fp32), fp32 elsewhere. The stored parameters
    # and Adam's state stay fp32 either way.
    dtype: str = "auto"

    @classmethod
    def thorough(cls) -> "TuneConfig":
        """The slower recipe (`quadrant quantize --thorough`): about one pass over TUNING_TEXTS in
        fp32, ~1 point of perplexity better on SmolLM2-135M for ~3x the tuning time."""
        return cls(steps=60, lr=2e-4, norm_lr=2e-5, dtype="float32")

    def compute_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            from quadrant.quant.formats import prefill_dtype

            return prefill_dtype()
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]


@dataclass
class TuneReport:
    steps: int
    tokens: int  # calibration tokens the windows cover
    kl_first: float  # KL (nats per token) of the first step's window, before its update
    kl_last: float  # mean KL over the last pass's windows


class StoredGroups(nn.Module):
    """One stored 4-bit weight [.., N, K] as a function of its trainable float parameters:
    codes * (scale * exp(log_gain)) + (min + shift * scale), per group of inputs."""

    codes: torch.Tensor  # [.., N, G, g], the codes 0-15 held (exactly) in the compute dtype
    scale0: torch.Tensor  # the stored scales [.., N, G]
    min0: torch.Tensor  # the stored mins

    def __init__(self, shard: str | None, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from quadrant.quant.folder import _unpack_nibbles

        codes = _unpack_nibbles(qweight)  # [.., N, K] uint8
        self.shard = shard
        self.register_buffer("codes", codes.reshape(*scales.shape, -1).to(dtype), persistent=False)
        self.register_buffer("scale0", scales.float(), persistent=False)
        self.register_buffer("min0", mins.float(), persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale0))
        self.shift = nn.Parameter(torch.zeros_like(self.scale0))

    def scales(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_gain)

    def mins(self) -> torch.Tensor:
        return self.min0 + self.shift * self.scale0

    def weight(self) -> torch.Tensor:
        """The weight [.., N, K] in the compute dtype (in fp32 exactly the folder's)."""
        return _GridRebuild.apply(self.codes, self.scales(), self.mins()).flatten(-2)


class _GridRebuild(torch.autograd.Function):
    """codes * scales + mins per group, in the codes' dtype, with the gradients of scales and mins
    summed over each group in fp32. Autograd's own version keeps fp32 temporaries of the whole
    weight and a float copy of the codes for the backward."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(codes)
        return codes * scales.to(codes.dtype)[..., None] + mins.to(codes.dtype)[..., None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        (codes,) = ctx.saved_tensors
        grad = grad.to(codes.dtype)
        return None, (grad * codes).sum(-1, dtype=torch.float32), grad.sum(-1, dtype=torch.float32)


class GridWeight(nn.Module):
    """A parametrisation of a model weight (dense, merged or stacked experts) whose parts are
    stored 4-bit weights: the tensor rebuilt from them at every forward. A Linear's weight comes
    in the compute dtype (autocast multiplies it as it is); MoE experts' stacks in the model's own,
    since their kernels check that weights and inputs agree."""

    def __init__(self, module: nn.Module, parts: list[StoredGroups]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.read_shard = getattr(module, "read_shard", None)
        self.autocast_reads = isinstance(module, Linear)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        parts = [p for p in self.parts if isinstance(p, StoredGroups)]
        if len(parts) == 1 and parts[0].shard is None:
            w = parts[0].weight()
        else:
            dtype = parts[0].codes.dtype
            covered = sum(p.codes.numel() for p in parts) == original.numel()  # every row stored 4-bit
            w = original.new_empty(original.shape, dtype=dtype) if covered else original.detach().to(dtype, copy=True)
            for part in parts:
                target = w if part.shard is None else self.read_shard(w, part.shard)  # type: ignore[misc]
                target.copy_(part.weight())  # autograd follows the copy into the view
        return w if self.autocast_reads else w.to(original.dtype)


def tune_folder(folder: Path, teacher: nn.Module, fmt: str, token_ids: list[int],
                config: TuneConfig = TuneConfig(), progress: bool = False) -> TuneReport:
    """Tune the 4-bit folder being written at `folder` (its safetensors only; `teacher` is the float
    model it was quantised from, the same architecture) on `token_ids`, and rewrite its scales,
    mins and norm gains in place."""
    files = {path: load_file(str(path)) for path in shard_files(folder)}
    stored = {name: tensor for tensors in files.values() for name, tensor in tensors.items()}
    dtype = config.compute_dtype()
    student, groups, norms = tunable_student(teacher, stored, fmt, dtype)
    model_config: ModelConfig = teacher.config  # type: ignore[assignment]
    seq_len = min(config.seq_len, model_config.max_position_embeddings)  # a window the model can hold
    windows = [token_ids[i : i + seq_len] for i in range(0, len(token_ids) - seq_len + 1, seq_len)]
    if not windows:
        raise ValueError(f"tuning needs at least {seq_len} tokens, got {len(token_ids)}")
    params = [p for g in groups.values() for p in (g.log_gain, g.shift)]
    optimizer = torch.optim.Adam([{"params": params, "lr": config.lr},
                                  {"params": list(norms.values()), "lr": config.norm_lr}])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / config.steps)))
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="tune 4-bit grids", unit=" steps", disable=not progress)
    for step in bar:
        window = windows[step % len(windows)]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():  # the teacher's, window by window: a vocabulary's worth per token is too much to keep
                target = F.log_softmax(_logits(teacher, window).float(), -1)
            log_probs = F.log_softmax(_logits(student, window).float(), -1)
        loss = F.kl_div(log_probs, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    bar.close()

    with torch.no_grad():
        for name, part in groups.items():
            stem = name.removesuffix(".weight")
            for key, value in ((f"{stem}.scales", part.scales()), (f"{stem}.mins", part.mins())):
                stored[key] = value.to(stored[key].dtype)
        for name, gain in norms.items():
            stored[name] = gain.detach().to(stored[name].dtype)
    for path, tensors in files.items():
        save_file({name: stored[name].contiguous() for name in tensors}, str(path))
    last = losses[-len(windows):] if losses else [float("nan")]
    return TuneReport(config.steps, sum(len(w) for w in windows), losses[0] if losses else float("nan"),
                      sum(last) / len(last))


def tunable_student(teacher: nn.Module, stored: dict[str, torch.Tensor], fmt: str,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, dict[str, StoredGroups], dict[str, nn.Parameter]]:
    """The folder's model (`stored`: its tensors) as a copy of `teacher` whose 4-bit weights are
    functions of their trainable StoredGroups ({folder weight name: groups}), rebuilt in `dtype`,
    and whose norm gains ({folder name: gain}) are trainable; everything else is frozen."""
    from quadrant.quant.folder import iter_dequantized

    packed = getattr(type(teacher), "packed_modules", {})
    student = type(teacher)(teacher.config)  # built anew: a deep copy drops the loaders' parameter hooks
    load_weights(student, iter_dequantized(iter(stored.items()), fmt))
    student.requires_grad_(False)
    groups = _parametrize(student, stored, packed, dtype)
    if fmt == "w4a8":  # the kernels round each token's activations to int8: tune against that too
        for module in student.modules():
            if hasattr(module, "parametrizations"):
                module.register_forward_pre_hook(_int8_tokens)
    return student, groups, _norm_gains(student, stored, packed)


def _int8_tokens(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A forward pre-hook: the input rounded per token to a symmetric int8 grid (amax / 127), with
    a straight-through gradient. (An MoE's experts get their input rounded; the expert-internal
    input of their down projections is not reached, and stays float here.)"""
    x = args[0]
    codes, step = int8_per_token(x.detach())
    return (x + (codes * step - x.detach()), *args[1:])


def _parametrize(student: nn.Module, stored: dict[str, torch.Tensor],
                 packed: dict[str, tuple[str, str | None]], dtype: torch.dtype) -> dict[str, StoredGroups]:
    """Every stored 4-bit weight becomes trainable StoredGroups inside its model tensor."""
    modules = dict(student.named_modules())
    by_target: dict[str, list[StoredGroups]] = {}
    groups: dict[str, StoredGroups] = {}
    for key in stored:
        if not key.endswith(".mins"):  # only the 4-bit (asymmetric) triples; an int8 head stays
            continue
        stem = key.removesuffix(".mins")
        target, shard = resolve_name(f"{stem}.weight", packed)
        part = StoredGroups(shard, stored[f"{stem}.qweight"], stored[f"{stem}.scales"], stored[key], dtype)
        by_target.setdefault(target, []).append(part)
        groups[f"{stem}.weight"] = part
    for target, parts in by_target.items():
        module_name, _, attr = target.rpartition(".")
        module = modules[module_name]
        parametrize.register_parametrization(module, attr, GridWeight(module, parts), unsafe=True)
    return groups


def _norm_gains(student: nn.Module, stored: dict[str, torch.Tensor],
                packed: dict[str, tuple[str, str | None]]) -> dict[str, nn.Parameter]:
    """{folder name: the student's gain} for every RMSNorm the folder stores."""
    targets = {resolve_name(name, packed)[0]: name for name in stored}
    gains = {}
    for module_name, module in student.named_modules():
        name = targets.get(f"{module_name}.weight")
        if isinstance(module, RMSNorm) and name is not None:
            module.weight.requires_grad_(True)
            gains[name] = module.weight
    return gains


def _logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor(ids)
    hidden = model(tokens, torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)]))
    return model.compute_logits(hidden)  # type: ignore[operator]
