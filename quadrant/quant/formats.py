"""Weight formats for linear layers: how a weight is stored and which kernel multiplies by it.

`dense` keeps the checkpoint's float matrix (the reference). `int8` stores
per-output-channel symmetric int8 weights and multiplies bf16 activations
(weight-only, W8A16). `w8a8` keeps the same weights and quantises activations
per token inside the matmul (fbgemm's quantized linear on x86 CPUs). `w4a16`
stores 4-bit asymmetric weights with a (scale, min) per group of inputs;
`w4a8` the same 4-bit weights with per-token 8-bit activations.
Weight bytes are what batch-1 decode is bound by. The torch kernels sit behind
this interface so another kernel can replace them without touching model code.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

# The grids live in a torch-only leaf that kernels use too; callers importing them from here still can.
from quadrant.quant.registry import GPU_FORMATS, WEIGHT_FORMATS, format_spec
from quadrant.quant.grids import group_size_for, int4_groups, int8_per_channel, int8_per_token

FormatName = str  # a name of quant/registry.py's WEIGHT_FORMATS


@dataclass(frozen=True)
class WeightFormat:
    name: FormatName

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(WeightFormat):
    """The float matrix, optionally cast (bf16 halves the bytes of an fp32 checkpoint)."""

    name: FormatName = "dense"
    dtype: torch.dtype | None = None  # None: keep the loaded dtype

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        dtype = self.dtype or weight.dtype
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        weight, bias = packed
        if x.dtype == weight.dtype:
            return F.linear(x, weight, bias)
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


@dataclass
class Int8Packed:
    packed: Any  # fbgemm's prepacked [N, K + 2] int8 weight
    bias: torch.Tensor | None
    in_features: int
    # Row-parallel shard: a token's 8-bit grid spans its whole input row, the max over this group.
    amax_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class Int8Dynamic(WeightFormat):
    """int8 weights x per-token 8-bit activations, int32 accumulation, fp32 in and out.

    fbgemm's dynamic linear quantises its whole input with one (min, max) range.
    To get one scale per token instead, each row is divided by its absolute
    maximum and two constant columns (+1, -1, against zero weights) are
    appended, so the range is always exactly [-1, 1]: every token is quantised
    on its own grid, and its result is bit-identical whatever else is batched
    with it (prefix caching and chunking change nothing).
    """

    name: FormatName = "w8a8"
    on_grid: bool = False  # the weights come from an 8-bit folder: keep its grids exactly (int8_per_channel)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        return self._prepack(*int8_per_channel(weight, self.on_grid), bias)

    def _prepack(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int8Packed:
        in_features = q.shape[1]
        q = torch.cat([q, torch.zeros(q.shape[0], 2, dtype=torch.int8)], dim=1)
        with warnings.catch_warnings():
            # Quantized-tensor constructors warn of deprecation in torch >= 2.13; the packed
            # result is all we keep.
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        return Int8Packed(packed, None if bias is None else bias.float(), in_features)

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        k = packed.in_features
        x2 = x if x.dim() == 2 and x.dtype == torch.float32 else x.reshape(-1, k).float()
        row_max = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)  # [M, 1]
        if packed.amax_group is not None:
            dist.all_reduce(row_max, dist.ReduceOp.MAX, group=packed.amax_group)
        buf = _padded_buffer(x2.shape[0], k)
        torch.div(x2, row_max, out=buf[:, :k])
        out = torch.ops.quantized.linear_dynamic(buf, packed.packed, _REDUCE_RANGE).mul_(row_max)
        if packed.bias is not None:
            out += packed.bias
        return out if x2 is x else out.view(*x.shape[:-1], -1).to(x.dtype)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def _cpu_has_vnni() -> bool:
    flags = _cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def prefill_dtype() -> torch.dtype:
    """The dense dtype of CPU prefill GEMMs: bf16 where the CPU multiplies it natively (AVX512-BF16,
    AMX), fp32 elsewhere: oneDNN emulates bf16 on plain AVX2 at a sixth of its fp32 rate."""
    flags = _cpu_flags()
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


# Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16, so activations must
# stay within 7 bits; with VNNI (int32 dot products) the full 8 bits are safe, and they
# matter: 7-bit activations cost SmolLM2 ~13% perplexity, 8-bit ~1%.
_REDUCE_RANGE = not _cpu_has_vnni()

_scratch = threading.local()  # one set of buffers per thread: engines on different threads never share


def _padded_buffer(rows: int, k: int) -> torch.Tensor:
    """A [rows, k + 2] fp32 scratch whose last two columns hold +1 and -1 (reused across calls)."""
    _buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = _buffers.get((rows, k))
    if buf is None:
        buf = torch.empty(rows, k + 2)
        buf[:, k] = 1.0
        buf[:, k + 1] = -1.0
        if rows <= 64:  # keep decode-sized scratch; prefill sizes vary too much to be worth caching
            _buffers[(rows, k)] = buf
    return buf


@dataclass
class Int4Packed:
    packed: torch.Tensor  # torch's CPU int4 tile layout
    scales_and_zeros: torch.Tensor  # [K / group, N, 2] bf16
    bias: torch.Tensor | None
    group_size: int
    amax_group: dist.ProcessGroup | None = None  # w4a8 row-parallel shard: as Int8Packed's


@dataclass(frozen=True)
class W4A16(WeightFormat):
    """4-bit weights, asymmetric with one (scale, zero) per group of inputs; bf16 activations.

    Half the bytes of int8: the format for memory-bound decode. With groups of 32 (the
    CPU plan's) its grid matches GGUF Q4_1 blocks, so a Q4_1 file's weights come through
    (nearly) unchanged; the `w4a16` format uses groups of 128 where the width allows.
    """

    name: FormatName = "w4a16"
    group_size: int = 32
    on_grid: bool = False  # the weights come from a 4-bit folder: keep its grids exactly (int4_groups)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        n, k = weight.shape
        group = group_size_for(k, self.group_size)
        codes, scale, lo = int4_groups(weight, group, self.on_grid)
        q = codes.to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale.
        sz = torch.stack([scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)], dim=-1)  # [N, K/g, 2]
        sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
        return Int4Packed(packed, sz, None if bias is None else bias.float(), group)

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(x2, packed.packed, packed.group_size, packed.scales_and_zeros)
        out = out.to(x.dtype)
        if packed.bias is not None:
            out += packed.bias
        return out.view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class W8A16(WeightFormat):
    """`int8`: per-channel int8 weights, bf16 activations (weight-only: no activation rounding)."""

    name: FormatName = "int8"
    on_grid: bool = False  # as Int8Dynamic's

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        q, scale = int8_per_channel(weight, self.on_grid)
        return q, scale.to(torch.bfloat16), None if bias is None else bias.float()

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        q, scale, bias = packed
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), q, scale).to(x.dtype)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class W4A8(W4A16):
    """4-bit weights (w4a16's asymmetric groups) x per-token int8 activations.

    On the CPU each token's activations are rounded to a symmetric int8 grid (amax / 127), the
    GPU kernel's; their integer codes, exact in bf16, go through torch's int4 kernel, and the
    token's step multiplies the result. The products are the GPU's, 4-bit grid and all (an int8
    GEMM would need the grid re-expressed per channel in int8: one more rounding, as large as the
    4-bit step's half on a row whose groups' ranges differ eightfold).
    """

    name: FormatName = "w4a8"
    group_size: int = 128
    on_grid: bool = False  # as W4A16's

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        amax = None
        if packed.amax_group is not None:
            amax = x2.abs().amax(-1, keepdim=True)
            dist.all_reduce(amax, dist.ReduceOp.MAX, group=packed.amax_group)
        codes, step = int8_per_token(x2, amax)
        out = torch._weight_int4pack_mm_for_cpu(codes.to(torch.bfloat16), packed.packed, packed.group_size,
                                                packed.scales_and_zeros)
        out = out.float().mul_(step)
        if packed.bias is not None:
            out += packed.bias
        return out.to(x.dtype).view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class GpuQ8(WeightFormat):
    """The 8-bit-activation formats on the GPU, through the Triton kernel of kernels/quant_moe:
    `w4a8` (4-bit groups unpacked in registers, int8 tensor cores) and `w8a8` (e4m3 weights per
    channel x e4m3 activations per token: the GPU's 8-bit format, as the issue's plan has it)."""

    name: FormatName = "w4a8"
    group_size: int = 128
    on_grid: bool = False  # as W4A16's

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        from quadrant.kernels.quant_moe import pack_fp8, pack_w4a8

        if self.name == "w8a8":
            return pack_fp8(weight), bias
        group = group_size_for(weight.shape[-1], self.group_size)
        return pack_w4a8(weight, group, self.on_grid), bias  # [N, K] or [E, N, K]

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        from quadrant.kernels.quant_moe import quant_linear

        weights, bias = packed
        return quant_linear(x.reshape(-1, x.shape[-1]), weights, bias).view(*x.shape[:-1], -1)



@dataclass(frozen=True)
class NativeQ4(WeightFormat):
    """w4a16's weights (asymmetric groups of 32, GGUF Q4_1's grid) through the native CPU kernel
    (kernels/cpu_native.py), which rounds activations to 14 bits per 32 inputs (64 times finer than
    bf16) at every row count and multiplies integer blocks. For decode-sized batches; the plan picks
    it only where `native_available()` and the input width is a multiple of 32."""

    name: FormatName = "w4a16"

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        from quadrant.kernels.cpu_native import QK, pack_q4

        n, k = weight.shape
        codes, scale, lo = int4_groups(weight, QK)
        return pack_q4(codes.reshape(n, k), scale, lo, bias)

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        from quadrant.kernels.cpu_native import q4_mm, q4_mm_op

        if torch.compiler.is_compiling():
            out = q4_mm_op(x, packed.codes, packed.scales, packed.bias, packed.in_features, packed.out_features)
        else:
            out = q4_mm(x, packed)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


@dataclass(frozen=True)
class NativeQ8(WeightFormat):
    """`int8` weights (per channel) through the native CPU kernel, activations rounded to 14 bits per
    32 inputs (finer than bf16: the LM head's argmax is sensitive, and 8-bit activations there
    turned SmolLM2's "Paris" into "L'Etoile"): the CPU plan's LM head and 8-bit decode kernel."""

    name: FormatName = "int8"

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        from quadrant.kernels.cpu_native import pack_q8

        return pack_q8(*int8_per_channel(weight), bias)

    def apply(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        from quadrant.kernels.cpu_native import q8_mm, q8_mm_op

        if torch.compiler.is_compiling():
            out = q8_mm_op(x, packed.codes, packed.scale, packed.bias, packed.in_features, packed.out_features)
        else:
            out = q8_mm(x, packed)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def native_available(in_features: int) -> bool:
    """Whether the native CPU kernels run here (and QUADRANT_NATIVE_KERNELS does not turn them off)
    and take rows of this width."""
    from quadrant.kernels.cpu_native import QK

    return in_features > 0 and in_features % QK == 0 and native_kernels_available()


def native_kernels_available() -> bool:
    """Whether QUADRANT_NATIVE_KERNELS allows the native CPU kernels (kernels/cpu_native.py) and
    they build and load here (into $QUADRANT_HOME/kernels)."""
    from quadrant import envs
    from quadrant.kernels.cpu_native import library

    return envs.native_kernels() and library(envs.quadrant_home() / "kernels") is not None



def runs_on(name: str, device: str | torch.device) -> bool:
    """Whether `device` has kernels for format `name` (the CPU: all; a CUDA GPU: GPU_FORMATS its
    tensor cores can run; any other accelerator: dense only)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    spec = format_spec(name)
    if dev.type != "cuda" or not spec.gpu:
        return name == "dense"
    return spec.min_capability is None or torch.cuda.get_device_capability(dev) >= spec.min_capability

# The CPU kernels of each registered format (quant/registry.py), at its default group.
FORMATS: dict[str, WeightFormat] = {"dense": Dense(), "int8": W8A16(), "w8a8": Int8Dynamic(),
                                    "w4a16": W4A16(group_size=WEIGHT_FORMATS["w4a16"].default_group or 128),
                                    "w4a8": W4A8(group_size=WEIGHT_FORMATS["w4a8"].default_group or 128)}

# A plan: (max tokens in the batch, format) pairs, tried in order; the last must take any size.
Plan = list[tuple[float, WeightFormat]]
Kernels = list[tuple[float, WeightFormat, Any]]
# Up to here compact weights win (decode, verification, batched decode); beyond, dense GEMMs do. On 2
# AVX-512 cores (SmolLM2's 576 -> 1536), against bf16 oneDNN: the native 4-bit kernel takes 0.59x the
# time at 8 rows, 0.81x at 12, 0.95x at 16; the int8 one 0.60x, 0.79x, 1.01x. Machines differ (fp32
# where bf16 is emulated, AVX2 tiles of 8), so each crossover is measured.
SMALL_BATCH_TOKENS = 8
_CROSSOVER_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
_crossover: dict[int, int] = {}  # weight bits (4 or 8) -> measured crossover
_crossover_lock = threading.Lock()


def small_batch_tokens(bits: int = 4) -> int:
    """The largest CPU step (in tokens) that runs the compact decode kernels of `bits`-bit weights
    (4, else 8): QUADRANT_SMALL_BATCH_TOKENS, else measured once per process on a SmolLM2-sized
    projection (576 -> 1536), the native kernel against the dense prefill GEMM at 2 rows and up, until
    dense wins (~0.1-0.3 s); SMALL_BATCH_TOKENS where the native kernels do not run."""
    from quadrant import envs

    fixed = envs.small_batch_tokens()
    if fixed is not None:
        return fixed
    key = 4 if bits <= 4 else 8
    with _crossover_lock:
        if key not in _crossover:
            _crossover[key] = _measure_crossover(NativeQ4() if key == 4 else NativeQ8()) \
                if native_available(576) else SMALL_BATCH_TOKENS
        return _crossover[key]


@torch.inference_mode()
def _measure_crossover(compact: WeightFormat) -> int:
    import time

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=g) * 0.02
    dense = Dense(dtype=prefill_dtype())
    packs = [(compact, compact.pack(weight, None)), (dense, dense.pack(weight, None))]
    best = 1
    for rows in _CROSSOVER_SIZES:
        x = torch.randn(rows, 576, generator=g)
        times = []
        for fmt, packed in packs:
            fmt.apply(x, packed)  # warm-up
            runs = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(4):
                    fmt.apply(x, packed)
                runs.append(time.perf_counter() - start)
            times.append(sorted(runs)[len(runs) // 2])
        if times[0] > times[1]:
            break  # dense is faster from here on
        best = rows
    return best


def get_format(name: str, group_size: int | None = None, device: str | torch.device = "cpu",
               from_folder: bool = False) -> WeightFormat:
    """A format by name for `device`; `group_size` sets the 4-bit formats' groups (a quantised folder's own,
    whose grids they then keep exactly, as `from_folder` has the 8-bit ones keep theirs).
    On a GPU the 8-bit-activation formats take the Triton kernels; the LM head's int8 (weight-only)
    stays in the model's dtype there."""
    spec = format_spec(name)
    if torch.device(device).type != "cpu":
        if name in ("int8", "dense"):
            return Dense()
        if not spec.gpu:
            raise ValueError(f"weight format {name} runs on the CPU only so far; on a GPU use one of {GPU_FORMATS}")
        if not runs_on(name, device):
            raise ValueError(f"weight format {name} needs a CUDA GPU with compute capability "
                             f"{'.'.join(map(str, spec.min_capability or ()))}+ ({device} has none); use dense")
        return GpuQ8(name=name, group_size=group_size or 128, on_grid=group_size is not None)  # type: ignore[arg-type]
    if group_size is not None and name == "w4a16":
        return W4A16(group_size=group_size, on_grid=True)
    if group_size is not None and name == "w4a8":
        return W4A8(group_size=group_size, on_grid=True)
    if from_folder and name == "int8":
        return W8A16(on_grid=True)
    if from_folder and name == "w8a8":
        return Int8Dynamic(on_grid=True)
    return FORMATS[name]


def single_plan(name: str, group_size: int | None = None, device: str | torch.device = "cpu",
                from_folder: bool = False) -> Plan:
    return [(float("inf"), get_format(name, group_size, device, from_folder))]


def cpu_plan(source_bits: int, sensitive: bool = False, in_features: int = 0) -> Plan:
    """CPU formats by batch size. Small (decode) batches are weight-bandwidth bound: a 4-bit
    checkpoint streams its 4-bit weights unchanged, an 8-bit one int8, through the native
    integer-dot kernels where they run (activations rounded per 32 inputs, llama.cpp's
    precision; per-token int8 rounding, by contrast, cost SmolLM2 its answers: W8A8 prefill
    turned "Paris" into "L'Etoile"), else torch's weight-only kernels. Larger batches are
    compute-bound and run dense (bf16, or fp32 where bf16 is emulated). The LM head (`sensitive`)
    keeps int8 at every size: its batch is only the rows that sample."""
    native = native_available(in_features)
    if sensitive:
        return [(float("inf"), NativeQ8() if native else W8A16())]
    if source_bits <= 4:
        decode: WeightFormat = NativeQ4() if native else W4A16()
    else:
        decode = NativeQ8() if native else W8A16()
    return [(small_batch_tokens(source_bits), decode), (float("inf"), Dense(dtype=prefill_dtype()))]


def pack_plan(plan: Plan, weight: torch.Tensor, bias: torch.Tensor | None) -> Kernels:
    return [(max_tokens, fmt, fmt.pack(weight, bias)) for max_tokens, fmt in plan]


def share_token_scales(kernels: Kernels, group: dist.ProcessGroup) -> None:
    """A row-parallel shard's 8-bit activation formats scale each token by its whole row's amax
    (the max over `group`), so every rank rounds the row as one process would."""
    for _, _, packed in kernels:
        if isinstance(packed, (Int8Packed, Int4Packed)):
            packed.amax_group = group


def compact_rows(model: torch.nn.Module) -> int | None:
    """The largest step (in tokens) that every repacked layer of `model` runs through its compact
    kernels (None: no layer switches to dense GEMMs)."""
    limits = [kernels[0][0] for m in model.modules() if len(kernels := getattr(m, "kernels", None) or []) > 1]
    return int(min(limits)) if limits else None


def run_kernels(kernels: Kernels, x: torch.Tensor) -> torch.Tensor:
    num_tokens = x.shape[0]
    for max_tokens, fmt, packed in kernels:
        if num_tokens <= max_tokens:
            return fmt.apply(x, packed)
    raise AssertionError("a plan's last kernel must accept any batch size")
