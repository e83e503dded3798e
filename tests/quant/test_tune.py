"""End-to-end tuning of 4-bit folders (quant/tune.py): the tunable model is exactly the folder's, the
codes never move, and the rewritten scales, mins and norm gains lower the KL the folder's real
kernels give against the float model. How much it buys on the default model is measured in
benchmarks/quant_quality.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from quadrant.layers.attention import AttentionMetadata  # noqa: E402
from quadrant.loader.safetensors import iter_tensors  # noqa: E402
from quadrant.loader.source import open_model  # noqa: E402
from quadrant.quant.quantize import QuantizeError, _pack_nibbles, quantize_model  # noqa: E402
from quadrant.quant.tune import StoredGroups, TuneConfig, _int8_tokens, tunable_student, tune_folder  # noqa: E402
from tests.models.test_gguf_archs import _write_gguf  # noqa: E402
from tests.models.test_moe import _make  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kl(model, teacher, ids: list[int]) -> float:
    """Mean KL(teacher || model) per token over `ids` as one sequence."""
    def log_probs(m):
        hidden = m(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_packed_sequences([len(ids)]))
        return F.log_softmax(m.compute_logits(hidden).float(), -1)
    with torch.inference_mode():
        return F.kl_div(log_probs(model), log_probs(teacher), log_target=True, reduction="batchmean").item()


def _source(kind: str, tmp_path):
    if kind == "llama":
        save_tiny_llama(tmp_path / "src", std=0.05, num_layers=2)
        return tmp_path / "src"
    if kind == "mixtral":  # experts stored one tensor each (w1/w2/w3)
        _make("mixtral", tmp_path / "src")
        return tmp_path / "src"
    hf, arch = _make("qwen3_moe", tmp_path / "hf")  # a GGUF: [E, N, K] expert stacks
    _write_gguf(hf, arch, tmp_path / "m.gguf", checkpoint=tmp_path / "hf")
    return tmp_path / "m.gguf"


@pytest.mark.parametrize("kind,fmt", [("llama", "w4a16"), ("llama", "w4a8"), ("mixtral", "w4a16"), ("gguf", "w4a8")])
def test_tunable_model_is_the_folder(kind, fmt, tmp_path):
    """Before any step, every parametrised weight rebuilds the stored one exactly, and every stored
    4-bit weight and norm gain is among the tuned parameters."""
    src = _source(kind, tmp_path)
    out = tmp_path / "q"
    quantize_model(str(src), fmt, out, progress=False, group_size=32, smoothing=None, allow_requantize=True)
    stored = dict(iter_tensors(out))
    teacher = open_model(src).load_model(torch.float32)
    student, groups, norms = tunable_student(teacher, stored, fmt)
    folder = open_model(out).load_model(torch.float32, "cpu", "dense")  # the folder dequantised by the loader
    expected = dict(folder.named_parameters())
    with torch.no_grad():
        for name, module in student.named_modules():
            for attr in getattr(module, "parametrizations", {}):
                assert torch.equal(getattr(module, attr), expected[f"{name}.{attr}"]), f"{name}.{attr}"
    assert set(groups) == {k.removesuffix(".mins") + ".weight" for k in stored if k.endswith(".mins")}
    assert set(norms) == {k for k in stored if k.endswith("norm.weight")} and norms
    if fmt == "w4a8":  # the student rounds its 4-bit projections' inputs per token, as the kernels do
        tuned = {name for name, module in student.named_modules() if hasattr(module, "parametrizations")}
        for name, module in folder.named_modules():
            if name in tuned:
                module.register_forward_pre_hook(_int8_tokens)
    assert _kl(student, folder, _ids(40, 0)) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grid_rebuild_matches_autograd(dtype, tol):
    """StoredGroups' own backward (group sums in fp32) against autograd through the plain formula in
    float64; in bf16 (the default on CPUs with AMX / AVX512-BF16) within bf16's rounding."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 256), generator=gen, dtype=torch.uint8)
    qweight = _pack_nibbles(codes)
    scales = torch.rand(6, 4, generator=gen) * 0.02 + 0.01
    mins = -torch.rand(6, 4, generator=gen) * 0.1
    part = StoredGroups(None, qweight, scales, mins, dtype)
    with torch.no_grad():
        part.log_gain.normal_(0, 0.1, generator=gen)
        part.shift.normal_(0, 0.1, generator=gen)
    upstream = torch.randn(6, 256, generator=gen)
    (part.weight().float() * upstream).sum().backward()

    log_gain = part.log_gain.detach().double().requires_grad_()
    shift = part.shift.detach().double().requires_grad_()
    s = scales.double() * torch.exp(log_gain)
    ref = (codes.double().view(6, 4, 64) * s[..., None] + (mins.double() + shift * scales.double())[..., None]).view(6, 256)
    (ref * upstream.double()).sum().backward()
    assert (part.weight().double() - ref).abs().max() <= tol * ref.abs().max()
    for got, want in ((part.log_gain.grad, log_gain.grad), (part.shift.grad, shift.grad)):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max()), (got, want)


def test_int8_tokens_rounds_each_row_and_passes_gradients_straight():
    x = (torch.randn(5, 64) * torch.logspace(-2, 2, 5)[:, None]).requires_grad_()
    (rounded,) = _int8_tokens(None, (x,))
    step = x.detach().abs().amax(1, keepdim=True) / 127
    codes = rounded.detach() / step
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert torch.all((rounded - x).abs() <= step / 2 + 1e-6)
    rounded.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_tuning_lowers_the_folders_kl_and_keeps_its_codes(tmp_path):
    src = _source("llama", tmp_path)
    out = tmp_path / "q"
    quantize_model(str(src), "w4a16", out, progress=False, group_size=32)
    teacher = open_model(src).load_model(torch.float32)
    before = dict(iter_tensors(out))
    ids = _ids(256, 1)
    with pytest.raises(ValueError, match="at least 256 tokens"):  # the tiny model holds 256 positions
        tune_folder(out, teacher, "w4a16", ids[:100])
    assert all(torch.equal(t, before[n]) for n, t in iter_tensors(out))
    kl_before = _kl(open_model(out).load_model(torch.float32, "cpu", "w4a16"), teacher, ids)
    report = tune_folder(out, teacher, "w4a16", ids, TuneConfig(steps=12, lr=3e-3, norm_lr=3e-4, seq_len=128))
    after = dict(iter_tensors(out))
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype
        if name.endswith(".qweight") or name == "model.embed_tokens.weight":
            assert torch.equal(tensor, before[name]), name
        elif name.endswith((".scales", ".mins", "norm.weight")) and "lm_head" not in name:
            assert not torch.equal(tensor, before[name]), name
    # Through the folder's own 4-bit kernels (the grids loaded back exactly), on the tuning text.
    kl_after = _kl(open_model(out).load_model(torch.float32, "cpu", "w4a16"), teacher, ids)
    assert report.steps == 12 and report.tokens == 256
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)


@pytest.mark.parametrize("kind,fmt", [("mixtral", "w4a16"), ("gguf", "w4a8")])
def test_bf16_tuning_of_moe_folders(kind, fmt, tmp_path):
    """Tuning with bf16 matmuls (the default where the CPU has them) on MoE folders: the experts'
    kernels take their stacks in the model's dtype, and the folder's KL still falls."""
    src = _source(kind, tmp_path)
    out = tmp_path / "q"
    quantize_model(str(src), fmt, out, progress=False, group_size=32, smoothing=None, allow_requantize=True)
    teacher = open_model(src).load_model(torch.float32)
    ids = _ids(256, 2)
    kl_before = _kl(open_model(out).load_model(torch.float32, "cpu", fmt), teacher, ids)
    tune_folder(out, teacher, fmt, ids, TuneConfig(steps=8, lr=3e-3, norm_lr=3e-4, seq_len=128, dtype="bfloat16"))
    kl_after = _kl(open_model(out).load_model(torch.float32, "cpu", fmt), teacher, ids)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)


def test_tuning_is_refused_where_it_cannot_apply(tmp_path):
    src = _source("llama", tmp_path)
    with pytest.raises(QuantizeError, match="4-bit formats"):
        quantize_model(str(src), "w8a8", tmp_path / "a", progress=False, tune_steps=5)
    with pytest.raises(QuantizeError, match="no tokenizer"):
        quantize_model(str(src), "w4a16", tmp_path / "b", progress=False, tune_steps=5)
    with pytest.raises(QuantizeError, match="--thorough tunes the 4-bit formats"):
        quantize_model(str(src), "int8", tmp_path / "e", progress=False, thorough=True)
    with pytest.raises(QuantizeError, match="cannot go with --tune-steps 0"):
        quantize_model(str(src), "w4a16", tmp_path / "e", progress=False, thorough=True, tune_steps=0)
    with pytest.raises(QuantizeError, match="no tokenizer to tune with; leave out --thorough"):
        quantize_model(str(src), "w4a16", tmp_path / "e", progress=False, thorough=True)
    with pytest.raises(QuantizeError, match="0 \\(off\\) or more"):
        quantize_model(str(src), "w4a16", tmp_path / "c", progress=False, tune_steps=-1)
    assert not any((tmp_path / n).exists() for n in "abce")
    # Without a tokenizer, "auto" neither rounds by GPTQ nor tunes, and records neither.
    quantize_model(str(src), "w4a16", tmp_path / "d", progress=False)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]
    assert cfg["rounding"] == "rtn" and "tuned" not in cfg


def test_quantize_tunes_and_w4a8_defaults(default_gguf_path, tmp_path):
    """With a tokenizer: `quantize_model` tunes after GPTQ and records it; "auto" rotates w4a8 and
    then skips SmoothQuant, which still runs unrotated."""
    from tests.tiny_models import outlier_llama

    path = tmp_path / "m"
    outlier_llama(49152).save_pretrained(path, safe_serialization=True)
    open_model(default_gguf_path).tokenizer().save_pretrained(path)
    report = quantize_model(str(path), "w4a16", tmp_path / "tuned", progress=False, tune_steps=2)
    cfg = json.loads((tmp_path / "tuned" / "config.json").read_text())["quantization_config"]
    assert cfg["rounding"] == "gptq" and cfg["tuned"].startswith("scales, mins and norm gains, 2 steps")
    assert cfg["tuned"].endswith(f"(lr 0.0006, {str(TuneConfig().compute_dtype()).removeprefix('torch.')} matmuls)")
    assert report.tuning is not None and report.tuning.steps == 2 and report.tuning.tokens >= 512
    # --thorough: its own recipe, recorded (one step: the recipe, not its length, is what is checked)
    quantize_model(str(path), "w4a16", tmp_path / "thorough", progress=False, tune_steps=1, thorough=True)
    cfg = json.loads((tmp_path / "thorough" / "config.json").read_text())["quantization_config"]
    assert cfg["tuned"] == "scales, mins and norm gains, 1 steps on the calibration texts (lr 0.0002, float32 matmuls)"
    configs = {}
    for rotate in ("auto", "off"):
        quantize_model(str(path), "w4a8", tmp_path / rotate, progress=False, method="rtn", rotate=rotate, tune_steps=0)
        configs[rotate] = json.loads((tmp_path / rotate / "config.json").read_text())["quantization_config"]
    assert "rotation" in configs["auto"] and "smoothquant" not in configs["auto"]
    assert "rotation" not in configs["off"] and configs["off"]["smoothquant"] == "auto"
