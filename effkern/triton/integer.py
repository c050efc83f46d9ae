"""Triton backend of the integer-only (I-ViT) row ops: Shiftmax, ShiftGELU, I-LayerNorm and
dyadic requantisation (the int8 GEMM is in :mod:`effkern.triton.int8_linear`).

Every kernel reproduces, bit for bit, the pure-torch reference of :mod:`effkern.ops.integer`
(``ref_*``); the host wrappers below take the same arguments as those reference functions, so
the scale-derived integer constants (x0, m, e, bias_int) are computed once, on the host, by the
op layer.

Integer semantics on the device. Triton's ``//`` and ``%`` on signed integers truncate toward
zero (C), not toward -inf (Python, torch's ``rounding_mode="floor"``), so every signed floor
division goes through :func:`_floor_div`. ``>>`` on signed integers is arithmetic (floor), as in
torch. Values that can leave int32 are widened to int64 before the operation that could
overflow; int64 wrap-around (``<<``, ``*``) is two's complement, as in torch. Integer constants
beyond int32 are never written as Python literals (Triton would type 2^31 as uint32); they are
built from int64 tensors by shifts.

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
from effkern.triton.requant import out_range, requantize_tile

# Row kernels: the largest row kept in registers in one pass, the chunk of the chunked path,
# and the number of elements a program aims to own when it packs several short rows.
MAX_ROW_BLOCK = 4096
ROW_TILE = 2048

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_INT32_MIN = tl.constexpr(-(2**31))
# The shift-exp's division runs in int32 when the clamped argument p, x0 and 2 * x0 provably fit.
_DIV32_LIMIT = 2**31 - 2**17


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
def _shift_exp(d, x0, nx0, n, DIV32: tl.constexpr):
    """I-ViT's shift-based exponential (ref_shift_exp) of the integer tensor d; returns int64.

    nx0 = n * x0 (computed on the host). DIV32: the host proved that n * x0, x0 and 2 * x0 fit
    int32, so the clamped argument and the division run in int32; otherwise all in int64.
    """
    p = d + (d >> 1) - (d >> 4)
    p = tl.maximum(p, nx0)
    if DIV32:
        p = p.to(tl.int32)
        xx0 = x0.to(tl.int32)
    else:
        p = p.to(tl.int64)
        xx0 = x0.to(tl.int64)
    q = _floor_div(p, xx0)
    r = p - xx0 * q
    shift = n - q  # >= 0 since p >= n * x0 and x0 < 0
    a = (r - 2 * xx0).to(tl.int64)
    e = (a << tl.minimum(shift, 31).to(tl.int64)) >> 1
    # shift >= 32: the value is >= 2^31; the reference returns exactly 2^31 there.
    two31 = (a * 0 + 1) << 31
    return tl.where(shift >= 32, two31, e)


@triton.jit
def _row_diff(xi, mx, mask, D64: tl.constexpr):
    """x - rowmax (int64 when x is int32: the difference can reach 2^32 - 1); 0 where masked."""
    if D64:
        d = xi.to(tl.int64) - mx.to(tl.int64)
    else:
        d = xi - mx
    return tl.where(mask, d, 0)


# --------------------------------------------------------------------------------------------
# int_softmax (Shiftmax)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["x0", "nx0", "n"])
def _int_softmax_kernel(x_ptr, y_ptr, R, L, x0, nx0, n,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                        D64: tl.constexpr, DIV32: tl.constexpr, OUT_SHIFT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * L
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        mask = row_mask & (cols < L)
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        mx = tl.max(tl.where(mask, xi, _INT32_MIN), axis=1)[:, None]
        e = tl.where(mask, _shift_exp(_row_diff(xi, mx, mask, D64), x0, nx0, n, DIV32), 0)
        s = tl.minimum(tl.sum(e, axis=1)[:, None], 2147483647)
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
        # Pass 2: sum of the exps (int64; saturated at 2^31 - 1 after the whole row).
        s_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            e = _shift_exp(_row_diff(xi, mx, mask, D64), x0, nx0, n, DIV32)
            s_acc += tl.where(mask, e, 0)
        s = tl.minimum(tl.sum(s_acc, axis=1)[:, None], 2147483647)
        f = 2147483647 // tl.maximum(s, 1)
        # Pass 3: recompute the exps and write.
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            e = _shift_exp(_row_diff(xi, mx, mask, D64), x0, nx0, n, DIV32)
            tl.store(y_ptr + base + start + cols, ((e * f) >> OUT_SHIFT).to(y_ptr.dtype.element_ty),
                     mask=mask)


# --------------------------------------------------------------------------------------------
# int_gelu (ShiftGELU)
# --------------------------------------------------------------------------------------------


@triton.jit
def _gelu_values(xi, mx, em, mask, x0, nx0, n, DIV32: tl.constexpr, OUT_SHIFT: tl.constexpr):
    """I * sigmoid for one block: e = shiftexp(I - m), s = min(e + em, 2^31 - 1),
    f = floor((2^31 - 1) / s), sigmoid = (e * f) >> (32 - out_bits)."""
    e = _shift_exp(_row_diff(xi, mx, mask, False), x0, nx0, n, DIV32)
    # e >= 1 and em >= 1 (the host bounds -x0 * 2^n), so 2 <= s <= 2^31 - 1: an int32 division.
    s = tl.minimum(e + em, 2147483647).to(tl.int32)
    f = 2147483647 // tl.maximum(s, 1)
    sigmoid = (e * f) >> OUT_SHIFT
    return (xi.to(tl.int64) * sigmoid).to(tl.int32)


@triton.jit(do_not_specialize=["x0", "nx0", "n"])
def _int_gelu_kernel(x_ptr, y_ptr, R, L, x0, nx0, n,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                     DIV32: tl.constexpr, OUT_SHIFT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * L
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        mask = row_mask & (cols < L)
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        mx = tl.max(tl.where(mask, xi, _INT32_MIN), axis=1)[:, None]
        mx = tl.where(row_mask, mx, 0)  # padding rows: keep -m in range
        em = _shift_exp(-mx, x0, nx0, n, DIV32)
        y = _gelu_values(xi, mx, em, mask, x0, nx0, n, DIV32, OUT_SHIFT)
        tl.store(y_ptr + base + cols, y, mask=mask)
    else:
        mx_acc = tl.full([ROWS, BLOCK], _INT32_MIN, tl.int32)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            mx_acc = tl.maximum(mx_acc, tl.where(mask, xi, _INT32_MIN))
        mx = tl.max(mx_acc, axis=1)[:, None]
        mx = tl.where(row_mask, mx, 0)
        em = _shift_exp(-mx, x0, nx0, n, DIV32)
        for start in range(0, L, BLOCK):
            mask = row_mask & (start + cols < L)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int32)
            y = _gelu_values(xi, mx, em, mask, x0, nx0, n, DIV32, OUT_SHIFT)
            tl.store(y_ptr + base + start + cols, y, mask=mask)


# --------------------------------------------------------------------------------------------
# int_layernorm (I-LayerNorm)
# --------------------------------------------------------------------------------------------


@triton.jit
def _layernorm_finish(var, iters):
    """f = floor((2^31 - 1) / k), k the integer Newton square root of var after ``iters`` steps."""
    k = var * 0 + 65536
    for _ in range(iters):
        k = (k + var // k) >> 1  # var >= 0, k >= 1: truncation is floor
    return 2147483647 // k


@triton.jit(do_not_specialize=["iters"])
def _int_layernorm_kernel(x_ptr, bias_ptr, y_ptr, R, C, iters,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        col_mask = cols < C
        mask = row_mask & col_mask
        xi = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.int64)
        mu = _div_round_half_even(tl.sum(xi, axis=1)[:, None], C)
        y = tl.where(mask, xi - mu, 0)
        var = tl.sum(y * y, axis=1)[:, None]  # a sum of squares, not a mean (I-ViT)
        f = _layernorm_finish(var, iters)
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0).to(tl.int64)
        tl.store(y_ptr + base + cols, (((y * f) >> 1) + bias).to(tl.int32), mask=mask)
    else:
        s1 = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
        s2 = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
        for start in range(0, C, BLOCK):
            mask = row_mask & (start + cols < C)
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int64)
            s1 += xi
            s2 += xi * xi
        total = tl.sum(s1, axis=1)[:, None]
        mu = _div_round_half_even(total, C)
        # sum((x - mu)^2) = sum(x^2) - 2 mu sum(x) + C mu^2, exact in integers.
        var = tl.sum(s2, axis=1)[:, None] - 2 * mu * total + C * mu * mu
        f = _layernorm_finish(var, iters)
        for start in range(0, C, BLOCK):
            col_mask = start + cols < C
            mask = row_mask & col_mask
            xi = tl.load(x_ptr + base + start + cols, mask=mask, other=0).to(tl.int64)
            bias = tl.load(bias_ptr + start + cols, mask=col_mask, other=0).to(tl.int64)
            tl.store(y_ptr + base + start + cols, ((((xi - mu) * f) >> 1) + bias).to(tl.int32), mask=mask)


# --------------------------------------------------------------------------------------------
# requantize
# --------------------------------------------------------------------------------------------


@triton.jit
def _requantize_kernel(x_ptr, m_ptr, e_ptr, y_ptr, R, C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       OUT_LO: tl.constexpr, OUT_HI: tl.constexpr):
    # A 1-D grid (no 65535 limit on any axis), column tiles fastest.
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(C, BLOCK_C)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    m = tl.load(m_ptr + cols, mask=col_mask, other=0)[None, :]
    e = tl.load(e_ptr + cols, mask=col_mask, other=0)[None, :]
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    y = requantize_tile(x, m, e, OUT_LO, OUT_HI)
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


def _row_config(rows: int, length: int, block: int | None) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK, ONE_PASS, num_warps) for a row kernel over ``rows`` rows of ``length``."""
    if block is None:
        block = max(16, triton.next_power_of_2(length))
        block = min(block, MAX_ROW_BLOCK)
    elif block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block}")
    one_pass = length <= block
    n_rows = 1
    if one_pass:
        n_rows = max(1, min(ROW_TILE // block, triton.next_power_of_2(rows)))
    num_warps = max(1, min(8, (n_rows * block) // 512))
    return n_rows, block, one_pass, num_warps


def _shift_exp_args(op: str, x0: int, n: int) -> tuple[int, bool]:
    """Validated (n * x0, DIV32) for the shift-exp kernels."""
    _check_int(op, "x0", x0, hi=-1)  # x0 = floor(-1/S) < 0
    _check_int(op, "n", n, 0, 62)
    nx0 = n * x0
    div32 = -x0 < 2**30 and -nx0 <= _DIV32_LIMIT
    return nx0, div32


def int_softmax_rows(x: Tensor, x0: int, n: int, out_bits: int, *, block: int | None = None) -> Tensor:
    """Shiftmax over each row of the 2-D int8/int16/int32 tensor x (ref_int_softmax_rows)."""
    op = "int_softmax_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16, torch.int32))
    if out_bits not in (8, 16):  # the op's limit: the output dtype is int8 or int16
        raise ValueError(f"{op}: out_bits must be 8 or 16, got {out_bits!r}")
    nx0, div32 = _shift_exp_args(op, x0, n)
    if -x0 * 2**n > INT32_MAX:
        raise ValueError(f"{op}: -x0 * 2^n = {-x0 * 2**n} exceeds 2^31 - 1 (the exp terms would overflow)")
    r, length = x.shape
    y = torch.empty((r, length), dtype=int_dtype_for_bits(out_bits), device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, length, block)
    _int_softmax_kernel[(triton.cdiv(r, rows),)](
        x, y, r, length, x0, nx0, n,
        ROWS=rows, BLOCK=block, ONE_PASS=one_pass, D64=x.dtype == torch.int32, DIV32=div32,
        OUT_SHIFT=32 - out_bits, num_warps=warps)
    return y


def int_gelu_rows(x: Tensor, x0: int, n: int, out_bits: int, *, block: int | None = None) -> Tensor:
    """ShiftGELU over each row of the 2-D int8/int16 tensor x (ref_int_gelu_rows); int32 out."""
    op = "int_gelu_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16))
    _check_int(op, "out_bits", out_bits, 2, 16)  # the op's limit
    nx0, div32 = _shift_exp_args(op, x0, n)
    # Keeps every exp term (and shiftexp(-max), whose shift exceeds n) inside int64; the op's
    # own check (I * sigmoid within int32) is stricter: -x0 * 2^n < 2^54.
    if -x0 * 2**n > 2**56:
        raise ValueError(f"{op}: -x0 * 2^n = {-x0 * 2**n} exceeds 2^56 (the exp terms would overflow)")
    r, length = x.shape
    y = torch.empty((r, length), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, length, block)
    _int_gelu_kernel[(triton.cdiv(r, rows),)](
        x, y, r, length, x0, nx0, n,
        ROWS=rows, BLOCK=block, ONE_PASS=one_pass, DIV32=div32, OUT_SHIFT=32 - out_bits,
        num_warps=warps)
    return y


def int_layernorm_rows(x: Tensor, bias_int: Tensor, iters: int, *, block: int | None = None) -> Tensor:
    """I-LayerNorm over each row of the 2-D int8/int16 tensor x (ref_int_layernorm_rows)."""
    op = "int_layernorm_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16))
    # k starts at 2^16 and at worst halves (var = 0): more than 16 steps could divide by zero.
    _check_int(op, "iters", iters, 0, 16)
    r, c = x.shape
    if not isinstance(bias_int, Tensor) or bias_int.dtype != torch.int32 or tuple(bias_int.shape) != (c,):
        raise ValueError(f"{op}: bias_int must be an int32 tensor of shape ({c},)")
    bias_int = bias_int.to(x.device).contiguous()
    y = torch.empty((r, c), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y
    rows, block, one_pass, warps = _row_config(r, c, block)
    _int_layernorm_kernel[(triton.cdiv(r, rows),)](
        x, bias_int, y, r, c, iters, ROWS=rows, BLOCK=block, ONE_PASS=one_pass, num_warps=warps)
    return y


def _check_columns(op: str, name: str, t: Tensor, columns: int, dtype: torch.dtype, device) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != (columns,):
        raise ValueError(f"{op}: {name} must be a {str(dtype).removeprefix('torch.')} tensor of shape "
                         f"({columns},), got {t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
    return t.to(device).contiguous()


def requantize_rows(x: Tensor, m: Tensor, e: Tensor, out_bits: int) -> Tensor:
    """clamp(round-half-even(x * m / 2^e)) per column (ref_requantize_rows)."""
    op = "requantize_rows"
    x = _check_rows(op, x, (torch.int8, torch.int16, torch.int32))
    _check_int(op, "out_bits", out_bits, 2, 32)
    r, c = x.shape
    m = _check_columns(op, "m", m, c, torch.int64, x.device)
    e = _check_columns(op, "e", e, c, torch.int64, x.device)
    y = torch.empty((r, c), dtype=int_dtype_for_bits(out_bits), device=x.device)
    if y.numel() == 0:
        return y
    block_c = min(256, max(16, triton.next_power_of_2(c)))
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(r)))
    lo, hi = out_range(out_bits)
    grid = (triton.cdiv(r, block_r) * triton.cdiv(c, block_c),)
    _requantize_kernel[grid](x, m, e, y, r, c, BLOCK_R=block_r, BLOCK_C=block_c, OUT_LO=lo, OUT_HI=hi,
                             num_warps=max(1, min(8, block_r * block_c // 512)))
    return y
