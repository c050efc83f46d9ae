"""The Triton backend of the integer-only (I-ViT) ops against the pure-torch reference, bit for bit.

Runs on CUDA when available, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set before Python starts); skipped otherwise. Outputs are allocated by the wrappers with
``torch.empty``, which every test here poisons with random bytes, so an element a kernel fails
to write shows up as a mismatch; ``test_every_element_is_written`` makes that certain with two
complementary fill patterns.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tests.triton_helpers import GarbageBytes, PoisonedEmpty, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

import effkern  # noqa: E402  (after the skip)
from effkern import _requant as rq  # noqa: E402
from effkern.ops import integer as ref  # noqa: E402
from effkern.triton import int8_linear as tri_linear  # noqa: E402
from effkern.triton import integer as tri  # noqa: E402

INT32_MAX = 2**31 - 1
INT_RANGE = {torch.int8: (-128, 127), torch.int16: (-(2**15), 2**15 - 1), torch.int32: (-(2**31), 2**31 - 1)}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def poison(monkeypatch, gen) -> GarbageBytes:
    """torch.empty poisoned for the whole test: int8/int16/int32 tensors come back filled with
    garbage bytes (random, or a fixed byte pattern once the test sets ``poison.pattern``)."""
    p = GarbageBytes(gen, dtypes=tuple(INT_RANGE))
    monkeypatch.setattr(torch, "empty", PoisonedEmpty(p))
    return p


def rand_int(shape, lo: int, hi: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    """Uniform integers in [lo, hi] (inclusive) as ``dtype`` on DEVICE."""
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(dtype).to(DEVICE)


def rand_rows(r: int, length: int, dtype: torch.dtype, gen: torch.Generator, spread: int | None = None):
    """Random rows: even rows over the dtype's full range, odd rows within ``spread`` of 0 (where
    the exps / sigmoids are non-trivial)."""
    lo, hi = INT_RANGE[dtype]
    x = rand_int((r, length), lo, hi, gen)
    if spread is not None and r > 1:
        s = min(spread, hi)
        x[1::2] = rand_int((len(range(1, r, 2)), length), -s, s, gen)
    return x.to(dtype)


def assert_same(out: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if not torch.equal(out, expected):
        bad = (out.to(torch.int64) != expected.to(torch.int64)).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} of {out.numel()} elements differ; first at {i}: "
                             f"got {out[i].item()}, expected {expected[i].item()}")


# Shapes of the row tests: empty batch, single elements, odd lengths, one block, just past one.
ROW_SHAPES = [(0, 5), (1, 1), (3, 2), (5, 3), (3, 197), (1, 785), (2, 4096), (2, 4097)]

# (x0, n, out_bits) for Shiftmax: -x0 * 2^n <= 2^31 - 1 (the op's constraint).
SOFTMAX_PARAMS = [(-1, 15, 8), (-3, 23, 16), (-100, 15, 8), (-10000, 15, 16), (-20, 7, 8), (-255, 23, 8)]

# (x0, n, out_bits) for ShiftGELU, including saturated sigmoids (large -x0 * 2^n).
GELU_PARAMS = [(-1, 23, 8), (-3, 23, 16), (-100, 15, 8), (-10000, 23, 8), (-20, 7, 2), (-5, 30, 16)]


# --------------------------------------------------------------------------------------------
# int_softmax_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_softmax_random(shape, dtype, gen):
    for x0, n, out_bits in SOFTMAX_PARAMS:
        x = rand_rows(*shape, dtype, gen, spread=2 * n * -x0)
        assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits),
                    f"x0={x0} n={n} out_bits={out_bits}")


def test_softmax_long_row(gen):
    x = rand_rows(3, 20000, torch.int8, gen, spread=60)
    for x0, n, out_bits in [(-20, 15, 8), (-1, 23, 16)]:
        assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits))


@pytest.mark.parametrize("block", [4, 16, 64, 256])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 197), (2, 785)])
def test_softmax_forced_block(shape, block, gen):
    """Small blocks reach the chunked path (and several rows per program) on short rows."""
    x = rand_rows(*shape, torch.int16, gen, spread=400)
    assert_same(tri.int_softmax_rows(x, -7, 15, 8, block=block), ref.ref_int_softmax_rows(x, -7, 15, 8))


def _extreme_rows(dtype: torch.dtype, length: int) -> torch.Tensor:
    lo, hi = INT_RANGE[dtype]
    rows = [
        torch.full((length,), lo), torch.full((length,), hi), torch.zeros(length, dtype=torch.int64),
        torch.tensor([lo, hi] * length)[:length], torch.tensor([hi] + [lo] * (length - 1)),
        torch.full((length,), -3),
    ]
    return torch.stack(rows).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("length", [1, 3, 785, 4097])
def test_softmax_extremes(dtype, length):
    """All-equal rows (the row sum saturates at 2^31 - 1 for long flat rows), dtype min/max."""
    x = _extreme_rows(dtype, length)
    for x0, n, out_bits in [(-1, 15, 8), (-100, 15, 16), (-10000, 15, 8), (-255, 23, 16)]:
        assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits),
                    f"x0={x0} n={n} out_bits={out_bits}")


def test_softmax_int32_full_span(gen):
    """int32 rows spanning +-2^31: x - max reaches 2^32 - 1 and must be taken in int64."""
    x = rand_int((4, 301), -(2**31), 2**31 - 1, gen, torch.int32)
    x[:, 0] = -(2**31)
    x[:, 1] = 2**31 - 1
    x[1, 2:] = 2**31 - 1 - rand_int((299,), 0, 3000, gen, torch.int32)
    for x0, n, out_bits in [(-1, 15, 8), (-1000, 15, 16)]:
        assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits))


@pytest.mark.parametrize("x0, n", [(-(2**31 - 1), 0), (-(2**30 - 1), 1), (-(2**30), 0)])
def test_softmax_int64_division_path(x0, n, gen):
    """x0 so large that the shift-exp's division cannot run in int32."""
    x = torch.cat([rand_rows(3, 197, torch.int32, gen), rand_int((2, 197), -3 * 2**30, 0, gen).clamp(min=-(2**31))
                   .to(torch.int32)])
    for out_bits in (8, 16):
        assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits))


def test_softmax_rejects_bad_arguments():
    x = torch.zeros(2, 3, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="x0"):
        tri.int_softmax_rows(x, 0, 15, 8)
    with pytest.raises(ValueError, match="2\\^31"):
        tri.int_softmax_rows(x, -(2**17), 15, 8)
    with pytest.raises(TypeError, match="dtype"):
        tri.int_softmax_rows(x.float(), -1, 15, 8)
    with pytest.raises(ValueError, match="2-D"):
        tri.int_softmax_rows(x[0], -1, 15, 8)
    with pytest.raises(ValueError, match="block"):
        tri.int_softmax_rows(x, -1, 15, 8, block=24)
    with pytest.raises(ValueError, match="out_bits must be 8 or 16"):  # the op's limit, not another
        tri.int_softmax_rows(x, -1, 15, 12)


# --------------------------------------------------------------------------------------------
# The 32-bit shift-exp: divide_magic and the edges of its range
# --------------------------------------------------------------------------------------------

MAGIC_A_MAX = 2**30 - 1  # divide_magic's dividend range is [0, 2^30)


def _magic_quotients(a: torch.Tensor, b: int) -> torch.Tensor:
    """umulhi(4a, M) >> s on int64 tensors (4a * M < 2^63: exact), as the kernels compute it."""
    m, s = tri.divide_magic(b)
    assert 0 < m < 2**32 and 0 <= s <= 31
    return ((4 * a * m) >> 32) >> s


def _divisors() -> list[int]:
    powers = [2**k + d for k in range(1, 31) for d in (-1, 0, 1)] + [2**31 - 1, 2**31 - 2]
    return sorted(set(range(1, 300)) | {b for b in powers if 1 <= b <= 2**31 - 1} | {3**k for k in range(1, 20)})


def test_divide_magic_every_divisor_at_the_edges(gen):
    """floor(a / b) for divisors 1..299, powers of two and their neighbours, powers of three, up
    to 2^31 - 1: a at 0, around every multiple of b near both ends of the range, at 2^30 - 1,
    and at random."""
    for b in _divisors():
        k_top = MAGIC_A_MAX // b
        ks = torch.tensor(sorted({0, 1, 2, 3, max(k_top - 2, 0), max(k_top - 1, 0), k_top}), dtype=torch.int64)
        near = (ks[:, None] * b + torch.tensor([-1, 0, 1])[None, :]).reshape(-1)
        a = torch.cat([near, torch.tensor([0, 1, MAGIC_A_MAX - 1, MAGIC_A_MAX]),
                       torch.randint(0, MAGIC_A_MAX + 1, (512,), generator=gen)])
        a = a[(a >= 0) & (a <= MAGIC_A_MAX)]
        assert torch.equal(_magic_quotients(a, b), torch.div(a, b, rounding_mode="floor")), f"b={b}"


@pytest.mark.parametrize("b", [1, 2, 3, 7, 13, 100, 2000, 2**15 - 1, 2**16 + 1, 2**30 - 1, 2**31 - 1])
def test_divide_magic_exhaustive_low_range(b):
    """Every a in [0, 2^22) and the last 2^20 values below 2^30."""
    for lo, hi in ((0, 2**22), (2**30 - 2**20, 2**30)):
        a = torch.arange(lo, hi, dtype=torch.int64)
        assert torch.equal(_magic_quotients(a, b), torch.div(a, b, rounding_mode="floor")), f"b={b}"


def test_divide_magic_rejects_bad_divisors():
    for b in (0, -3, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="divisor"):
            tri.divide_magic(b)


def _largest_x0(n: int, limit: int = INT32_MAX) -> int:
    """The x0 with the largest |x0| such that -x0 * 2^n <= limit."""
    return -(limit >> n)


EDGE_LENGTHS = [1, 3, 197, 785, 5000]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_softmax_32bit_edges(dtype, length, gen):
    """x0 at both ends of the 32-bit range for n = 0, 1, 15, 30 (largest exp term 2^31 - 1 or just
    below), rows of extreme values and random rows spanning the clamp at n * x0."""
    x = torch.cat([_extreme_rows(dtype, length), rand_rows(2, length, dtype, gen, spread=5000)])
    for n in (0, 1, 15, 30):
        for x0 in sorted(v for v in {-1, -7, -max(1, (INT32_MAX >> n) // 3), _largest_x0(n)} if v >= _largest_x0(n)):
            for out_bits in (8, 16):
                assert_same(tri.int_softmax_rows(x, x0, n, out_bits), ref.ref_int_softmax_rows(x, x0, n, out_bits),
                            f"x0={x0} n={n} out_bits={out_bits}")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_gelu_32bit_edges(dtype, length, gen):
    """The 32-bit path at its edge (-x0 * 2^n = 2^31 - 1 or just below) and the int64 path just past
    it, with saturating sums (e + em) and negative row maxima."""
    lo, _ = INT_RANGE[dtype]
    negative = rand_int((1, length), lo, -1, gen).to(dtype)
    x = torch.cat([_extreme_rows(dtype, length), rand_rows(2, length, dtype, gen, spread=3000), negative])
    for n in (1, 15, 23):
        for x0 in (-1, _largest_x0(n), _largest_x0(n) - 1):
            for out_bits in (2, 8, 16):
                assert_same(tri.int_gelu_rows(x, x0, n, out_bits), ref.ref_int_gelu_rows(x, x0, n, out_bits),
                            f"x0={x0} n={n} out_bits={out_bits}")


@pytest.mark.parametrize("c", [33025, 33026])
def test_layernorm_int32_limit(c, gen):
    """int8 rows at the int32 path's limit (C = 33025: var <= C * 255^2 <= 2^31 - 2) and one past
    it (int64), with the largest variances: half -128 and half 127, and random full-range rows."""
    half = torch.tensor([-128, 127] * c)[:c]
    x = torch.stack([half, half.flip(0), torch.full((c,), -128)]).to(torch.int8).to(DEVICE)
    x = torch.cat([x, rand_rows(1, c, torch.int8, gen)])
    bias = rand_int((c,), -(2**30), 2**30, gen, torch.int32)
    for iters in (0, 10, 16):
        assert_same(tri.int_layernorm_rows(x, bias, iters), ref.ref_int_layernorm_rows(x, bias, iters),
                    f"iters={iters}")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_layernorm_edges(dtype, length, gen):
    x = torch.cat([_extreme_rows(dtype, length), rand_rows(2, length, dtype, gen)])
    bias = rand_int((length,), -(2**31), 2**31 - 1, gen, torch.int32)  # the output wraps, as the reference
    for iters in (0, 10, 16):
        assert_same(tri.int_layernorm_rows(x, bias, iters), ref.ref_int_layernorm_rows(x, bias, iters),
                    f"iters={iters}")


# --------------------------------------------------------------------------------------------
# int_gelu_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_gelu_random(shape, dtype, gen):
    for x0, n, out_bits in GELU_PARAMS:
        x = rand_rows(*shape, dtype, gen, spread=12 * -x0)
        assert_same(tri.int_gelu_rows(x, x0, n, out_bits), ref.ref_int_gelu_rows(x, x0, n, out_bits),
                    f"x0={x0} n={n} out_bits={out_bits}")


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 197)])
def test_gelu_forced_block(shape, block, gen):
    x = rand_rows(*shape, torch.int8, gen, spread=40)
    assert_same(tri.int_gelu_rows(x, -4, 23, 8, block=block), ref.ref_int_gelu_rows(x, -4, 23, 8))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("length", [1, 3, 785, 4097])
def test_gelu_extremes(dtype, length, gen):
    """Flat rows, dtype min/max, and rows whose maximum is negative: shiftexp(-max) then has a
    shift beyond n, up to and past 32 (where the reference returns 2^31)."""
    lo, _ = INT_RANGE[dtype]
    negative = torch.stack([rand_int((length,), lo, lo // 2, gen), rand_int((length,), -60, -1, gen)])
    x = torch.cat([_extreme_rows(dtype, length), negative.to(dtype)])
    for x0, n, out_bits in [(-1, 23, 8), (-3, 15, 16), (-100, 23, 8), (-10000, 23, 4)]:
        assert_same(tri.int_gelu_rows(x, x0, n, out_bits), ref.ref_int_gelu_rows(x, x0, n, out_bits),
                    f"x0={x0} n={n} out_bits={out_bits}")


@pytest.mark.parametrize("x0, n", [(-(2**31), 1), (-(2**40), 10), (-(2**30), 23)])
def test_gelu_int64_division_path(x0, n, gen):
    x = torch.cat([rand_rows(3, 197, torch.int16, gen, spread=3000), _extreme_rows(torch.int16, 197)])
    for out_bits in (2, 8):
        assert_same(tri.int_gelu_rows(x, x0, n, out_bits), ref.ref_int_gelu_rows(x, x0, n, out_bits))


def test_gelu_rejects_bad_arguments():
    x = torch.zeros(2, 3, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="x0"):
        tri.int_gelu_rows(x, 1, 23, 8)
    with pytest.raises(ValueError, match="2\\^56"):
        tri.int_gelu_rows(x, -(2**40), 23, 8)
    with pytest.raises(TypeError, match="dtype"):
        tri.int_gelu_rows(x.to(torch.int32), -1, 23, 8)


# --------------------------------------------------------------------------------------------
# int_layernorm_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_layernorm_random(shape, dtype, gen):
    r, c = shape
    x = rand_rows(r, c, dtype, gen, spread=50)
    bias = rand_int((c,), -(2**30), 2**30, gen, torch.int32)
    for iters in (0, 10, 16):
        assert_same(tri.int_layernorm_rows(x, bias, iters), ref.ref_int_layernorm_rows(x, bias, iters),
                    f"iters={iters}")


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 197)])
def test_layernorm_forced_block(shape, block, gen):
    r, c = shape
    x = rand_rows(r, c, torch.int16, gen, spread=300)
    bias = rand_int((c,), -(2**30), 2**30, gen, torch.int32)
    assert_same(tri.int_layernorm_rows(x, bias, 10, block=block), ref.ref_int_layernorm_rows(x, bias, 10))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("length", [1, 2, 785, 4097])
def test_layernorm_extremes(dtype, length, gen):
    """Flat rows (var = 0: k halves every step), dtype min/max, mean rounding ties."""
    ties = torch.tensor([0, 1] * length)[:length] + rand_int((1,), -50, 50, gen).cpu()
    x = torch.cat([_extreme_rows(dtype, length), ties.to(dtype).to(DEVICE)[None]])
    bias = rand_int((length,), -(2**30), 2**30, gen, torch.int32)
    for iters in (0, 1, 10, 16):
        assert_same(tri.int_layernorm_rows(x, bias, iters), ref.ref_int_layernorm_rows(x, bias, iters),
                    f"iters={iters}")


@pytest.mark.parametrize("block", [None, 4])
def test_layernorm_small_variance(block, gen):
    """Many rows with var in 0..~100, so the integer square root crosses perfect squares: an
    off-by-one in var (e.g. in the chunked path's sum(x^2) - 2 mu sum(x) + C mu^2) shows up."""
    x = rand_int((96, 9), -3, 3, gen, torch.int8) + rand_int((96, 1), -100, 100, gen, torch.int8)
    bias = rand_int((9,), -(2**30), 2**30, gen, torch.int32)
    for iters in (10, 16):
        assert_same(tri.int_layernorm_rows(x, bias, iters, block=block), ref.ref_int_layernorm_rows(x, bias, iters),
                    f"iters={iters}")


def test_layernorm_rejects_bad_arguments():
    x = torch.zeros(2, 3, dtype=torch.int8, device=DEVICE)
    bias = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="iters"):
        tri.int_layernorm_rows(x, bias, 17)
    with pytest.raises(ValueError, match="bias_int"):
        tri.int_layernorm_rows(x, bias[:2], 10)
    with pytest.raises(TypeError, match="dtype"):
        tri.int_layernorm_rows(x.to(torch.int32), bias, 10)


# --------------------------------------------------------------------------------------------
# requantize_rows
# --------------------------------------------------------------------------------------------

ODD_SHIFTS = [-2, 0, 1, 31, 40, 62, 63, 70]


@pytest.mark.parametrize("host_epilogue", [True, False], ids=["host-chosen", "kernel-chosen"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (3, 5), (5, 197), (33, 300)])
def test_requantize_random(shape, dtype, host_epilogue, gen):
    """Per-column and per-tensor constants, in the 32-bit range (realistic shifts), outside it
    (odd shifts: e <= 0, e >= 63, 31, and a tile mixing both) and at m = 2^31; the epilogue
    picked on the host (constants on the CPU) or per tile in the kernel."""
    r, c = shape
    x = rand_rows(r, c, dtype, gen, spread=1000)
    m = rand_int((c,), 2**30, 2**31, gen)
    m[::4] = 2**31
    for out_bits in (2, 8, 16, 32):
        realistic = rand_int((c,), 20, 45, gen)
        odd = torch.tensor(ODD_SHIFTS, device=DEVICE)[rand_int((c,), 0, len(ODD_SHIFTS) - 1, gen)]
        for e in (realistic, odd):
            assert_same(tri.requantize_rows(x, m, e, out_bits, host_epilogue=host_epilogue),
                        rq.ref_requantize_rows(x, m, e, out_bits), f"out_bits={out_bits}")
        for shift in (int(realistic[0]), 63, 0):
            m1, e1 = m[:1], torch.tensor([shift], device=DEVICE)
            assert_same(tri.requantize_rows(x, m1, e1, out_bits, host_epilogue=host_epilogue),
                        rq.ref_requantize_rows(x, m1, e1, out_bits), f"per tensor e={shift} out_bits={out_bits}")


def test_requantize_exact_ties(gen):
    """x * m / 2^e lands exactly on .5 (m = odd * 2^(e-1), x odd), positive and negative."""
    shifts = [1, 2, 3, 17, 31, 40, 61, 62]
    c = 4 * len(shifts)
    e = torch.tensor(shifts * 4, device=DEVICE)
    odd = torch.where(e >= 60, 1, rand_int((c,), 0, 2, gen) * 2 + 1)  # 1, 3 or 5; m < 2^63
    m = odd << (e - 1)
    # keep |x * m| <= 2^62
    limit = torch.clamp((2**62) // m, max=2**31 - 1)
    x = (torch.rand((64, c), generator=gen).to(DEVICE) * 2 - 1) * limit
    x = x.to(torch.int64)
    x[32:40] = torch.arange(-4, 4, device=DEVICE)[:, None]  # -2.5 ... 1.5 and friends
    x = torch.minimum(torch.maximum(x, 1 - limit), limit - 1)
    x[:32] = x[:32] | 1  # odd: exact ties (|x| stays <= limit)
    x = x.to(torch.int32)
    assert bool(((x.to(torch.int64) * m).abs() <= 2**62).all())
    for out_bits in (8, 16, 32):
        expected = rq.ref_requantize_rows(x, m, e, out_bits)
        assert_same(tri.requantize_rows(x, m, e, out_bits), expected, f"out_bits={out_bits}")
    # the ties really are ties and went to even
    halves = rq.ref_requantize_rows(torch.tensor([[-5, -3, -1, 1, 3, 5]], dtype=torch.int32, device=DEVICE),
                                     torch.ones(6, dtype=torch.int64, device=DEVICE),
                                     torch.ones(6, dtype=torch.int64, device=DEVICE), 8)
    assert halves.tolist() == [[-2, -2, 0, 0, 2, 2]]


@pytest.mark.parametrize("out_bits", [2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32])
def test_requantize_every_width(out_bits, gen):
    x = rand_rows(7, 33, torch.int32, gen, spread=2**20)
    m = rand_int((33,), 2**30, 2**31, gen)
    e = torch.tensor(ODD_SHIFTS * 5, device=DEVICE)[:33]
    e[::3] = rand_int((11,), 28, 50, gen)
    assert_same(tri.requantize_rows(x, m, e, out_bits), rq.ref_requantize_rows(x, m, e, out_bits))


# --------------------------------------------------------------------------------------------
# int8_linear_rows
# --------------------------------------------------------------------------------------------

LINEAR_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 17, 197), (197, 384, 384), (64, 1536, 384), (5, 3, 4096)]


def _scales(n: int, per_channel: bool, k: int, gen: torch.Generator, weird: bool = False):
    cols = n if per_channel else 1
    m = rand_int((cols,), 2**30, 2**31, gen)
    # put the typical |acc| ~ 74^2 sqrt(K) near the top of the output range, some saturating
    base = max(1, int(74 * 74 * k**0.5)).bit_length() + 31
    e = rand_int((cols,), base - 12, base - 2, gen)
    if weird and per_channel:
        e[: min(n, len(ODD_SHIFTS))] = torch.tensor(ODD_SHIFTS[: min(n, len(ODD_SHIFTS))], device=DEVICE)
    return m.expand(n).contiguous(), e.expand(n).contiguous()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_int8_linear(shape, with_bias, gen):
    mm, n, k = shape
    x = rand_int((mm, k), -128, 127, gen, torch.int8)
    w = rand_int((n, k), -128, 127, gen, torch.int8)
    bias = None
    if with_bias:
        bias = rand_int((n,), -(2**31), 2**31 - 1, gen, torch.int32)
        bias[::4] = rand_int((len(range(0, n, 4)),), -(2**20), 2**20, gen, torch.int32)
        bias[1::5] = INT32_MAX  # saturating adds
    assert_same(tri_linear.int8_linear_rows(x, w, bias, None, None, 8), rq.ref_int_gemm_rows(x, w, bias, None, None, 8),
                "int32 accumulator")
    for per_channel, out_bits in [(False, 8), (True, 8), (True, 16), (False, 32), (True, 32)]:
        m, e = _scales(n, per_channel, k, gen, weird=out_bits == 16)
        assert_same(tri_linear.int8_linear_rows(x, w, bias, m, e, out_bits), rq.ref_int_gemm_rows(x, w, bias, m, e, out_bits),
                    f"per_channel={per_channel} out_bits={out_bits}")


def test_int8_linear_extremes(gen):
    """acc at its extremes (all -128: +2^14 per product) plus a saturating bias."""
    k = 4096
    x = torch.full((3, k), -128, dtype=torch.int8, device=DEVICE)
    x[1] = 127
    w = torch.full((5, k), -128, dtype=torch.int8, device=DEVICE)
    w[2] = 127
    bias = torch.tensor([INT32_MAX, -(2**31), 0, 2**30, -(2**30)], dtype=torch.int32, device=DEVICE)
    m, e = _scales(5, True, k, gen, weird=True)
    for b in (None, bias):
        assert_same(tri_linear.int8_linear_rows(x, w, b, None, None, 8), rq.ref_int_gemm_rows(x, w, b, None, None, 8))
        for out_bits in (8, 32):
            assert_same(tri_linear.int8_linear_rows(x, w, b, m, e, out_bits), rq.ref_int_gemm_rows(x, w, b, m, e, out_bits))


def test_int8_linear_empty_and_bad_arguments():
    x = torch.zeros(0, 16, dtype=torch.int8, device=DEVICE)
    w = torch.ones(4, 16, dtype=torch.int8, device=DEVICE)
    assert tri_linear.int8_linear_rows(x, w, None, None, None, 8).shape == (0, 4)
    x = torch.ones(2, 16, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="w must be"):
        tri_linear.int8_linear_rows(x, w[:, :8], None, None, None, 8)
    with pytest.raises(ValueError, match="both m and e"):
        tri_linear.int8_linear_rows(x, w, None, torch.ones(4, dtype=torch.int64, device=DEVICE), None, 8)
    with pytest.raises(ValueError, match="bias"):
        tri_linear.int8_linear_rows(x, w, torch.ones(4, dtype=torch.int64, device=DEVICE), None, None, 8)
    big = torch.zeros(1, 2**17, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="K="):
        tri_linear.int8_linear_rows(big, torch.zeros(1, 2**17, dtype=torch.int8, device=DEVICE), None, None, None, 8)


# --------------------------------------------------------------------------------------------
# Every element is written; the public ops reach these kernels
# --------------------------------------------------------------------------------------------


def test_every_element_is_written(poison, gen):
    """Run each wrapper twice, its output pre-filled with complementary byte patterns: an element
    the kernel did not write would differ between the two runs (and from the reference)."""
    x8 = rand_rows(5, 197, torch.int8, gen, spread=40)
    x32 = rand_rows(5, 197, torch.int32, gen, spread=2**20)
    bias = rand_int((197,), -(2**30), 2**30, gen, torch.int32)
    m = rand_int((197,), 2**30, 2**31, gen)
    e = rand_int((197,), 30, 45, gen)
    w = rand_int((197, 197), -128, 127, gen, torch.int8)
    cases = [
        (lambda: tri.int_softmax_rows(x8, -5, 15, 8), ref.ref_int_softmax_rows(x8, -5, 15, 8)),
        (lambda: tri.int_softmax_rows(x8, -5, 15, 16, block=64), ref.ref_int_softmax_rows(x8, -5, 15, 16)),
        (lambda: tri.int_gelu_rows(x8, -4, 23, 8), ref.ref_int_gelu_rows(x8, -4, 23, 8)),
        (lambda: tri.int_gelu_rows(x8, -4, 23, 8, block=64), ref.ref_int_gelu_rows(x8, -4, 23, 8)),
        (lambda: tri.int_layernorm_rows(x8, bias, 10), ref.ref_int_layernorm_rows(x8, bias, 10)),
        (lambda: tri.int_layernorm_rows(x8, bias, 10, block=64), ref.ref_int_layernorm_rows(x8, bias, 10)),
        (lambda: tri.requantize_rows(x32, m, e, 8), rq.ref_requantize_rows(x32, m, e, 8)),
        (lambda: tri.requantize_rows(x32, m, e, 32), rq.ref_requantize_rows(x32, m, e, 32)),
        (lambda: tri_linear.int8_linear_rows(x8, w, bias, m, e, 16), rq.ref_int_gemm_rows(x8, w, bias, m, e, 16)),
        (lambda: tri_linear.int8_linear_rows(x8, w, None, None, None, 8), rq.ref_int_gemm_rows(x8, w, None, None, None, 8)),
    ]
    for i, (run, expected) in enumerate(cases):
        for pattern in (0x5A, 0xA5):
            poison.pattern = pattern
            assert_same(run(), expected, f"case {i}, fill 0x{pattern:02X}")


def test_public_ops_on_triton_backend(gen):
    """The public ops, forced onto the triton backend, agree with the torch backend."""
    x = rand_int((2, 3, 197), -128, 127, gen, torch.int8)
    xs = rand_int((2, 3, 385), -300, 300, gen, torch.int16)
    w = rand_int((96, 197), -128, 127, gen, torch.int8)
    bias = rand_int((96,), -(2**20), 2**20, gen, torch.int32)
    weight = torch.rand(385, generator=gen).to(DEVICE) + 0.5
    ln_bias = torch.randn(385, generator=gen).to(DEVICE)
    rq_scale = torch.rand(385, generator=gen).to(DEVICE) + 0.1
    calls = [
        lambda: effkern.ops.int_softmax(x, 0.05),
        lambda: effkern.ops.int_softmax(xs, 0.01, out_bits=16, n=23),
        lambda: effkern.ops.int_gelu(x, 0.04),
        lambda: effkern.ops.int_layernorm(xs, weight, ln_bias),
        lambda: effkern.ops.requantize(xs, 0.013, rq_scale, out_bits=8),
        lambda: effkern.ops.int8_linear(x, w, bias, in_scale=1e-4, out_scale=0.02),
        lambda: effkern.ops.int8_linear(x, w, bias),
    ]
    for i, call in enumerate(calls):
        with effkern.backend("triton"):
            got = call()
        with effkern.backend("torch"):
            want = call()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert_same(got[0], want[0], f"call {i}")
        for g, w_ in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w_, rtol=0, atol=0)
