"""Triton helpers of dyadic requantisation, shared by every int8 GEMM family (int8_linear and
the shift and 2:4-sparse GEMMs after it): round-half-to-even(acc * m / 2^e), clamped to the
output's bits, exactly as effkern._requant.ref_requantize_rows computes it in int64.

m and e are I-ViT's dyadic multiplier (m in [2^30, 2^31], e = 31 - exponent), computed on the
host from the scales; |acc * m| <= 2^62 fits int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import int_dtype_for_bits, to_device_async


def out_range(out_bits: int) -> tuple[int, int]:
    """The signed ``out_bits`` range [lo, hi] the requantised values are clamped to."""
    return -(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1


@triton.jit
def round_shift_half_even(v, e):
    """round-half-to-even(v / 2^e) for int64 |v| <= 2^62 and int64 shifts e
    (ref_round_shift_half_even): e <= 0 gives v (e == 0) or sign(v) * 2^62 (e < 0); e >= 63
    gives 0. For 1 <= e <= 62 it is floor((v + 2^(e-1) - 1 + p) / 2^e), p = bit e of v (the
    parity of floor(v / 2^e)): a remainder above half rounds up, exactly half rounds up iff the
    quotient is odd; the sum stays below 2^62 + 2^61 (no wrap)."""
    es = tl.minimum(tl.maximum(e, 1), 62)
    p = (v >> es) & 1
    rounded = (v + (((es * 0 + 1) << (es - 1)) - 1 + p)) >> es
    saturated = ((v > 0).to(tl.int64) - (v < 0).to(tl.int64)) << 62
    out = tl.where(e <= 0, tl.where(e == 0, v, saturated), rounded)
    return tl.where(e >= 63, 0, out)


@triton.jit
def requantize_tile(acc, m, e, OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    """clamp(round-half-even(acc * m / 2^e), OUT_LO, OUT_HI) in int64 (ref_requantize_rows)."""
    y = round_shift_half_even(acc.to(tl.int64) * m, e)
    return tl.minimum(tl.maximum(y, OUT_LO), OUT_HI)


# --------------------------------------------------------------------------------------------
# The same requantisation in 32-bit arithmetic, exact on a proven range of (m, e)
# --------------------------------------------------------------------------------------------
#
# For int32 acc, 0 <= m <= 2^31 and 33 <= e' <= 62, where (m', e') = (2^30, e - 1) if m = 2^31
# else (m, e) (the same ratio, and m' < 2^31 fits int32): every realistic int8/int16
# requantisation (ratio m / 2^e below 2^-1). requantize_tile's result is then computed from the
# two 32-bit halves of v = acc * m' (one 32 x 32 -> 64-bit multiply, IMAD.WIDE), in int32:
#   |v| <= 2^31 * (2^31 - 1) < 2^62, so v = hi * 2^32 + lo, hi in [-2^30, 2^30), lo in [0, 2^32);
#   round-half-even(v / 2^e') = floor((v + 2^(e'-1) - 1 + p) / 2^e'), p = bit e' of v (the
#   parity of floor(v / 2^e')): a remainder above half rounds up, exactly half rounds up iff the
#   quotient is odd. With t = e' - 32 in [1, 30]: p = (hi >> t) & 1 (lo < 2^32 cannot reach bit
#   e'); 2^(e'-1) - 1 = (2^(t-1) - 1) * 2^32 + (2^32 - 1), so the high word of the numerator is
#   hi + (2^(t-1) - 1) + carry, carry = [lo + 2^32 - 1 + p >= 2^32] = [(lo | p) != 0], and
#   floor(numerator / 2^e') = (hi + 2^(t-1) - 1 + carry) >> t (floor of a floor). That sum is in
#   [-2^30, 2^30 + 2^29]: no wrap; the result's magnitude is at most 2^62 / 2^33 + 1 < 2^31.

E_FAST_LO, E_FAST_HI, M_FAST_HI = 33, 62, 2**31  # the range, for host code
_E_LO, _E_HI, _M_HI = tl.constexpr(E_FAST_LO), tl.constexpr(E_FAST_HI), tl.constexpr(M_FAST_HI)


def requant_i32_host(m: int, e: int) -> tuple[int, int] | None:
    """(m', t - 1) for requantize_tile_i32 if (m, e) is in its exact range, else None (host ints)."""
    if not 0 <= m <= M_FAST_HI:
        return None
    if m == M_FAST_HI:
        m, e = m // 2, e - 1
    return (m, e - E_FAST_LO) if E_FAST_LO <= e <= E_FAST_HI else None


@triton.jit
def requant_i32_in_range(m, e):
    """Whether requantize_tile_i32 is exact for (m, e) (int64, any shape; see above)."""
    e1 = e - (m == _M_HI).to(tl.int64)
    return (m >= 0) & (m <= _M_HI) & (e1 >= _E_LO) & (e1 <= _E_HI)


@triton.jit
def requant_i32_constants(m, e):
    """(m', t - 1) as int32 for requantize_tile_i32, from int64 (m, e) in its range."""
    top = m == _M_HI
    return tl.where(top, m >> 1, m).to(tl.int32), (e - top.to(tl.int64) - _E_LO).to(tl.int32)


@triton.jit
def requantize_tile_i32(acc, m1, t1, OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    """clamp(round-half-even(acc * m / 2^e), OUT_LO, OUT_HI) for int32 acc in int32 arithmetic
    but one widening multiply: equal to requantize_tile whenever requant_i32_in_range(m, e) (the
    proof above). (m1, t1) = requant_i32_constants(m, e), scalars or broadcastable to acc."""
    v = acc.to(tl.int64) * m1.to(tl.int64)  # int32 x int32 -> int64: a single IMAD.WIDE
    hi = (v >> 32).to(tl.int32)
    lo = v.to(tl.int32)
    t = t1 + 1
    carry = ((lo | ((hi >> t) & 1)) != 0).to(tl.int32)
    y = (hi + ((1 << t1) - 1) + carry) >> t
    return tl.minimum(tl.maximum(y, OUT_LO), OUT_HI)


_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def saturating_add_i32(a, b):
    """saturate_int32(a + b) in int32 (an int32 GEMM's bias): the wrapped sum overflowed iff a
    and b share a sign that the sum does not have; it then saturates towards b's sign."""
    s = a + b
    overflow = ((a ^ s) & (b ^ s)) < 0
    return tl.where(overflow, tl.where(b < 0, _INT32_MIN, _INT32_MAX), s)


# --------------------------------------------------------------------------------------------
# The epilogue of every int32 tile (int8_linear, requantize): which form runs, and where its
# constants come from
# --------------------------------------------------------------------------------------------

# CONSTS: where the requantisation constants come from.
PER_COLUMN, PER_TENSOR_PTR, PER_TENSOR_VALUES = 0, 1, 2
# EPILOGUE: which requantisation runs; AUTO decides per tile, in the kernel, without a sync.
AUTO, INT32, INT64 = 0, 1, 2


@triton.jit
def requantize_epilogue(acc, m_ptr, e_ptr, m_val, e_val, offs_n, n_mask, CONSTS: tl.constexpr,
                        EPILOGUE: tl.constexpr, OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    """The int32 tile ``acc`` (columns ``offs_n``) requantised, in 32-bit arithmetic when every
    (m, e) it uses is in the range where that is exact (above), else in int64; int32 out. The
    host decides when it knows the constants (EPILOGUE = INT32 / INT64: one path compiled);
    with device constants (AUTO) the kernel does, by a branch uniform over the tile. Per-tensor constants are scalars (no
    per-column registers); PER_TENSOR_VALUES passes them as arguments. With INT32 the host has
    already turned them into requant_i32_constants (int32 m', t - 1)."""
    if CONSTS == 2:
        if EPILOGUE == 1:
            out = requantize_tile_i32(acc, m_val, e_val, OUT_LO, OUT_HI)
        else:
            out = requantize_tile(acc, m_val.to(tl.int64), e_val.to(tl.int64), OUT_LO, OUT_HI).to(tl.int32)
    else:
        if CONSTS == 1:
            m = tl.load(m_ptr)
            e = tl.load(e_ptr)
        else:  # masked columns read in-range values: they never send a tile to the int64 path
            m = tl.load(m_ptr + offs_n, mask=n_mask, other=2**30)[None, :]
            e = tl.load(e_ptr + offs_n, mask=n_mask, other=0 if EPILOGUE == 1 else 40)[None, :]
        if EPILOGUE == 1:  # the host prepared int32 (m', t - 1): int32 loads keep the multiply 32 x 32
            out = requantize_tile_i32(acc, m, e, OUT_LO, OUT_HI)
        elif EPILOGUE == 2:
            out = requantize_tile(acc, m, e, OUT_LO, OUT_HI).to(tl.int32)
        else:
            in_range = requant_i32_in_range(m, e)
            if CONSTS == 0:
                fast = tl.min(tl.min(in_range.to(tl.int32), axis=1), axis=0) == 1
            else:
                fast = in_range
            if fast:
                m32, t1 = requant_i32_constants(m, e)
                out = requantize_tile_i32(acc, m32, t1, OUT_LO, OUT_HI)
            else:
                out = requantize_tile(acc, m, e, OUT_LO, OUT_HI).to(tl.int32)
    return out


def requant_constants(op: str, m: Tensor, e: Tensor, n: int, device, on_host: bool):
    """(m, e, m_val, e_val, CONSTS, EPILOGUE) for the kernel, without a device sync.

    m, e have shape (N,) per column or (1,) per tensor. Constants on the CPU (as the op layer
    makes them) are range-checked here: per-tensor ones become scalar arguments (no copy to the
    device at all), and one epilogue is compiled. Device constants are left to the kernel (AUTO).
    """
    for name, t in (("m", m), ("e", e)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) not in ((n,), (1,)):
            raise ValueError(f"{op}: {name} must be an int64 tensor of shape ({n},) or (1,), got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
    per_tensor = m.numel() == 1 and e.numel() == 1
    if on_host and m.device.type == "cpu" and e.device.type == "cpu":
        top = (m == M_FAST_HI).to(torch.int64)
        fast = bool(((m >= 0) & (m <= M_FAST_HI) & (e - top >= E_FAST_LO) & (e - top <= E_FAST_HI)).all())
        epilogue = INT32 if fast else INT64
        if per_tensor:
            mv, ev = int(m), int(e)
            if fast:  # requant_i32_constants on the host
                mv, ev = requant_i32_host(mv, ev)
            return None, None, mv, ev, PER_TENSOR_VALUES, epilogue
        if fast:  # requant_i32_constants on the host, as int32 vectors
            m, e = torch.where(top == 1, m // 2, m).to(torch.int32), (e - top - E_FAST_LO).to(torch.int32)
    else:
        epilogue = AUTO
    if not per_tensor:
        m, e = m.expand(n), e.expand(n)
    consts = PER_TENSOR_PTR if per_tensor else PER_COLUMN
    return to_device_async(m.contiguous(), device), to_device_async(e.contiguous(), device), 0, 0, consts, epilogue


def epilogue_args(op: str, m: Tensor | None, e: Tensor | None, n: int, out_bits: int, device, host_epilogue: bool):
    """The kernel arguments of an int32 GEMM's epilogue: (m, e, m_val, e_val, CONSTS, EPILOGUE,
    OUT_LO, OUT_HI, output dtype); without (m, e) the int32 output of the bias alone (the
    per-tensor 32-bit form, nothing to load)."""
    if (m is None) != (e is None):
        raise ValueError(f"{op}: give both m and e, or neither")
    if m is None:
        return None, None, 0, 0, PER_TENSOR_VALUES, INT32, *out_range(32), torch.int32
    if isinstance(out_bits, bool) or not isinstance(out_bits, int) or not 2 <= out_bits <= 32:
        raise ValueError(f"{op}: out_bits must be in [2, 32], got {out_bits}")
    m, e, m_val, e_val, consts, epilogue = requant_constants(op, m, e, n, device, host_epilogue)
    return m, e, m_val, e_val, consts, epilogue, *out_range(out_bits), int_dtype_for_bits(out_bits)
