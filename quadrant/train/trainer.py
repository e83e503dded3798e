"""The training loop (`quadrant train`): one process, or one per rank under torchrun.

Trainer composes the pieces: builds the model from models/ and initialises it (train/init.py),
applies parallelism from outside (train/parallelize.py), then per step: this rank's batch
(train/data.py), forward/backward over micro-batches (or a pipeline schedule), clip, AdamW step,
MoE bias update, a log line, and checkpoints. Losses are token means over the whole global batch,
so any split of the batch over ranks, micro-batches or stages gives the same numbers.

FLOPs per token for MFU (PaLM, appendix B): 6 N + 12 L h q S, N the parameters a token passes
through (non-embedding, LM head included, MoE experts counted top_k of num_experts), L layers, h
heads of size q, S the sequence length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quadrant.layers.embedding import VocabEmbedding
from quadrant.layers.moe import Experts, Router
from quadrant.train import checkpoint as ckpt
from quadrant.train.config import TrainConfig, TrainConfigError
from quadrant.train.data import Batch, PackedLoader
from quadrant.train.init import init_weights
from quadrant.train.model import TrainingModel, build_model
from quadrant.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from quadrant.train import parallelize as par

# Dense peaks of known accelerators (no sparsity), FLOP/s: (bf16 tensor cores, fp32 without TF32).
_PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "H800": (989e12, 67e12), "A100": (312e12, 19.5e12),
          "L40S": (362e12, 91.6e12)}


@dataclass
class StepRecord:
    step: int
    stage: str
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    mfu: float
    loss_spike: bool
    grad_spike: bool
    expert_load: float | None = None  # MoE: the busiest expert's share of tokens / the mean share


@dataclass
class _SpikeDetector:
    factor: float
    history: deque = field(default_factory=lambda: deque(maxlen=20))  # the moving window

    def __call__(self, value: float) -> bool:
        """True when `value` exceeds factor x the mean of the previous 20 values (once there are 5)."""
        spike = len(self.history) >= 5 and value > self.factor * (sum(self.history) / len(self.history))
        if math.isfinite(value):
            self.history.append(value)
        return spike or not math.isfinite(value)


def flops_per_token(model_config: Any, seq_len: int, active: float) -> float:
    """6 N + 12 L h q S, with N = active_params(...)."""
    c = model_config
    return 6 * active + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def active_params(model_config: Any, model: nn.Module) -> float:
    """N of the MFU formula: parameters a token's matmuls read (embedding lookups excluded, the LM
    head included, routed experts counted top_k / num_experts)."""
    c = model_config
    dense = experts = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, Experts):
            experts += own
        elif not isinstance(module, VocabEmbedding):
            dense += own
    if c.tie_word_embeddings:
        dense += c.vocab_size * c.hidden_size  # the LM head's matmul reads the embedding
    return dense + (experts * c.num_experts_per_tok / c.num_experts if c.num_experts else 0)


def peak_flops(device: torch.device, dtype: str) -> float:
    """The device's peak FLOP/s for MFU: the datasheet for known GPUs, else a measured fp32 matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in _PEAKS.items():
            if key in name:
                return bf16 if dtype == "bfloat16" else fp32
    a = torch.randn(1024, 1024, device=device)
    (a @ a).sum().item()
    start = time.perf_counter()
    for _ in range(4):
        (a @ a).sum().item()
    return 4 * 2 * 1024**3 / (time.perf_counter() - start)


class Trainer:
    def __init__(self, config: TrainConfig, tokenizer: Any = None, log: Any = print) -> None:
        self.config, self.tokenizer, self.log = config, tokenizer, log
        c = config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(device)
        p = c.parallel
        self.dp = p.resolve(self.world_size)
        self.mesh = None
        if self.world_size > 1:
            if not dist.is_initialized():
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (p.pp, self.dp, p.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.mesh is not None else 0
        if c.checkpoint.export and Path(c.checkpoint.export).exists():
            raise TrainConfigError(f"{c.checkpoint.export} already exists; choose a new checkpoint.export folder")
        self.loader = PackedLoader(c.data.sources, c.data.seed, self.dp_rank, self.dp)
        if self.loader.vocab_size > c.model.vocab_size:
            raise TrainConfigError(f"the corpus uses token ids up to {self.loader.vocab_size - 1}, but the model's "
                                   f"vocab_size is {c.model.vocab_size}; raise vocab_size in [model]")
        if c.global_batch % self.dp:
            raise TrainConfigError(f"global_batch {c.global_batch} is not divisible by the data-parallel size "
                                   f"{self.dp}")
        self.local_batch = c.global_batch // self.dp
        micro = c.micro_batch or self.local_batch
        if self.local_batch % micro:
            raise TrainConfigError(f"micro_batch {micro} does not divide the per-rank batch {self.local_batch}")
        self.accum = self.local_batch // micro
        self._build_model()
        self.optimizer = build_optimizer(self.model, c.optim)
        self.start_step = 0
        if c.checkpoint.resume:
            found = ckpt.latest(c.checkpoint.folder)
            if found is not None:
                meta = ckpt.load(found, self.model, self.optimizer, c.model, p.tp)
                self.start_step = int(meta["step"])
                self.log(f"resumed from {found} at step {self.start_step}")
        self.records: list[StepRecord] = []
        if self.rank == 0:
            params = sum(p.numel() for p in self.model.parameters()) if self.world_size == 1 else None
            self.log(f"training {c.model.architecture}: {c.model.num_hidden_layers} layers, d={c.model.hidden_size}"
                     + (f", {params / 1e6:.1f}M parameters" if params else "")
                     + f", norms {c.init.norm_placement}, {'TinyInit' if c.init.tiny_init else 'N(0, init_std)'}"
                     f" | world {self.world_size} = pp {p.pp} x dp {self.dp} x tp {p.tp}, {self.accum} micro-batch(es)"
                     f" | MFU counts 6 N + 12 L h q S FLOPs per token, N = {self.active_params / 1e6:.1f}M")

    # ------------------------------------------------------------------ setup
    def _build_model(self) -> None:
        c, p = self.config, self.config.parallel
        causal_lm = build_model(c.model)
        if c.init_from:  # fine-tuning: the source's weights, dequantised to fp32
            from quadrant.loader.source import open_pulled
            from quadrant.loader.weights import load_weights

            load_weights(causal_lm, open_pulled(c.init_from).weights())
        else:
            init_weights(causal_lm, c.model, c.init)
        causal_lm.to(self.device)
        full = TrainingModel(causal_lm)
        self.active_params = active_params(c.model, full)  # before any sharding or pipeline split
        self.moe = par.has_moe(full)
        model: Any = full
        self.schedule = None
        if p.pp > 1:
            model = par.PipelineStageModule(full, self.pp_rank, p.pp)
        if p.tp > 1:
            assert self.mesh is not None
            par.apply_tp(model, self.mesh["tp"])  # a pipeline stage: only its own modules
            if p.pp > 1:
                model.sequence_mesh = self.mesh["tp"]
        if p.activation_checkpointing:
            par.apply_activation_checkpointing(model)
        if p.compile:
            par.apply_compile(model)
        bf16 = c.dtype == "bfloat16"
        self.fsdp = self.dp > 1
        if self.fsdp:
            assert self.mesh is not None
            par.apply_fsdp(model, self.mesh["dp"], torch.bfloat16 if bf16 else None)
        self.autocast = bf16 and not self.fsdp
        self.model: Any = model
        if p.pp > 1:
            assert self.mesh is not None
            self._step_tokens = [1.0]
            self.microbatches = p.microbatches or 2 * p.pp
            if self.local_batch % self.microbatches:
                raise TrainConfigError(f"pipeline microbatches {self.microbatches} must divide the per-rank batch "
                                       f"{self.local_batch}")
            self._seq_len = self.config.stages[0].seq_len  # the schedule is rebuilt per sequence length
            self._make_schedule()
        self._balance_terms: list[torch.Tensor] = []
        self._collecting = False
        if self.moe and c.moe.balance_loss_weight:
            for module in model.modules():
                if isinstance(module, Router):
                    module.register_forward_hook(self._balance_hook)

    def _make_schedule(self) -> None:
        """A new 1F1B schedule: its stages learn the activation shapes on their first step, so a
        curriculum stage with another sequence length needs a fresh one."""
        assert self.mesh is not None
        p = self.config.parallel
        micro_shape = (self.local_batch // self.microbatches, self._seq_len)
        self.schedule = par.build_pipeline(self.model, self.pp_rank, p.pp, self.mesh["pp"], self.microbatches,
                                           micro_shape, self.device, par.pipeline_loss(self._step_tokens))

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[StepRecord]:
        c = self.config
        total = c.total_steps
        loss_spikes, grad_spikes = _SpikeDetector(c.loss_spike_factor), _SpikeDetector(c.grad_spike_factor)
        peak = peak_flops(self.device, c.dtype)
        current_stage = -1
        for step in range(self.start_step, total):
            stage_index, stage, stage_step = c.stage_at(step)
            if stage_index != current_stage:
                self._enter_stage(stage)
                current_stage = stage_index
            start = time.perf_counter()
            lr = lr_at(step, total, c.optim)
            set_lr(self.optimizer, lr)
            batch = self.loader.batch(stage_index, stage, stage_step, c.global_batch).to(self.device)
            loss, tokens = self._forward_backward(batch)
            grad_norm = clip_grad_norm([p for p in self.model.parameters()], c.optim.grad_clip,
                                       self.mesh["pp"].get_group() if self.schedule is not None else None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            load = self._update_router_bias() if self.moe else None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            tok_s = c.global_batch * stage.seq_len / seconds
            record = StepRecord(step + 1, stage.name, loss, grad_norm, lr, tok_s,
                                tok_s * self.flops_per_token / (peak * self.world_size),
                                loss_spikes(loss), grad_spikes(grad_norm), load)
            self.records.append(record)
            if self.rank == 0 and (step + 1) % c.log_every == 0:
                self.log(_format(record, total))
            if self.rank == 0 and c.metrics_file:
                with open(c.metrics_file, "a") as f:
                    f.write(json.dumps(dataclasses.asdict(record)) + "\n")
            every = c.checkpoint.every
            if (every and (step + 1) % every == 0) or (step + 1 == total and c.checkpoint.save_final):
                ckpt.save(c.checkpoint.folder, step + 1, self.model, self.optimizer, c.model, c.parallel.tp)
        found = ckpt.latest(c.checkpoint.folder) if c.checkpoint.export and self.rank == 0 else None
        if found is not None:
            ckpt.export(found, c.checkpoint.export, self.tokenizer)  # type: ignore[arg-type]
            self.log(f"exported {found} to {c.checkpoint.export}")
        if dist.is_initialized():
            dist.barrier()
        return self.records

    @torch.no_grad()
    def evaluate(self, corpus_path: str, seq_len: int, num_windows: int, batch: int = 8) -> float:
        """Mean token loss over the first `num_windows` windows of a held-out prepared corpus."""
        if self.schedule is not None:
            raise TrainConfigError("evaluation runs without pipeline parallel; export and evaluate the export")
        from quadrant.train.data import TokenCorpus

        corpus = TokenCorpus(corpus_path)
        windows = [corpus.window(i, seq_len) for i in range(min(num_windows, corpus.num_windows(seq_len)))]
        total = count = 0.0
        for start in range(0, len(windows), batch):
            rows = Batch.from_windows(windows[start : start + batch]).to(self.device)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                loss, n = self.model(rows.input_ids, rows.positions, rows.labels)
            total += float(loss)
            count += float(n)
        return total / max(count, 1.0)

    def _enter_stage(self, stage: Any) -> None:
        """A stage that raises the RoPE base rebuilds the rotary tables (the exported config keeps it)."""
        rebuild = self.schedule is not None and self._seq_len != stage.seq_len
        self._seq_len = stage.seq_len
        if rebuild:
            self._make_schedule()
        c = self.config.model
        self.flops_per_token = flops_per_token(c, stage.seq_len, self.active_params)
        if stage.rope_theta is not None and stage.rope_theta != c.rope_theta:
            c.rope_theta = float(stage.rope_theta)
            self.model.model.build_rotary(c)
            if self.rank == 0:
                self.log(f"stage {stage.name!r}: RoPE base raised to {c.rope_theta:g}")

    def _forward_backward(self, batch: Batch) -> tuple[float, int]:
        """Forward and backward of this rank's batch; returns (global mean loss, global token count)."""
        count = (batch.labels != -100).sum().to(torch.float64)
        if self.mesh is not None and self.dp > 1:
            dist.all_reduce(count, group=self.mesh["dp"].get_group())
        total_tokens = max(1.0, float(count))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.schedule is not None:
            # FSDP averages gradients over dp ranks: divide by tokens / dp to get the global token mean.
            self._step_tokens[0] = total_tokens / self.dp
            losses: list[torch.Tensor] = []
            first, last = self.pp_rank == 0, self.pp_rank == self.config.parallel.pp - 1
            self.model.feed_positions(list(batch.positions.chunk(self.microbatches)))
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                self.schedule.step(*((batch.input_ids,) if first else ()), target=batch.labels if last else None,
                                   losses=losses)
            assert not self.model._positions, "1F1B ran fewer forwards than microbatches"
            if last:
                loss_sum += sum(float(x) for x in losses) * total_tokens / self.dp
        else:
            # FSDP averages gradients over dp ranks: scale by dp so the result is the global token mean.
            scale = self.dp / total_tokens
            for micro in batch.split(self.accum):
                self._balance_terms.clear()
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    self._collecting = True  # not during activation-checkpoint recomputes in backward
                    part, _ = self.model(micro.input_ids, micro.positions, micro.labels)
                    self._collecting = False
                    objective = part * scale
                    if self._balance_terms:  # summed over layers, averaged over micro-batches (and dp ranks)
                        weight = self.config.moe.balance_loss_weight / self.accum
                        objective = objective + weight * torch.stack(self._balance_terms).sum()
                        self._balance_terms.clear()
                objective.backward()
                loss_sum += part.detach().to(torch.float64)
        if self.mesh is not None and self.world_size > 1:
            if self.config.parallel.tp > 1:
                loss_sum /= self.config.parallel.tp  # every tp rank computed the same loss
            # Over all ranks: dp ranks hold different tokens, only the last pp stage holds losses.
            dist.all_reduce(loss_sum)
        return float(loss_sum) / total_tokens, int(total_tokens)

    def _balance_hook(self, router: Router, inputs: tuple, _out: Any) -> None:
        """DeepSeek-V3's sequence-wise balance loss: sum_i f_i P_i per sequence, averaged."""
        if not (self._collecting and torch.is_grad_enabled()):
            return  # evaluation, export and recompute forwards add no loss
        x = inputs[0]
        logits = F.linear(x.float(), router.weight.float())  # [T, E]
        scores = logits.sigmoid() if router.scoring == "sigmoid" else logits.softmax(-1)
        probs = scores / scores.sum(-1, keepdim=True)
        choice = scores if router.e_score_correction_bias is None else scores + router.e_score_correction_bias
        top = choice.topk(router.top_k, dim=-1).indices
        num_experts = logits.shape[-1]
        seq_len = self._seq_len
        hits = torch.zeros_like(probs).scatter_(1, top, 1.0).view(-1, seq_len, num_experts)
        f = hits.mean(1) * num_experts / router.top_k  # [B, E]
        p = probs.view(-1, seq_len, num_experts).mean(1)  # [B, E]
        self._balance_terms.append((f * p).sum(-1).mean())

    @torch.no_grad()
    def _update_router_bias(self) -> float:
        """Aux-loss-free balancing: move each router's bias by a fixed step toward balanced load.
        Returns the worst layer's busiest-expert load relative to the mean."""
        speed = self.config.moe.bias_update_speed
        worst = 0.0
        routers = [m for m in self.model.modules() if isinstance(m, Router)]
        experts = [m for m in self.model.modules() if isinstance(m, Experts)]
        for router, expert in zip(routers, experts):
            load = expert.tokens_per_expert.to(torch.float32)
            if self.mesh is not None and self.dp > 1:
                dist.all_reduce(load, group=self.mesh["dp"].get_group())
            mean = load.mean()
            if mean > 0:
                worst = max(worst, float(load.max() / mean))
            bias = router.e_score_correction_bias
            if bias is not None and speed > 0:
                local = bias.to_local() if hasattr(bias, "to_local") else bias
                local.add_(speed * torch.sign(mean - load).to(local.device, local.dtype))
            expert.reset_stats()
        return worst


def _format(r: StepRecord, total: int) -> str:
    flags = (" LOSS-SPIKE" if r.loss_spike else "") + (" GRAD-SPIKE" if r.grad_spike else "")
    moe = f" | load max/mean {r.expert_load:.2f}" if r.expert_load is not None else ""
    return (f"step {r.step}/{total} [{r.stage}] | loss {r.loss:.4f} | grad norm {r.grad_norm:.3f} | "
            f"lr {r.lr:.2e} | {r.tokens_per_s:,.0f} tok/s | MFU {100 * r.mfu:.1f}%{moe}{flags}")
