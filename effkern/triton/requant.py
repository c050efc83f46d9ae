"""Triton helpers of dyadic requantisation, shared by every int8 GEMM family (int8_linear and
the shift and 2:4-sparse GEMMs after it): round-half-to-even(acc * m / 2^e), clamped to the
output's bits, exactly as effkern.ops.integer.ref_requantize_rows computes it in int64.

m and e are I-ViT's dyadic multiplier (m in [2^30, 2^31], e = 31 - exponent), computed on the
host from the scales; |acc * m| <= 2^62 fits int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


def out_range(out_bits: int) -> tuple[int, int]:
    """The signed ``out_bits`` range [lo, hi] the requantised values are clamped to."""
    return -(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1


@triton.jit
def round_shift_half_even(v, e):
    """round-half-to-even(v / 2^e) for int64 v and int64 shifts e (ref_round_shift_half_even):
    e <= 0 gives v (e == 0) or sign(v) * 2^62 (e < 0); e >= 63 gives 0."""
    es = tl.minimum(tl.maximum(e, 1), 62)
    q = v >> es
    rem = v - (q << es)  # in [0, 2^es)
    half = (es * 0 + 1) << (es - 1)
    round_up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    rounded = q + round_up.to(tl.int64)
    saturated = ((v > 0).to(tl.int64) - (v < 0).to(tl.int64)) << 62
    out = tl.where(e <= 0, tl.where(e == 0, v, saturated), rounded)
    return tl.where(e >= 63, 0, out)


@triton.jit
def requantize_tile(acc, m, e, OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    """clamp(round-half-even(acc * m / 2^e), OUT_LO, OUT_HI) in int64 (ref_requantize_rows)."""
    y = round_shift_half_even(acc.to(tl.int64) * m, e)
    return tl.minimum(tl.maximum(y, OUT_LO), OUT_HI)
