"""The tensor-core tile product of 16-bit tiles, shared by the Triton families, with the one
workaround it needs: Triton's interpreter (the CPU test path) multiplies bfloat16 tiles as their
raw bits, so there both operands are widened to float32 first (exactly, by their bits).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def bf16_widen(x):
    """bfloat16 tile x as fp32, exactly, by its bits."""
    return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def mma16(a, b, acc):
    """acc + a @ b for 16-bit tiles of one dtype, on tensor cores (fp32 accumulator)."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            a, b = bf16_widen(a), bf16_widen(b)
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc)
    return c
