"""Fill a model's parameters from (checkpoint name, tensor) pairs.

Names are Hugging Face's; the model class declares its packed projections
(`packed_modules`, which also route per-expert tensors into stacked expert
weights), so this loader has no per-model branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from quadrant.errors import ModelLoadError

# Checkpoint entries that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    on_module_loaded: Callable[[str], None] | None = None,
) -> None:
    """Copy every tensor into its parameter (or packed slice); `on_module_loaded(path)` runs as
    soon as a module has all its tensors, so it can be repacked before the next one loads."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str | None]] = getattr(model, "packed_modules", {})
    expected = _expected_targets(model, params)
    pending: dict[str, int] = {}
    for target, _ in expected:
        module = target.rsplit(".", 1)[0]
        pending[module] = pending.get(module, 0) + 1
    loaded: set[tuple[str, str | None]] = set()
    retired: dict[str, Callable[[str | None], bool]] = {}  # repacked param -> which shards it leaves to others
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard = resolve_name(name, packed)
        param = params.get(target)
        if param is None and target in retired:
            # A repacked module's tensor that another rank keeps (an expert-parallel rank's expert)
            # is skipped; anything else would be a tensor loaded twice.
            if not retired[target](shard):
                raise ModelLoadError(f"checkpoint tensor {name!r} is loaded twice")
            continue
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
        filled: list[str | None] = [shard]
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is not None:
                # A loader may fill more than the shard named (a stacked GGUF tensor: every expert's), or
                # nothing (another expert-parallel rank's expert); a tensor-parallel one takes its slice.
                result = loader(param, tensor, shard)
                filled = filled if result is None else result
            else:
                if param.shape != tensor.shape:
                    raise ModelLoadError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                    )
                param.copy_(tensor)
        for part in filled:
            if (target, part) in loaded or (target, part) not in expected:
                continue
            loaded.add((target, part))
            module = target.rsplit(".", 1)[0]
            pending[module] -= 1
            if pending[module] == 0 and on_module_loaded is not None:
                for done in [n for n in params if n.rsplit(".", 1)[0] == module]:
                    # Let a repacked module's dense tensors go now, not after the load; keep only
                    # which shards it leaves to other ranks (expert parallel).
                    retired[done] = getattr(params.pop(done), "leaves_shard", _leaves_nothing)
                on_module_loaded(module)
    missing = sorted(f"{t}[{s}]" if s else t for t, s in expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")


def _leaves_nothing(shard: str | None) -> bool:
    return False  # a parameter that holds every shard it is sent


def resolve_name(name: str, packed: dict[str, tuple[str, str | None]]) -> tuple[str, str | None]:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 'q').

    A key may span several name parts, "{e}" standing for an expert number that the shard
    carries: 'experts.{e}.gate_proj.weight': ('experts.w13', '{e}.gate') sends
    'mlp.experts.3.gate_proj.weight' to ('mlp.experts.w13', '3.gate'). A shard of None only
    renames. The leftmost match wins; at one position, the longest key.
    """
    parts = name.split(".")
    keys = sorted((key.split(".") for key in packed), key=len, reverse=True)
    for i in range(len(parts)):
        for key in keys:
            window = parts[i : i + len(key)]
            if len(window) < len(key) or any(k != w and not (k == "{e}" and w.isdigit()) for k, w in zip(key, window)):
                continue
            module, shard = packed[".".join(key)]
            if shard is not None and "{e}" in key:
                shard = shard.replace("{e}", window[key.index("{e}")])
            return ".".join(parts[:i] + [module] + parts[i + len(key) :]), shard
    return name, None


def _expected_targets(model: nn.Module, params: dict[str, nn.Parameter]) -> set[tuple[str, str | None]]:
    expected: set[tuple[str, str | None]] = set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full not in params:
                continue
            # A parameter may name its own shards (stacked experts); else the module's packed parts.
            shards = getattr(param, "shard_names", None) or getattr(module, "shard_offsets", None)
            if shards:
                expected.update((full, s) for s in shards)
            else:
                expected.add((full, None))
    return expected


def export_tensors(model: nn.Module, packed: dict[str, tuple[str, str | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters under checkpoint names: the inverse of load_weights. Packed parts
    (qkv, gate_up, stacked experts) come out one tensor each, named by `packed`'s keys."""
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            shards = getattr(param, "shard_names", None) or getattr(module, "shard_offsets", None)
            if not shards:
                yield checkpoint_name(full, None, packed), param.detach()
                continue
            for shard in shards:
                yield checkpoint_name(full, shard, packed), module.read_shard(param.detach(), shard)


def checkpoint_name(target: str, shard: str | None, packed: dict[str, tuple[str, str | None]]) -> str:
    """The checkpoint name whose resolve_name is (target, shard); the map's later (more specific)
    keys are preferred, so a Mixtral expert or router is written as Mixtral names it. A parameter
    no key renames keeps its own name."""
    parts = target.split(".")
    expert = shard.split(".")[0] if shard is not None and "." in shard else ""
    for key, (module, key_shard) in reversed(list(packed.items())):
        wanted = None if key_shard is None else key_shard.replace("{e}", expert)
        if wanted != shard:
            continue
        mod_parts = module.split(".")
        for i in range(len(parts) - len(mod_parts) + 1):
            if parts[i : i + len(mod_parts)] != mod_parts:
                continue
            name = ".".join(parts[:i] + key.replace("{e}", expert).split(".") + parts[i + len(mod_parts) :])
            if resolve_name(name, packed) == (target, shard):
                return name
    if shard is None:
        return target
    raise ValueError(f"no checkpoint name maps to {target}[{shard}]")
