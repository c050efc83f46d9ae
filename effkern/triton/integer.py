"""Triton backend of the integer-only (I-ViT) row ops: Shiftmax, ShiftGELU, I-LayerNorm and
dyadic requantisation (the int8 GEMM is in :mod:`effkern.triton.int8_linear`).

Every kernel reproduces, bit for bit, the pure-torch reference of :mod:`effkern.ops.integer`
(``ref_*``); the host wrappers below take the same arguments as those reference functions, so
the scale-derived integer constants (x0, m, e, bias_int) are computed once, on the host, by the
op layer.

Integer semantics on the device. Triton's ``//`` and ``%`` on signed integers truncate toward
zero (C), not toward -inf (Python, torch's ``rounding_mode="floor"``), so every signed floor
division goes through :func:`_floor_div`. ``>>`` on signed integers is arithmetic (floor), as in
torch. Arithmetic is 32-bit wherever the host proves it exact (each kernel section says why):
the shift-exp when -x0 * 2^n <= 2^31 - 1 (always for Shiftmax, usually for ShiftGELU), its
division by the constant x0 as a multiply-high by a host-computed multiplier
(:func:`divide_magic`), the saturated row sums in uint32, I-LayerNorm's mean, variance and
Newton square root for int8 rows up to 33025 long. Elsewhere values that can leave int32 are
widened to int64 before the operation that could overflow; int64 wrap-around (``<<``, ``*``) is
two's complement, as in torch. Integer constants beyond int32 are never written as Python
literals (Triton would type 2^31 as uint32); they are built from int64 tensors by shifts, or
passed as int32 bit patterns (the magic multiplier) so that a kernel's scalar types never
change with their values.

Kernel structure.
* Row kernels (softmax, GELU, LayerNorm): a program owns ``ROWS`` rows. A row that fits one
  block (``BLOCK = next_power_of_2(L)`` up to :data:`MAX_ROW_BLOCK`) is processed in registers in
  one pass; short rows are packed several to a program (``ROWS * BLOCK`` about
  :data:`ROW_TILE` elements). Longer rows (ROWS = 1) loop over the row in chunks of ``BLOCK``:
  softmax max / sum of exps / recompute + write, GELU max / recompute + write, LayerNorm sum and
  sum of squares / write (var = sum(x^2) - 2 mu sum(x) + C mu^2, an exact integer identity).
  Wrappers accept ``block=`` to force a block size (tests use it to reach the chunked path on
  short rows cheaply).
* ``requantize``: 2-D tiles of ``[BLOCK_R, BLOCK_C]``, per-column (m, e) loaded once per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import INT32_MAX, int_dtype_for_bits
from effkern.triton.requant import out_range, requant_constants, requantize_epilogue
from effkern.triton.rows import rows_per_program

# Row kernels: the largest row kept in registers in one pass, the chunk of the chunked path,
# and the number of elements a program aims to own when it packs several short rows.
MAX_ROW_BLOCK = 4096
ROW_TILE = 2048

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
# int8 LayerNorm rows up to this length keep sum(y^2) <= C * 255^2 <= 2^31 - 2, so the mean,
# the variance and the Newton square root all run in int32 (33025 * 65025 = 2147450625).
_LN_INT32_MAX_C = 33025


# --------------------------------------------------------------------------------------------
# Host-computed constants
# --------------------------------------------------------------------------------------------


def divide_magic(b: int) -> tuple[int, int]:
    """(M, s) with floor(a / b) == umulhi(4 * a, M) >> s for every integer 0 <= a < 2^30.

    ``umulhi`` is the high word of the 64-bit product of two uint32; 1 <= b <= 2^31 - 1.
    Proof (Granlund-Montgomery): s = ceil(log2 b), so b <= 2^s, and M = ceil(2^(30+s) / b), so
    M * b = 2^(30+s) + eps with 0 <= eps < b. For a = q * b + r (0 <= r < b):
    a * M / 2^(30+s) = q + r / b + a * eps / (b * 2^(30+s)), and the last term is < 1 / b
    (a < 2^30, eps < 2^s), so the sum lies in [q, q + (r + 1) / b) subset [q, q + 1): its floor
    is q. umulhi(4a, M) >> s = floor(4 a M / 2^(32+s)) = floor(a M / 2^(30+s)) (4a < 2^32).
    M fits uint32: s = 0 (b = 1) gives M = 2^30; otherwise b > 2^(s-1), so M <= 2^31.
    """
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 2**31 - 1:
        raise ValueError(f"divide_magic: the divisor must be an int in [1, 2^31 - 1], got {b!r}")
    s = (b - 1).bit_length()
    return -(-(1 << (30 + s)) // b), s


def _as_int32_bits(v: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel scalars are then always i32)."""
    return v - 2**32 if v >= 2**31 else v


# --------------------------------------------------------------------------------------------
# Shared device helpers: one place for each integer idea
# --------------------------------------------------------------------------------------------


@triton.jit
def _floor_div(a, b):
    """floor(a / b) for signed integers (Triton's ``//`` truncates toward zero)."""
    q = a // b
    r = a - q * b
    return q - ((r != 0) & ((r < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _div_round_half_even(a, b):
    """round-half-to-even(a / b) for signed a and b > 0 (ref_div_round_half_even)."""
    q = _floor_div(a, b)
    twice_rem = 2 * (a - q * b)
    round_up = (twice_rem > b) | ((twice_rem == b) & ((q & 1) == 1))
    return q + round_up.to(q.dtype)


@triton.jit
def _shift_exp64(d, x0, nx0, n):
    """I-ViT's shift-based exponential (ref_shift_exp) of the integer tensor d, all in int64:
    any d, x0 and n the wrappers accept (GELU's shiftexp(-rowmax), whose shift exceeds n, and
    the GELU kernels whose exp terms exceed int32)."""
    d = d.to(tl.int64)
    p = d + (d >> 1) - (d >> 4)
    p = tl.maximum(p, nx0.to(tl.int64))
    xx0 = x0.to(tl.int64)
    q = _floor_div(p, xx0)
    r = p - xx0 * q
    shift = n - q  # >= 0 since p >= n * x0 and x0 < 0
    a = r - 2 * xx0
    e = (a << tl.minimum(shift, 31)) >> 1
    # shift >= 32: the value is >= 2^31; the reference returns exactly 2^31 there.
    two31 = (a * 0 + 1) << 31
    return tl.where(shift >= 32, two31, e)


@triton.jit
def _shift_exp32(d, b, nx0, n, magic, magic_shift):
    """ref_shift_exp in 32 bits, for int32 d <= 0 with d >= nx0 - 2 or |d| < 2^16; returns uint32.

    The host guarantees b = -x0 >= 1 and b * 2^n <= 2^31 - 1 (so |n * x0| < 2^30), and passes
    (magic, magic_shift) = divide_magic(b) (magic as int32 bits). Then every step is exact:
    * p = d + (d >> 1) - (d >> 4) fits int32 (|p| <= 1.4375 |d| + 1 < 2^31);
    * a = -max(p, n * x0) lies in [0, 2^30): floor(p / x0) = floor(a / b) = q, by divide_magic;
      q in [0, n] (d <= 0), so the shift n - q lies in [0, n];
    * r - 2 x0 = 2b - a + b q lies in (b, 2b], at most 2^32 - 2: exact in uint32 (wrapping
      intermediates cancel);
    * ((r - 2 x0) << shift) >> 1 <= b * 2^n <= 2^31 - 1, so the shifted value (< 2^32) never
      loses a bit in uint32.
    """
    p = d + (d >> 1) - (d >> 4)
    a = (-tl.maximum(p, nx0)).to(tl.uint32, bitcast=True)
    q = tl.umulhi(a << 2, magic.to(tl.uint32, bitcast=True)) >> magic_shift.to(tl.uint32)
    bu = b.to(tl.uint32, bitcast=True)
    u = bu * q + (2 * bu - a)
    return (u << (n.to(tl.uint32) - q)) >> 1


@triton.jit
def _sat_add(a, b):
    """min(a + b, 2^31 - 1) for uint32 a, b <= 2^31 - 1 (no wrap: a + b <= 2^32 - 2). Summing
    non-negative terms with it gives min(sum, 2^31 - 1), the saturated row sum of I-ViT."""
    return tl.minimum(a + b, _INT32_MAX)


@triton.jit
def _row_sum_sat(e):
    """min(sum over axis 1, 2^31 - 1) of uint32 terms <= 2^31 - 1, as [ROWS, 1] uint32. The
    reduction is an int64 tl.sum (exact: at most 2^12 * 2^31 per block), not tl.reduce with
    _sat_add, which Triton's interpreter runs element by element."""
    return tl.minimum(tl.sum(e.to(tl.int64), axis=1), _INT32_MAX).to(tl.uint32)[:, None]


@triton.jit
def _row_diff(xi, mx, mask):
    """x - rowmax for int32 x of a narrow dtype (|x - max| < 2^16); 0 where masked."""
    return tl.where(mask, xi - mx, 0)


@triton.jit
def _row_diff_clamped(xi, mx, nx0, mask, CLAMP: tl.constexpr):
    """x - rowmax in int32, 0 where masked. CLAMP (int32 inputs, where x - max can reach
    2^32 - 1): x is first raised to max + n * x0 - 2 (computed per row in int64, floored at
    -2^31). p(d) = d + (d >> 1) - (d >> 4) is non-decreasing and p(n x0 - 2) <= n x0, so every
    d below n x0 - 2 clamps to p = n x0 in the shift-exp anyway: the result is unchanged, and
    d = x - max then lies in [n x0 - 2, 0], inside int32."""
    if CLAMP:
        lo = tl.maximum(mx.to(tl.int64) + (nx0 - 2), _INT32_MIN).to(tl.int32)
        xi = tl.maximum(xi, lo)
    return tl.where(mask, xi - mx, 0)


# --------------------------------------------------------------------------------------------
# int_softmax (Shiftmax)
# --------------------------------------------------------------------------------------------
#
# All in 32 bits: the wrapper guarantees -x0 * 2^n <= 2^31 - 1 (the op's own limit), so every
# exp term fits 31 bits (_shift_exp32); the row sum saturates at 2^31 - 1 (_sat_add, uint32);
# f = floor((2^31 - 1) / s) and e * f <= 2^31 - 1 (e <= s when s is not saturated, f = 1 when
# it is).


@triton.jit
def _softmax_exp(xi, mx, mask, b, nx0, n, magic, magic_shift, CLAMP: tl.constexpr):
    d = _row_diff_clamped(xi, mx, nx0, mask, CLAMP)
    return tl.where(mask, _shift_exp32(d, b, nx0, n, magic, magic_shift), 0)


@triton.jit(do_not_specialize=["b", "nx0", "n", "magic", "magic_shift"])
def _int_softmax_kernel(x_ptr, y_ptr, R, L, b, nx0, n, magic, magic_shift,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                        CLAMP: tl.constexpr, OUT_SHIFT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * L
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        mask = row_mask & (cols < L)
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        mx = tl.max(tl.where(mask, xi, _INT32_MIN), axis=1)[:, None]
        e = _softmax_exp(xi, mx, mask, b, nx0, n, magic, magic_shift, CLAMP)
        s = _row_sum_sat(e)
        f = 2147483647 // tl.maximum(s, 1)  # s >= 1 on real rows; padding rows have s = 0
        tl.store(y_ptr + base + cols, ((e * f) >> OUT_SHIFT).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: row maximum.
        mx_acc = tl.full([ROWS, BLOCK], _INT32_MIN, tl.int32)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            mx_acc = tl.maximum(mx_acc, tl.where(mask, xi, _INT32_MIN))
        mx = tl.max(mx_acc, axis=1)[:, None]
        # Pass 2: the saturated sum of the exps.
        s_acc = tl.zeros([ROWS, BLOCK], dtype=tl.uint32)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            s_acc = _sat_add(s_acc, _softmax_exp(xi, mx, mask, b, nx0, n, magic, magic_shift, CLAMP))
        s = _row_sum_sat(s_acc)
        f = 2147483647 // tl.maximum(s, 1)
        # Pass 3: recompute the exps and write.
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            e = _softmax_exp(xi, mx, mask, b, nx0, n, magic, magic_shift, CLAMP)
            tl.store(y_ptr + base + start + cols, ((e * f) >> OUT_SHIFT).to(y_ptr.dtype.element_ty),
                     mask=mask)


# --------------------------------------------------------------------------------------------
# int_gelu (ShiftGELU)
# --------------------------------------------------------------------------------------------
#
# E32 (the host proved -x0 * 2^n <= 2^31 - 1): the per-element exp and the sigmoid run in 32
# bits; s = min(e + em, 2^31 - 1) with e, em <= 2^31 - 1 (em clamped first: min(e + em, C) is
# unchanged by clamping em at C) is a uint32 sum, f = floor((2^31 - 1) / s) a uint32 division
# (s >= 2), e * f <= 2^31 - 1, and x * sigmoid fits int32 (|x| <= 2^15, sigmoid < 2^15).
# Otherwise everything is int64, as the reference. shiftexp(-rowmax), whose shift can exceed
# n, is per-row work and always int64.


@triton.jit
def _gelu_values(xi, mx, em, mask, x0, nx0, n, magic, magic_shift, E32: tl.constexpr,
                 OUT_SHIFT: tl.constexpr):
    """I * sigmoid for one block: e = shiftexp(I - m), s = min(e + em, 2^31 - 1),
    f = floor((2^31 - 1) / s), sigmoid = (e * f) >> (32 - out_bits)."""
    if E32:
        e = _shift_exp32(_row_diff(xi, mx, mask), -x0, nx0, n, magic, magic_shift)
        s = _sat_add(e, tl.minimum(em, _INT32_MAX).to(tl.uint32))
        sigmoid = (e * (2147483647 // s)) >> OUT_SHIFT
        return xi * sigmoid.to(tl.int32)
    else:
        e = _shift_exp64(_row_diff(xi, mx, mask), x0, nx0, n)
        # e >= 1 and em >= 1 (the host bounds -x0 * 2^n), so 2 <= s <= 2^31 - 1: an int32 division.
        s = tl.minimum(e + em, _INT32_MAX).to(tl.int32)
        f = 2147483647 // s
        sigmoid = (e * f) >> OUT_SHIFT
        return (xi.to(tl.int64) * sigmoid).to(tl.int32)


@triton.jit(do_not_specialize=["x0", "nx0", "n", "magic", "magic_shift"])
def _int_gelu_kernel(x_ptr, y_ptr, R, L, x0, nx0, n, magic, magic_shift,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                     E32: tl.constexpr, OUT_SHIFT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * L
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        mask = row_mask & (cols < L)
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        mx = tl.max(tl.where(mask, xi, _INT32_MIN), axis=1)[:, None]
        mx = tl.where(row_mask, mx, 0)  # padding rows: keep -m in range
        em = _shift_exp64(-mx, x0, nx0, n)
        y = _gelu_values(xi, mx, em, mask, x0, nx0, n, magic, magic_shift, E32, OUT_SHIFT)
        tl.store(y_ptr + base + cols, y, mask=mask)
    else:
        mx_acc = tl.full([ROWS, BLOCK], _INT32_MIN, tl.int32)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            mx_acc = tl.maximum(mx_acc, tl.where(mask, xi, _INT32_MIN))
        mx = tl.max(mx_acc, axis=1)[:, None]
        mx = tl.where(row_mask, mx, 0)
        em = _shift_exp64(-mx, x0, nx0, n)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            y = _gelu_values(xi, mx, em, mask, x0, nx0, n, magic, magic_shift, E32, OUT_SHIFT)
            tl.store(y_ptr + base + start + cols, y, mask=mask)


# --------------------------------------------------------------------------------------------
# int_layernorm (I-LayerNorm)
# --------------------------------------------------------------------------------------------
#
# I32 (int8 rows, C <= _LN_INT32_MAX_C): |x - mu| <= 255 (mu, a rounded mean, lies between the
# row's min and max), so var = sum((x - mu)^2) <= C * 255^2 <= 2^31 - 2 and the Newton steps
# k + floor(var / k) <= max(var + 1, 2^17) stay in int32; the chunked path's
# sum(x^2) - 2 mu sum(x) + C mu^2 may wrap in between but its value is var (exact mod 2^32).
# Otherwise (int16) in int64. Either way y * f (f <= 2^31 - 1) is a 32 x 32 -> 64-bit product
# and the output keeps its low 32 bits, as the reference's cast to int32 does.


@triton.jit
def _layernorm_finish(var, iters):
    """f = floor((2^31 - 1) / k), k the integer Newton square root of var after ``iters`` steps
    (var >= 0, k >= 1: truncating division is floor). Per-row work, in var's dtype."""
    k = var * 0 + 65536
    for _ in range(iters):
        k = (k + var // k) >> 1
    return (2147483647 // k).to(tl.int32)


@triton.jit
def _layernorm_out(y, f, bias):
    """low 32 bits of ((y * f) >> 1) + bias (the reference's int64 result cast to int32)."""
    return ((y.to(tl.int64) * f.to(tl.int64)) >> 1).to(tl.int32) + bias


@triton.jit(do_not_specialize=["iters"])
def _int_layernorm_kernel(x_ptr, bias_ptr, y_ptr, R, C, iters,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          I32: tl.constexpr):
    acc_ty: tl.constexpr = tl.int32 if I32 else tl.int64
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        col_mask = cols < C
        mask = row_mask & col_mask
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        mu = _div_round_half_even(tl.sum(xi.to(acc_ty), axis=1)[:, None], C)
        y = tl.where(mask, xi - mu.to(tl.int32), 0)
        if I32:
            var = tl.sum(y * y, axis=1)[:, None]  # a sum of squares, not a mean (I-ViT)
        else:
            var = tl.sum((y * y).to(tl.uint32, bitcast=True).to(tl.int64), axis=1)[:, None]  # y^2 < 2^32
        f = _layernorm_finish(var, iters)
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0)
        tl.store(y_ptr + base + cols, _layernorm_out(y, f, bias), mask=mask)
    else:
        s1 = tl.zeros([ROWS, BLOCK], dtype=acc_ty)
        s2 = tl.zeros([ROWS, BLOCK], dtype=acc_ty)
        for start in range(0, C, BLOCK):
            mask = row_mask & (start + cols < C)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            s1 += xi.to(acc_ty)
            s2 += (xi * xi).to(acc_ty)  # x^2 <= 2^30
        total = tl.sum(s1, axis=1)[:, None]
        mu = _div_round_half_even(total, C)
        # sum((x - mu)^2) = sum(x^2) - 2 mu sum(x) + C mu^2, exact in integers.
        var = tl.sum(s2, axis=1)[:, None] - 2 * mu * total + C * mu * mu
        f = _layernorm_finish(var, iters)
        mu32 = mu.to(tl.int32)
        for start in range(0, C, BLOCK):
            col_mask = start + cols < C
            mask = row_mask & col_mask
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            bias = tl.load(bias_ptr + start + cols, mask=col_mask, other=0)
            tl.store(y_ptr + base + start + cols, _layernorm_out(xi - mu32, f, bias), mask=mask)


# --------------------------------------------------------------------------------------------
# requantize
# --------------------------------------------------------------------------------------------


@triton.jit
def _requantize_kernel(x_ptr, m_ptr, e_ptr, m_val, e_val, y_ptr, R, C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CONSTS: tl.constexpr,
                       EPILOGUE: tl.constexpr, OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    # A 1-D grid (no 65535 limit on any axis), column tiles fastest. The epilogue is int8_linear's
    # (requant.py): 32-bit where exact, chosen on the host when it holds the constants.
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(C, BLOCK_C)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32)
    y = requantize_epilogue(x, m_ptr, e_ptr, m_val, e_val, cols, col_mask, CONSTS, EPILOGUE, OUT_LO, OUT_HI)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host wrappers (same arguments as the ref_* functions of effkern.ops.integer)
# --------------------------------------------------------------------------------------------


def _check_rows(op: str, x: Tensor, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [rows, row length], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: x must have dtype {names}, got {str(x.dtype).removeprefix('torch.')}")
    return x.contiguous()


def _check_int(op: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {value}")
    return value


def _row_config(rows: int, length: int, block: int | None, itemsize: int = 1) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK, ONE_PASS, num_warps) for a row kernel over ``rows`` rows of ``length``
    (the layout rule: :func:`effkern.triton.rows.rows_per_program`)."""
    if block is None:
        block = max(16, triton.next_power_of_2(length))
        block = min(block, MAX_ROW_BLOCK)
    elif block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block}")
    n_rows, num_warps = rows_per_program(rows, length, block, itemsize, ROW_TILE)
    return n_rows, block, length <= block, num_warps


def _shift_exp_args(op: str, x0: int, n: int, e_limit: int) -> tuple[int, bool, int, int]:
    """Validated shift-exp scalars: (n * x0, E32, magic, magic_shift).

    x0 = floor(-1/S) < 0; ``e_limit`` bounds the largest exp term -x0 * 2^n (the caller's
    overflow limit). E32: -x0 * 2^n <= 2^31 - 1, so the exps run in 32 bits with the division
    by x0 done by divide_magic's multiplier (magic as int32 bits; (0, 0) when unused).
    """
    _check_int(op, "x0", x0, hi=-1)
    _check_int(op, "n", n, 0, 62)
    if -x0 * 2**n > e_limit:
        limit = "2^31 - 1" if e_limit == INT32_MAX else f"2^{e_limit.bit_length() - 1}"
        raise ValueError(f"{op}: -x0 * 2^n = {-x0 * 2**n} exceeds {limit} (the exp terms would overflow)")
    e32 = -x0 * 2**n <= INT32_MAX
    magic, magic_shift = divide_magic(-x0) if e32 else (0, 0)
    return n * x0, e32, _as_int32_bits(magic), magic_shift


def int_softmax_rows(x: Tensor, x0: int, n: int, out_bits: int, *, block: int | None = None) -> Tensor:
    """Shiftmax over each row of the 2-D int8/int16/int32 tensor x (ref_int_softmax_rows)."""
    op = "int_softmax_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16, torch.int32))
    if out_bits not in (8, 16):  # the op's limit: the output dtype is int8 or int16
        raise ValueError(f"{op}: out_bits must be 8 or 16, got {out_bits!r}")
    # The op's limit -x0 * 2^n <= 2^31 - 1 (beyond it outputs would overflow) makes E32 certain.
    nx0, _, magic, magic_shift = _shift_exp_args(op, x0, n, INT32_MAX)
    r, length = x.shape
    y = torch.empty((r, length), dtype=int_dtype_for_bits(out_bits), device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, length, block, x.element_size())
    _int_softmax_kernel[(triton.cdiv(r, rows),)](
        x, y, r, length, -x0, nx0, n, magic, magic_shift,
        ROWS=rows, BLOCK=block, ONE_PASS=one_pass, CLAMP=x.dtype == torch.int32,
        OUT_SHIFT=32 - out_bits, num_warps=warps)
    return y


def int_gelu_rows(x: Tensor, x0: int, n: int, out_bits: int, *, block: int | None = None) -> Tensor:
    """ShiftGELU over each row of the 2-D int8/int16 tensor x (ref_int_gelu_rows); int32 out."""
    op = "int_gelu_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16))
    _check_int(op, "out_bits", out_bits, 2, 16)  # the op's limit
    # 2^56 keeps every exp term (and shiftexp(-max), whose shift exceeds n) inside int64; the
    # op's own check (I * sigmoid within int32) is stricter: -x0 * 2^n < 2^54.
    nx0, e32, magic, magic_shift = _shift_exp_args(op, x0, n, 2**56)
    r, length = x.shape
    y = torch.empty((r, length), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, length, block, x.element_size())
    _int_gelu_kernel[(triton.cdiv(r, rows),)](
        x, y, r, length, x0, nx0, n, magic, magic_shift,
        ROWS=rows, BLOCK=block, ONE_PASS=one_pass, E32=e32, OUT_SHIFT=32 - out_bits,
        num_warps=warps)
    return y


def int_layernorm_rows(x: Tensor, bias_int: Tensor, iters: int, *, block: int | None = None) -> Tensor:
    """I-LayerNorm over each row of the 2-D int8/int16 tensor x (ref_int_layernorm_rows)."""
    op = "int_layernorm_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16))
    # k starts at 2^16 and at worst halves (var = 0): more than 16 steps could divide by zero.
    _check_int(op, "iters", iters, 0, 16)
    r, c = x.shape
    bias_int = _check_columns(op, "bias_int", bias_int, c, torch.int32, x.device)
    y = torch.empty((r, c), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, c, block, x.element_size())
    _int_layernorm_kernel[(triton.cdiv(r, rows),)](
        x, bias_int, y, r, c, iters, ROWS=rows, BLOCK=block, ONE_PASS=one_pass,
        I32=x.dtype == torch.int8 and c <= _LN_INT32_MAX_C, num_warps=warps)
    return y


def _check_columns(op: str, name: str, t: Tensor, columns: int, dtype: torch.dtype, device) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != (columns,):
        raise ValueError(f"{op}: {name} must be a {str(dtype).removeprefix('torch.')} tensor of shape "
                         f"({columns},), got {t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
    # Already on the device: no copy (a host -> device copy of pageable memory can synchronise).
    return (t if t.device == torch.device(device) else t.to(device)).contiguous()


def requantize_rows(x: Tensor, m: Tensor, e: Tensor, out_bits: int, host_epilogue: bool = True) -> Tensor:
    """clamp(round-half-even(x * m / 2^e)) per column (ref_requantize_rows).

    m, e: int64 of shape (C,) per column or (1,) per tensor, I-ViT's dyadic constants
    (0 <= m <= 2^31). On the host, the host picks the 32-bit or int64 form (per-tensor ones
    become two scalar arguments); on the device the kernel picks it per tile, without a sync.
    host_epilogue: False leaves the choice to the kernel for host constants too (tests use it).
    """
    op = "requantize_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16, torch.int32))
    _check_int(op, "out_bits", out_bits, 2, 32)
    r, c = x.shape
    m, e, m_val, e_val, consts, epilogue = requant_constants(op, m, e, c, x.device, host_epilogue)
    y = torch.empty((r, c), dtype=int_dtype_for_bits(out_bits), device=x.device)
    if y.numel() == 0:
        return y
    block_c = min(256, max(16, triton.next_power_of_2(c)))
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(r)))
    lo, hi = out_range(out_bits)
    grid = (triton.cdiv(r, block_r) * triton.cdiv(c, block_c),)
    _requantize_kernel[grid](x, y if m is None else m, y if e is None else e, m_val, e_val, y, r, c,
                             BLOCK_R=block_r, BLOCK_C=block_c, CONSTS=consts, EPILOGUE=epilogue,
                             OUT_LO=lo, OUT_HI=hi, num_warps=max(1, min(8, block_r * block_c // 512)))
    return y
