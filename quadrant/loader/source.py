"""A model on disk, whatever its format: config, tokenizer, weights and a summary.

`open_model(path)` accepts a .gguf file or a Hugging Face-layout folder; the
store resolves catalogue names to such paths first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quadrant.config import ModelConfig
from quadrant.errors import ModelLoadError, ModelNotFoundError
from quadrant.loader import safetensors as st
from quadrant.loader.gguf import GGUFModelFile
from quadrant.layers.embedding import LMHead, VocabEmbedding
from quadrant.layers.linear import Linear
from quadrant.loader.weights import load_weights, resolve_name
from quadrant.models.registry import model_class
from quadrant.parallel.groups import ParallelState
from quadrant.parallel.tensor_parallel import parallelize
from quadrant.layers.moe import Experts
from quadrant.quant.formats import cpu_plan, get_format, runs_on, single_plan
from quadrant.quant.folder import tensor_format
from quadrant.tokenizer import Tokenizer

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ModelSource:
    path: Path
    config: ModelConfig
    gguf: GGUFModelFile | None = None  # None for a Hugging Face folder
    quantized_format: str | None = None  # a folder written by `quadrant quantize`: its format
    quantized_group: int | None = None  # and, for the 4-bit formats, its preferred group size
    num_kept_layers: int | None = None  # truncated(): only the first N decoder layers are loaded

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float tensor) pairs; quantised folders come back on their stored grid."""
        keep = self._keeps if self.num_kept_layers is not None else None
        if self.gguf is not None:
            return self.gguf.iter_tensors(self.config, keep)
        tensors = st.iter_tensors(self.path)
        if keep is not None:
            tensors = ((name, t) for name, t in tensors if keep(name))
        if self.quantized_format is not None:
            from quadrant.quant.folder import iter_dequantized

            return iter_dequantized(tensors, self.quantized_format)
        return tensors

    def truncated(self, num_layers: int) -> "ModelSource":
        """This model cut to its first `num_layers` decoder layers (embeddings, final norm and LM head
        kept): a draft model for speculative decoding that needs no checkpoint of its own."""
        c = self.config
        if not 1 <= num_layers <= c.num_hidden_layers:
            raise ValueError(f"cannot keep {num_layers} layers of a {c.num_hidden_layers}-layer model")
        config = replace(c, num_hidden_layers=num_layers,
                         layer_types=c.layer_types[:num_layers] if c.layer_types else None,
                         moe_layers=[i for i in c.moe_layers if i < num_layers] if c.moe_layers is not None else None)
        return replace(self, config=config, num_kept_layers=num_layers)

    def _keeps(self, name: str) -> bool:
        """Whether a checkpoint tensor (Hugging Face name) belongs to the kept layers."""
        match = _LAYER_INDEX.search(name)
        return match is None or int(match.group(1)) < (self.num_kept_layers or 0)

    def quantization_label(self) -> str | None:
        """How the checkpoint is already quantised (a GGUF type like 'Q4_1', or a quantize format); None if float."""
        if self.gguf is not None:
            label = self.gguf.quantization()
            return None if label in ("F32", "F16", "BF16") else label
        return self.quantized_format

    def hf_config(self) -> dict[str, Any]:
        """The checkpoint's config.json (or, for GGUF, one written from its metadata)."""
        if self.gguf is not None:
            return self.config.to_hf_config()
        return json.loads((self.path / "config.json").read_text())

    def release(self) -> None:
        """Drop the memory map of a GGUF file once its weights are loaded (metadata stays readable)."""
        if self.gguf is not None:
            self.gguf.release_tensors()

    def has_tokenizer(self) -> bool:
        return self.gguf is not None or (self.path / "tokenizer.json").is_file()

    def tokenizer(self) -> Tokenizer:
        try:
            if self.gguf is not None:
                return Tokenizer.from_gguf_fields(self.gguf.tokenizer_fields())
            return Tokenizer.from_pretrained_dir(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{self.path}: cannot build the tokenizer ({e})") from e

    def load_model(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", weight_format: str = "dense",
        parallel: ParallelState | None = None,
    ) -> nn.Module:
        """Build the model on `device` in `dtype` (this rank's shard of it under `parallel`), fill it one
        tensor at a time, then repack its linears."""
        # Under tensor parallelism, layers split along their inputs are rounded whole, then sliced,
        # then packed on that grid: the shards hold exactly the one-process model's weights.
        own = weight_format == self.quantized_format  # the folder's own grids: kept exactly
        # The 4-bit group the one-process model would use: the folder's, or the format's default.
        quantized = weight_format not in ("auto", "dense")
        group_4bit = self.quantized_group if own or not quantized else getattr(get_format(weight_format),
                                                                             "group_size", None)
        # (CPU formats: the GPU's fp8/w4a8 packing has its own grid, which shards per rank for now.)
        sliced = parallel is not None and parallel.tp_size > 1 and quantized and torch.device(device).type == "cpu"
        grid = self._grid(weight_format, own, group_4bit) if sliced else None
        model = self._build(dtype, device, parallel, grid)
        if weight_format == "dense":
            load_weights(model, self.weights())
            return model.eval()
        # Repack each linear the moment its tensors are in, so the full-precision copy of the
        # model never exists at once (peak memory stays near the packed size).
        bits = self._module_source_bits(model)
        modules = dict(model.named_modules())
        done: set[str] = set()

        def repack(name: str) -> None:
            module = modules.get(name)
            if isinstance(module, Experts) and name not in done and weight_format not in ("auto", "dense"):
                module.repack(get_format(weight_format, group_4bit if own or sliced else None, device,
                                         from_folder=own or sliced))
                done.add(name)
            if isinstance(module, (Linear, LMHead)) and name not in done:
                head = isinstance(module, LMHead)
                source = bits.get("model.embed_tokens" if head and module._tied else name, 16)
                if weight_format == "auto":
                    width = module.hidden_size if isinstance(module, LMHead) else module.in_features
                    module.repack(cpu_plan(source, sensitive=head, in_features=width))
                else:  # an LM head keeps 8 bits under the 4-bit formats, as `quadrant quantize` stores it
                    fmt = tensor_format("lm_head." if head else name, weight_format)
                    rounded = sliced and isinstance(module, Linear) and module.tp_group is not None
                    group = group_4bit if own or rounded else None
                    module.repack(single_plan(fmt, group, device, from_folder=own or rounded))
                done.add(name)

        load_weights(model, self.weights(), on_module_loaded=repack)
        for name in modules:
            repack(name)  # modules without tensors of their own (a tied LM head)
        for module in modules.values():
            if isinstance(module, VocabEmbedding) and weight_format == "auto":
                module.compact(torch.bfloat16)  # lookups only: a few rows per step
        return model.eval()

    def load_dummy_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seed: int = 0, parallel: ParallelState | None = None) -> nn.Module:
        """The architecture with random weights (N(0, 0.02) matrices, unit norms): speed runs on real
        shapes without the checkpoint (`--load-format dummy`)."""
        model = self._build(dtype, device, parallel)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.02, generator=gen)
                elif name.endswith("bias"):
                    param.zero_()
        return model.eval()

    def parameter_count(self) -> int:
        """The parameters of the model this source builds (counted on the meta device: nothing allocated)."""
        return sum(p.numel() for p in self._build(torch.float32, "meta").parameters())

    @staticmethod
    def _grid(weight_format: str, own: bool, group_4bit: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A weight [.., N, K] -> the same weight rounded onto `weight_format`'s grid (as floats)."""
        from quadrant.quant.folder import dequantize_tensor, quantize_tensor

        group = group_4bit or 128

        def round_whole(weight: torch.Tensor) -> torch.Tensor:
            parts = quantize_tensor(weight, weight_format, group, on_grid=own)
            return dequantize_tensor(parts, weight_format).to(weight.dtype)

        return round_whole

    def _build(self, dtype: torch.dtype, device: str | torch.device, parallel: ParallelState | None = None,
               grid: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
        cls = model_class(self.config.architecture)
        with torch.device(device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                if parallel is None or parallel.world_size == 1:
                    return cls(self.config)
                model = cls(self.config.shard(parallel.tp_size))
                parallelize(model, parallel, self.config.vocab_size, grid)
                return model
            finally:
                torch.set_default_dtype(prev)

    def _module_source_bits(self, model: nn.Module) -> dict[str, int]:
        """Module path -> bits per weight of the checkpoint tensors it was loaded from (16 for float)."""
        if self.gguf is None:
            return {}
        packed = getattr(model, "packed_modules", {})
        out: dict[str, int] = {}
        for hf_name, bits in self.gguf.tensor_bits(self.config).items():
            target, _ = resolve_name(hf_name, packed)
            module = target.rsplit(".", 1)[0]
            out[module] = max(out.get(module, 0), bits)
        return out

    def default_weight_format(self, device: str | torch.device) -> str:
        """'auto' (per-phase CPU plan) for quantised GGUF files on CPU; the checkpoint's own precision otherwise."""
        if self.quantized_format is not None:
            # A GPU runs the 8-bit-activation formats its tensor cores can (Triton); it dequantises
            # the others at load.
            return self.quantized_format if runs_on(self.quantized_format, device) else "dense"
        quantized = self.gguf is not None and self.gguf.quantization() not in ("F32", "F16", "BF16")
        return "auto" if quantized and torch.device(device).type == "cpu" else "dense"

    def describe(self) -> dict[str, Any]:
        """What `quadrant show` prints."""
        c = self.config
        info: dict[str, Any] = {
            "path": str(self.path),
            "architecture": c.architecture,
            "parameters": None,
            "quantization": None,
            "context length": c.max_position_embeddings,
            "embedding length": c.hidden_size,
            "layers": c.num_hidden_layers,
            "heads (q / kv)": f"{c.num_attention_heads} / {c.num_key_value_heads}",
            "vocabulary": c.vocab_size,
            "license": None,
            "chat template": None,
        }
        if self.gguf is not None:
            g = self.gguf
            info["parameters"] = g.num_parameters()
            info["quantization"] = g.quantization()
            info["license"] = g.field("general.license")
            info["name"] = g.field("general.name")
            info["chat template"] = g.field("tokenizer.chat_template")
        else:
            from safetensors import safe_open

            total = 0
            for f in st.shard_files(self.path):
                with safe_open(str(f), framework="pt") as h:
                    total += sum(_numel(h.get_slice(k).get_shape()) for k in h.keys())
            info["parameters"] = total
            info["quantization"] = self.quantized_format or c.dtype
            info["size on disk"] = sum(f.stat().st_size for f in st.shard_files(self.path))
            info["license"] = _hf_license(self.path)
            info["chat template"] = self.tokenizer().chat_template if self.has_tokenizer() else None
        return info


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _hf_license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines()[:30]:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip()
    cfg = folder / "config.json"
    try:
        return json.loads(cfg.read_text()).get("license")
    except (OSError, json.JSONDecodeError):
        return None


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def open_config(ref: str) -> ModelSource:
    """A source for `--load-format dummy`: a shipped architecture name (quadrant/model_configs), a
    config.json file, or any model path (its config; the weights are not read)."""
    shipped = SHIPPED_CONFIGS / f"{ref}.json"
    path = shipped if shipped.is_file() else Path(ref).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: cannot read ({e})") from e
        try:
            return ModelSource(path, ModelConfig.from_hf_config(raw))
        except KeyError as e:
            raise ModelLoadError(f"{path}: missing field {e}") from e
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path, st.read_config(path))
    if path.exists():
        return open_model(path)
    raise ModelNotFoundError(
        f"{ref}: not a shipped architecture ({', '.join(shipped_configs())}), config.json or model path"
    )


def _quantized_format(folder: Path) -> tuple[str | None, int | None]:
    """(format, group size) of a folder written by `quadrant quantize`; other quantisation methods are refused."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None, None
    if not qc:
        return None, None
    method = qc.get("quant_method")
    if method != "quadrant":
        raise ModelLoadError(f"{folder}: quantization method {method!r} is not supported (quadrant reads its own "
                             f"`quadrant quantize` folders, float checkpoints and GGUF)")
    return str(qc["format"]), qc.get("group_size")


def open_pulled(ref: str) -> ModelSource:
    """A model by store name (pulled if missing), .gguf file or folder."""
    from quadrant.loader import store

    return open_model(store.resolve(ref, pull_missing=True))


def open_model(path: str | Path) -> ModelSource:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p}: expected a .gguf file or a Hugging Face model folder")
        g = GGUFModelFile(p)
        return ModelSource(p, g.model_config(), g)
    if st.is_hf_folder(p):
        fmt, group = _quantized_format(p)
        return ModelSource(p, st.read_config(p), quantized_format=fmt, quantized_group=group)
    if p.is_dir():
        raise ModelLoadError(f"{p}: a model folder needs config.json, *.safetensors and tokenizer.json")
    raise ModelNotFoundError(f"{p}: no such file or folder")
