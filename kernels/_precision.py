"""How the Triton kernels multiply and convert, shared by the forward (``_fast``) and backward
(``_common``) kernels: ``_mma`` runs a tile product on tensor cores in a precision mode (``PREC``:
"tf32", "tf32x3", or "tf32_rounded" for operands already rounded to TF32; 16-bit operands one MMA in
their own dtype, float32 accumulation), and the conversions the GPU and the interpreter must agree
on.  Under TRITON_INTERPRET=1 the MMAs' rounding is emulated, so CPU tests see the GPU's numbers.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def _tf32_round(x):
    """float32 rounded to TF32 (10 mantissa bits, round to nearest even): what the interpreter
    feeds its full-precision dot so it computes what the tensor cores do."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tf32_rna(x):
    """float32 rounded to TF32 on the GPU (cvt.rna, as cuBLAS and cuDNN convert): the tensor cores
    read a float32 operand's top 19 bits, i.e. truncate it, which on H200 put the error at 2.6x
    eager's TF32 error (7.7e-4 vs 2.9e-4 at every DLKUNet level, biased towards zero)."""
    return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _tf32(x):
    """float32 rounded to TF32 as the GPU's own MMA operand conversion rounds it."""
    if _INTERP:
        return _tf32_round(x)
    return _tf32_rna(x)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """x (float32) converted to dtype with round-to-nearest-even, as the GPU converts.  Triton 3.9's
    interpreter truncates float32 -> bfloat16 (twice the rounding error); round the bits first."""
    if _INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on tensor cores: float32 as TF32 or tf32x3 (PREC), 16-bit as one MMA."""
    if a.dtype == tl.float32:
        if _INTERP:
            # The interpreter ignores input_precision; emulate the MMAs the GPU runs.
            if PREC == "tf32":
                acc = tl.dot(_tf32_round(a), _tf32_round(b), acc)
            # tf32_rounded: the operands hold TF32 values already (a plain product is the MMA's);
            # not rounded here, so a kernel that failed to store them rounded shows in the tests.
            elif PREC == "tf32x3":
                a_hi = _tf32_round(a)
                b_hi = _tf32_round(b)
                acc = tl.dot(a_hi, _tf32_round(b - b_hi), acc)
                acc = tl.dot(_tf32_round(a - a_hi), b_hi, acc)
                acc = tl.dot(a_hi, b_hi, acc)
            else:
                acc = tl.dot(a, b, acc)
        elif PREC == "tf32":
            acc = tl.dot(_tf32_rna(a), _tf32_rna(b), acc, input_precision="tf32")
        elif PREC == "tf32_rounded":
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        if _INTERP:
            # Triton 3.9's interpreter multiplies the raw bits of bfloat16 operands; the upcast is
            # exact, so the product is the tensor cores' one.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
    return acc
