"""Training checkpoints with torch.distributed.checkpoint, and export to a Hugging Face-layout folder.

A checkpoint is `FOLDER/step-NNNNNNN/`: DCP's files for the model and optimizer state (each rank
writes its own shards, whatever the parallelism) plus `train_state.json` (step, model config and
the tensor-parallel degree, whose head-interleaved packed layout export undoes). Resuming checks
that the checkpoint was written for the same model config. Export loads a checkpoint into one
unsharded model in one process and writes safetensors under the serving model's names.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from quadrant.config import ModelConfig
from quadrant.errors import QuadrantError
from quadrant.loader.safetensors import write_folder
from quadrant.loader.weights import export_tensors

STATE_FILE = "train_state.json"
# DCP warns that it "assumes the intent" whenever it runs without a process group: here that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_DIR = re.compile(r"step-(\d+)$")


class CheckpointError(QuadrantError, ValueError):
    """A checkpoint that cannot be used with this configuration (nothing was loaded)."""


def step_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}"


def latest(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder` (one whose train_state.json was written last)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _STEP_DIR.search(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.search(p.name).group(1)), default=None)  # type: ignore[union-attr]


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(folder: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         config: ModelConfig, tp: int, extra: dict[str, Any] | None = None) -> Path:
    """Write step `step`'s checkpoint; train_state.json is written last, so a crash leaves no
    checkpoint that looks complete."""
    path = step_dir(folder, step)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if dist.is_initialized():
        dist.barrier()
    if _is_rank0():
        meta = {"step": step, "tp": tp, "model_config": dataclasses.asdict(config), **(extra or {})}
        (path / STATE_FILE).write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a quadrant training checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def check_compatible(state: dict[str, Any], config: ModelConfig, tp: int, where: Path) -> None:
    saved = state["model_config"]
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    # rope_theta and max positions may rise with a long-context stage: not a different model.
    ignore = {"rope_theta", "max_position_embeddings"}
    diff = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in diff[:3])
        raise CheckpointError(f"{where} was written for another model config ({shown}); "
                              f"use its config or a new checkpoint folder")
    if state.get("tp", 1) != tp:
        raise CheckpointError(f"{where} was written with tp={state.get('tp', 1)}; resume with the same tp "
                              f"(or export it and start from the export)")


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: ModelConfig,
         tp: int) -> dict[str, Any]:
    """Restore model and optimizer state in place from a checkpoint; returns its train_state."""
    path = Path(path)
    meta = read_state(path)
    check_compatible(meta, config, tp, path)
    state: dict[str, Any] = {"model": get_model_state_dict(model),
                             "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return meta


def export(path: str | Path, out: str | Path, tokenizer: Any = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write checkpoint `path` as a Hugging Face-layout folder `out` that `quadrant run/serve` load
    (and, for llama-family pre-norm models, transformers). Runs in one process."""
    from quadrant.train.model import TrainingModel, build_model
    from quadrant.train.parallelize import canonical_merged, tp_layout

    path, out = Path(path), Path(out).expanduser()
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new output folder (nothing was written)")
    meta = read_state(path)
    config = ModelConfig(**meta["model_config"])
    causal_lm = build_model(config)
    model = TrainingModel(causal_lm)
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    tp = int(meta.get("tp", 1))
    if tp > 1:
        for name, sizes in tp_layout(model).items():
            state["model"][name] = canonical_merged(state["model"][name], sizes, tp)
            bias = name[: -len("weight")] + "bias"
            if bias in state["model"]:
                state["model"][bias] = canonical_merged(state["model"][bias][:, None], sizes, tp)[:, 0]
    model.load_state_dict(state["model"])
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    packed = getattr(type(causal_lm), "packed_modules", {})
    tensors = {name: t.to(dtype).contiguous() for name, t in export_tensors(model, packed)}

    write_folder(out, hf_config, tokenizer, lambda folder: save_file(tensors, str(folder / "model.safetensors")))
    return out
