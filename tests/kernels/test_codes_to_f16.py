"""kv_store.codes_to_f16, the decode kernel's inline-PTX conversion of 8-bit cache codes to fp16.

The interpreter cannot run inline PTX, so this checks it two ways without a GPU: the kernel
compiles into the split-KV decode kernel for sm_90 (Triton's own ptxas assembles it), and the PTX text itself, run by a small
interpreter of the seven instructions it uses, turns every int8 and every fp8 e4m3 code (NaN
excepted: the cache never stores it) in every byte lane into exactly torch's value.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from quadrant.kernels import kv_store  # noqa: E402

_SOURCE = inspect.getsource(getattr(kv_store.codes_to_f16, "fn", kv_store.codes_to_f16))  # interpreted or jit
ASM = re.findall(r'"""(\{.*?\})"""', _SOURCE, re.S)  # [int8, fp8]


def _halves(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _pack(h: np.ndarray) -> int:
    bits = h.astype(np.float16).view(np.uint16).astype(np.uint32)
    return int(bits[0]) | int(bits[1]) << 16


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    return sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def run_ptx(text: str, word: int) -> list[float]:
    """Run the asm block with $2 = `word`; the four fp16 results of $0 and $1, low half first."""
    regs = {"$2": word}

    def val(operand: str) -> int:
        return int(operand, 0) if operand[0].isdigit() else regs[operand]

    for inst in text.strip("{} \n").split(";"):
        inst = inst.strip()
        if not inst or inst.startswith(".reg"):
            continue
        op, args = inst.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        x = [val(s) for s in src]
        if op == "mov.b32":
            regs[d] = x[0]
        elif op == "xor.b32":
            regs[d] = x[0] ^ x[1]
        elif op == "and.b32":
            regs[d] = x[0] & x[1]
        elif op == "or.b32":
            regs[d] = x[0] | x[1]
        elif op == "shr.b32":
            regs[d] = x[0] >> x[1]
        elif op == "prmt.b32":
            regs[d] = _prmt(x[0], x[1], x[2])
        elif op == "sub.f16x2":  # exact here: every difference the conversions take is representable
            regs[d] = _pack(_halves(x[0]).astype(np.float64) - _halves(x[1]))
        elif op == "mul.f16x2":
            regs[d] = _pack(_halves(x[0]).astype(np.float64) * _halves(x[1]))
        else:
            raise AssertionError(f"no interpreter for {op}")
    return [float(v) for v in np.concatenate([_halves(regs["$0"]), _halves(regs["$1"])])]


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_ptx_conversion_is_exact_for_every_code_in_every_lane(quant):
    assert len(ASM) == 2
    text = ASM[0] if quant == "int8" else ASM[1]
    dtype = torch.int8 if quant == "int8" else torch.float8_e4m3fn
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(dtype).double().tolist()
    for code in range(256):
        if quant == "fp8" and code & 0x7F == 0x7F:
            continue  # NaN: kv_store clamps every code to +-448
        for lane in range(4):
            word = [0x21, 0x93, 0x05, 0x7E]  # other lanes hold other codes: no lane leaks into another
            word[lane] = code
            got = run_ptx(text, sum(b << 8 * i for i, b in enumerate(word)))
            assert got == [values[b] for b in word], (quant, hex(code), lane)


COMPILE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quadrant.kernels.paged_decode import CONVERSIONS, _decode_split_kernel

pointers = {"q": "*bf16", "k_cache": "cache", "v_cache": "cache", "k_scale": "*fp32", "v_scale": "*fp32",
            "block_tables": "*i32", "seq_lens": "*i32", "chunk_ptr": "*i32", "out": "*bf16", "part_out": "*fp32",
            "part_lse": "*fp32", "tree_start": "*i32", "tree_mask": "*i64"}
# the 8-bit caches under each conversion, then a bf16 cache with token-tree rows
variants = [(cache, quant, conv, False) for cache, quant in (("*i8", 1), ("*fp8e4nv", 2)) for conv in CONVERSIONS]
for cache, quant, conv, tree in variants + [("*bf16", 0, 0, True)]:
    const = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, PAGE=16, BLOCK_N=128 if quant else 64, QUANT=quant,
                 QGROUP=16, SOFTCAP=False, DOT=tl.bfloat16, SINGLE=False, CONV=conv, TREE=tree)
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32").replace("cache", cache)
           for n in _decode_split_kernel.arg_names}
    sig["sm_scale"] = sig["softcap"] = "fp32"
    compiled = triton.compile(ASTSource(_decode_split_kernel, signature=sig, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    op = "sub.f16x2" if quant == 1 else "mul.f16x2"
    print(cache, "tree" if tree else conv, len(compiled.asm["cubin"]), op in compiled.asm["ptx"])
"""


def test_ptx_conversion_compiles_for_sm90(tmp_path):
    """The split-KV decode kernel, with each conversion of both 8-bit caches and with token-tree rows
    over a bf16 cache, compiles for an H100
    with no GPU present: Triton's ptxas assembles the inline PTX (in a process of its own: this one
    runs Triton's interpreter, which compiles nothing). A GPU session lost its sweep of conversion
    2 to a compile error this finds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    script = tmp_path / "compile_sm90.py"  # @jit needs its source in a file
    script.write_text(COMPILE)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    # every variant assembled; the PTX conversion's instructions are there in conversion 2 alone
    assert [(c, conv, int(n) > 0, ok) for c, conv, n, ok in rows] == [
        (cache, str(conv), True, str(conv == 2)) for cache in ("*i8", "*fp8e4nv") for conv in (0, 1, 2)] + [
        ("*bf16", "tree", True, "False")]
