"""GPTQ for the quantised formats: round a projection's input columns one at a time and push each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of
the layer's inputs (H = sum of x x^T over a calibration text), so the layer's outputs on such
inputs move as little as possible (Frantar et al., 2022). Round-to-nearest on groups of 128
costs SmolLM2-135M a third of its perplexity; this is what brings it back.

The int8 formats round onto their per-channel grid, fixed up front (amax / 127). For the 4-bit
ones, each group's (scale, min) grid is an asymmetric one, clipped where that rounds the group's
important inputs better (`group_grid`). The result is a float weight on those grids, which
`quadrant quantize` stores exactly (`int4_groups(on_grid=True)`: a group whose codes stop short
of 0 or 15 keeps its own step rather than being rounded again onto its min/max grid).

Hessians come from the shipped calibration text, per Linear module (q/k/v share qkv_proj's,
gate/up share gate_up_proj's) and per MoE expert (the tokens routed to it, for gate/up; its own
act(gate) * up, for down). `quadrant quantize` collects them sequentially (`input_hessians` with
`round_weights`): layer by layer, each projection rounded before the next one's inputs are taken.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from quadrant.config import ModelConfig
from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.linear import Linear
from quadrant.layers.moe import Experts
from quadrant.quant.calibrate import expert_down_input, run_calibration


# (hessian key, weight [N, K] fp32 as the model holds it, its Hessian or None, calibration tokens) ->
# the weight as the folder will store it (floats on its grids)
RoundWeights = Callable[[str, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


@torch.inference_mode()
def input_hessians(model: nn.Module, token_ids: list[int], chunk: int = 256, round_weights: RoundWeights | None = None,
                   progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """({key: sum of x x^T [K, K] over the calibration tokens}, {key: how many tokens}): keys are
    Linear module names, and "{experts module}.{e}.in" / ".down" for each MoE expert's two inputs
    (an expert sees only the tokens routed to it).

    With `round_weights`, in GPTQ's sequential order: the model is run layer by layer, and within
    a layer projection by projection (q/k/v, o, the FFN's inputs, its down projections), each one
    rounded in the model by `round_weights` as soon as its Hessian is in, so that every later
    Hessian sees the inputs the quantised model will give it, upstream errors included (on
    SmolLM2-135M at groups of 128: +6.4% perplexity instead of +7.9%). Without, one pass of the
    float model. `progress`: a bar over the layers (the sequential pass takes minutes)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(key: str, x: torch.Tensor) -> None:
        # float64 products: in fp32 (17 s faster on SmolLM2) GPTQ's choices moved enough to take the
        # tuned default folder over the 4-bit floor on one text (+6.44%; BENCHMARKS.md).
        x = x.reshape(-1, x.shape[-1]).double()
        h = (x.t() @ x).float()  # stored fp32: an upcycled MoE holds a few hundred of these
        sums[key] = sums[key] + h if key in sums else h
        counts[key] = counts.get(key, 0) + x.shape[0]

    def linear_hook(name: str):  # type: ignore[no-untyped-def]
        return lambda module, args: add(name, args[0])

    def experts_hook(name: str, parts: tuple[str, ...] = ("in", "down")):  # type: ignore[no-untyped-def]
        def record(module: Experts, args: tuple[torch.Tensor, ...]) -> None:
            x, _, topk_ids = args[0].float(), args[1], args[2]
            for e in range(module.num_experts):
                rows = (topk_ids == e).any(-1)
                if rows.any():
                    if "in" in parts:
                        add(f"{name}.{e}.in", x[rows])
                    if "down" in parts:
                        add(f"{name}.{e}.down", expert_down_input(module, e, x[rows]))
        return record

    if round_weights is not None:
        _sequential(model, token_ids, chunk, round_weights, linear_hook, experts_hook, sums, counts, progress)
        return sums, counts
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(name)))
        elif isinstance(module, Experts) and module.w13 is not None:
            handles.append(module.register_forward_pre_hook(experts_hook(name)))
    run_calibration(model, token_ids, handles, chunk)
    return sums, counts


def _stage(name: str) -> int:
    """When, within its decoder layer, a projection's inputs are ready: (0) the attention's inputs,
    (1) its output projection's, (2) the FFN's inputs (MoE experts: their gate/up), (3) its down
    projections' (which read act(gate) * up of rounded gate/up weights)."""
    if ".self_attn." in f".{name}":
        return 1 if name.endswith("o_proj") else 0
    return 3 if name.endswith("down_proj") else 2


def _sequential(model: nn.Module, token_ids: list[int], chunk: int, round_weights: RoundWeights,
                linear_hook: Callable[..., Any], experts_hook: Callable[..., Any],
                sums: dict[str, torch.Tensor], counts: dict[str, int], progress: bool) -> None:
    inner: Any = model.model  # a LlamaModel: embeddings, rope tables, decoder layers
    states = []  # per calibration chunk: [hidden, residual, rope tables, metadata], advanced layer by layer
    for start in range(0, len(token_ids), chunk):
        ids = torch.tensor(token_ids[start : start + chunk])
        hidden = inner.embed_tokens(ids)
        states.append([hidden, None, inner.rope_tables(torch.arange(len(ids)), hidden.dtype),
                       AttentionMetadata.for_packed_sequences([len(ids)])])
    for i, layer in enumerate(tqdm(inner.layers, desc="calibrate GPTQ", unit=" layers", disable=not progress)):
        prefix = f"model.layers.{i}"
        stages: dict[int, list[tuple[str, Any, tuple[str, ...]]]] = {}
        for sub, module in layer.named_modules():
            name = f"{prefix}.{sub}"
            if isinstance(module, Linear):
                stages.setdefault(_stage(sub), []).append((name, module, ()))
            elif isinstance(module, Experts) and module.w13 is not None:
                stages.setdefault(2, []).append((name, module, ("in",)))
                stages.setdefault(3, []).append((name, module, ("down",)))
        for stage in sorted(stages):
            handles = [module.register_forward_pre_hook(experts_hook(name, parts) if parts else linear_hook(name))
                       for name, module, parts in stages[stage]]
            # Once every module of the stage has its input, the rest of the layer is not needed: the
            # forward stops there (the layer's output comes from one last pass below). A pass per
            # stage ran whole layers before: four of them (SmolLM2's calibration: 120 s, now 87 s).
            fired: set[str] = set()
            handles += [module.register_forward_pre_hook(_stop_when_all(name, fired, len(stages[stage])))
                        for name, module, _ in stages[stage]]
            try:
                for hidden, residual, rope, meta in states:
                    fired.clear()
                    try:
                        layer(hidden, residual, rope, meta)
                    except _StageDone:
                        pass
            finally:
                for h in handles:
                    h.remove()
            for name, module, parts in stages[stage]:
                if isinstance(module, Experts):
                    stack = module.w13 if parts == ("in",) else module.w2
                    for e in range(module.num_experts):
                        key = f"{name}.{e}.{parts[0]}"
                        stack[e] = round_weights(key, stack[e].float(), sums.get(key), counts.get(key, 0)).to(stack.dtype)
                else:
                    w: torch.Tensor = module.weight
                    w.copy_(round_weights(name, w.float(), sums.get(name), counts.get(name, 0)).to(w.dtype))
        for state in states:
            state[0], state[1] = layer(*state)


class _StageDone(Exception):
    """Raised by the last module of a calibration stage to be reached: its layer's forward stops."""


def _stop_when_all(name: str, fired: set[str], wanted: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        fired.add(name)
        if len(fired) == wanted:
            raise _StageDone
    return hook


def hessian_bytes(config: ModelConfig) -> int:
    """What `input_hessians` holds for this architecture (fp32), to decide before collecting."""
    c = config
    q_width = c.num_attention_heads * c.head_dim
    per_layer = 2 * c.hidden_size**2 + q_width**2  # qkv and gate_up (or the experts' router input), o
    moe_layers = sum(1 for i in range(c.num_hidden_layers) if c.is_moe_layer(i))
    inter = getattr(c, "moe_intermediate_size", 0) or c.intermediate_size
    experts = getattr(c, "num_experts", 0) or 0
    dense = (c.num_hidden_layers - moe_layers) * (per_layer + c.intermediate_size**2)
    sparse = moe_layers * (per_layer + experts * (c.hidden_size**2 + inter**2))
    return 4 * (dense + sparse)


# Hugging Face expert names: one expert's matrix, or all experts stacked [E, N, K] (GGUF's layout).
_EXPERT = re.compile(r"^(?P<layer>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                     r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_proj|up_proj|gate_up_proj|down_proj)\.weight$")
_MERGED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
           "up_proj": "gate_up_proj"}


def hessian_key(name: str, expert: int | None = None) -> str | None:
    """The key of `input_hessians` for the inputs of the tensor `name` (expert `expert` of a stacked
    tensor); None where it is not a projection GPTQ handles."""
    for pattern in (_EXPERT, _STACKED):
        match = pattern.match(name)
        if match is not None:
            e = match.groupdict().get("e") or expert
            part = "down" if match["proj"] in ("w2", "down_proj") else "in"
            return None if e is None else f"{match['layer']}.mlp.experts.{e}.{part}"
    if not name.endswith("_proj.weight"):
        return None
    stem, _, proj = name.removesuffix(".weight").rpartition(".")
    return f"{stem}.{_MERGED.get(proj, proj)}"


def checkpoint_name(key: str) -> str:
    """A Hugging Face tensor name whose `hessian_key` is `key` (q_proj for the merged qkv_proj, an
    expert's gate_proj / down_proj for its two inputs): where per-tensor rules (smoothing scales)
    are looked up for a model module."""
    for merged, part in (("qkv_proj", "q_proj"), ("gate_up_proj", "gate_proj")):
        if key.endswith(f".{merged}"):
            return f"{key.removesuffix(merged)}{part}.weight"
    expert = re.match(r"^(?P<experts>.+\.experts\.\d+)\.(?P<part>in|down)$", key)
    if expert is not None:
        return f"{expert['experts']}.{'gate_proj' if expert['part'] == 'in' else 'down_proj'}.weight"
    return f"{key}.weight"


def group_grid(w: torch.Tensor, importance: torch.Tensor | None = None,
               shrinks: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) [N, 1] of an asymmetric 4-bit grid for each row of w [N, g]: the min/max one
    shrunk by the factor in `shrinks` whose rounding error, weighted by the inputs' `importance`
    [g] (H's diagonal: how much each input carries), is smallest per row. Clipping a few outliers
    buys a finer step for the rest."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    best_scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    if len(shrinks) == 1 and shrinks[0] == 1.0:
        return best_scale, lo
    weights = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if importance is None else importance.to(w.dtype)
    best_lo, best_err = lo, torch.full_like(lo, float("inf"))
    for p in shrinks:
        lo_p, hi_p = lo * p, hi * p
        scale = ((hi_p - lo_p) / 15.0).clamp_min(1e-12)
        err = ((round_to_grid(w, scale, lo_p) - w) ** 2 * weights).sum(1, keepdim=True)
        better = err < best_err
        best_scale, best_lo, best_err = (torch.where(better, scale, best_scale), torch.where(better, lo_p, best_lo),
                                         torch.where(better, err, best_err))
    return best_scale, best_lo


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, max_code: int = 15) -> torch.Tensor:
    """w rounded to the nearest of the points lo + c * scale, c in 0..max_code (clamped at both ends)."""
    return torch.clamp(torch.round((w - lo) / scale), 0, max_code) * scale + lo


CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = 0.01, block: int = 128,
         act_order: bool = True, shrinks: tuple[float, ...] = CLIP_SHRINKS,
         grid: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """weight [N, K], hessian [K, K] -> the weight rounded to 4-bit groups of `group` inputs (as floats);
    or, with `grid` = (scale, lo [N, K/group], max_code), to that fixed grid of max_code + 1 points
    (int8 per channel: group K, lo = -127 scale, max_code 254), in act-order.

    `damp` adds that fraction of the mean diagonal to H (numerical safety for rarely-used inputs);
    `block` is how many columns are updated lazily at a time (rounded up to whole groups, so that
    in column order a group's weights are all current when its grid is chosen). `act_order` rounds the columns in
    order of decreasing H diagonal (the inputs that carry most first, while the others can still
    absorb their error); the groups stay the stored, contiguous ones, so their grids are then fixed
    up front from the original weights. `shrinks`: the clipping candidates of `group_grid`."""
    w = weight.detach().double().clone()
    n, k = w.shape
    if k % group:
        raise ValueError(f"in_features {k} must be a multiple of the group {group}")
    if grid is None:  # grids chosen as the columns go: a block holds whole groups
        block = -(-block // group) * group
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    diag = torch.diag(h)
    num_groups = k // group
    max_code = 15
    if grid is not None:
        scales, mins, max_code = grid[0].double(), grid[1].double(), grid[2]
        act_order = True
        perm = torch.argsort(diag, descending=True)
    elif act_order:
        grids = [group_grid(w[:, g * group : (g + 1) * group], diag[g * group : (g + 1) * group], shrinks)
                 for g in range(num_groups)]
        scales = torch.cat([s for s, _ in grids], 1)  # [N, K/g]
        mins = torch.cat([m for _, m in grids], 1)
        perm = torch.argsort(diag, descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    h = h[perm][:, perm]
    # Upper Cholesky factor of H^-1: row i holds column i's error weights on the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Transposed, [K, N]: each input column's weights lie contiguous, which the loop below reads and
    # updates one column at a time (strided columns of [N, K] made it several times slower).
    wt = w.t()[perm].contiguous()
    out = torch.empty_like(wt)
    scale = lo = torch.empty(0, device=w.device)
    if act_order:  # each column's grid, in the permuted order
        col_scales, col_mins = scales.t()[perm // group].contiguous(), mins.t()[perm // group].contiguous()
    columns = perm.tolist()  # Python ints: the loop below runs once per input column
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = wt[b0:b1].clone()
        errors = torch.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        pivots = torch.diagonal(hb).tolist()
        for i in range(b1 - b0):
            if act_order:
                scale, lo = col_scales[b0 + i], col_mins[b0 + i]
            elif columns[b0 + i] % group == 0:  # in order: the group's grid from its weights as updated so far
                grid_scale, grid_lo = group_grid(wb[i : i + group].t(), diag[perm[b0 + i : b0 + i + group]], shrinks)
                scale, lo = grid_scale[:, 0], grid_lo[:, 0]
            row = wb[i]
            q = round_to_grid(row, scale, lo, max_code)
            out[b0 + i] = q
            err = errors[i]
            torch.sub(row, q, out=err).div_(pivots[i])
            wb[i:].addr_(hb[i, i:], err, alpha=-1)
        wt[b1:].addmm_(hinv[b0:b1, b1:].t(), errors, alpha=-1)
    return out[torch.argsort(perm)].t().to(weight.dtype)
