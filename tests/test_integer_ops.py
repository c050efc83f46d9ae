"""The integer-only (I-ViT) ops: reference semantics, every backend against the reference
(bit-exact), torch.library contract (opcheck, torch.compile) and input validation."""

from fractions import Fraction

import numpy as np
import pytest
import torch

import effkern
from effkern.ops import int8_linear, int_gelu, int_layernorm, int_softmax, requantize
from effkern import _requant as rq
from effkern.ops import integer as ki
from tests import ivit_transcription as ivit
from tests.conftest import DEVICE, require_backend

from effkern._dispatch import BACKENDS
INT_RANGES = {torch.int8: (-128, 127), torch.int16: (-(2**15), 2**15 - 1), torch.int32: (-(2**31), 2**31 - 1)}


def randint(gen, shape, dtype, lo=None, hi=None, device="cpu"):
    lo = INT_RANGES[dtype][0] if lo is None else lo
    hi = INT_RANGES[dtype][1] if hi is None else hi
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(dtype).to(device)


def f32(v):
    return torch.tensor(v, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# 1. The reference reproduces I-ViT's float code to the bit (where float64 is exact)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("scale", [0.5, 0.05, 3e-3, 2e-5])
@pytest.mark.parametrize("out_bits", [8, 16])
def test_softmax_reference_matches_ivit(gen, dtype, scale, out_bits):
    x = randint(gen, (7, 197), dtype)
    x[0] = x[0, 0]  # an all-equal row
    y, out_scale = int_softmax(x, scale, out_bits=out_bits)
    expected = ivit.ivit_softmax(x, f32(scale), output_bit=out_bits)
    assert torch.equal(y.to(torch.float64), expected)
    assert out_scale.item() == 2.0 ** -(out_bits - 1)


@pytest.mark.parametrize("scale", [0.2, 0.05, 0.01, 2.5e-3])
@pytest.mark.parametrize("out_bits", [8, 16])
def test_gelu_reference_matches_ivit(gen, scale, out_bits):
    x = randint(gen, (9, 385), torch.int8)
    x[1] = randint(gen, (385,), torch.int8, -128, -1)  # negative row max: exp(-max) saturates
    x[2] = 127  # large row max: the known saturation
    y, out_scale = int_gelu(x, scale, out_bits=out_bits)
    expected = ivit.ivit_gelu(x, f32(scale), output_bit=out_bits)
    assert torch.equal(y.to(torch.float64), expected)
    assert out_scale.item() == (f32(scale) * 2.0 ** -(out_bits - 1)).item()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("c", [1, 3, 384, 768])
def test_layernorm_reference_matches_ivit(gen, dtype, c):
    x = randint(gen, (6, c), dtype)
    x[0] = x[0, 0]
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen) * 0.5
    y, out_scale = int_layernorm(x, weight, bias)
    expected, expected_scale = ivit.ivit_layernorm(x, weight, bias)
    assert torch.equal(y.to(torch.float64), expected)
    assert torch.equal(out_scale, expected_scale)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("out_bits", [4, 8, 16])
def test_requantize_reference_matches_ivit(gen, per_channel, out_bits):
    x = randint(gen, (5, 64), torch.int16)
    shape = (64,) if per_channel else (1,)
    in_scale = torch.rand(shape, generator=gen) * 1e-2 + 1e-4
    out_scale = torch.rand(shape, generator=gen) * 1e-1 + 1e-3
    y = requantize(x, in_scale, out_scale, out_bits=out_bits)
    expected = ivit.ivit_requantize(x, in_scale, out_scale, out_bits)
    assert torch.equal(y.to(torch.float64), expected)


def _python_round_shift(v: int, e: int) -> int:
    """round-half-even(v / 2^e) with Python's exact integers and fractions."""
    return round(Fraction(v, 2**e)) if e >= 0 else v * 2 ** (-e)  # round() on Fraction: half-even


def test_round_shift_against_exact_python(gen):
    v = torch.randint(-(2**62), 2**62, (4000,), generator=gen)
    v[:8] = torch.tensor([0, 1, -1, 3, -3, 5 << 40, -(5 << 40), 2**62])  # ties at several shifts
    for e in [1, 2, 3, 17, 31, 41, 61, 62, 63, 64, 80]:
        got = rq.ref_round_shift_half_even(v, torch.tensor(e))
        exp = torch.tensor([_python_round_shift(int(a), e) for a in v])
        assert torch.equal(got, exp), e
    assert torch.equal(rq.ref_round_shift_half_even(v, torch.tensor(0)), v)


def test_round_shift_per_column_shifts(gen):
    # one shift per column: ordinary shifts beside the special cases e <= 0 and e >= 63
    v = torch.randint(-(2**62), 2**62, (50, 9), generator=gen)
    v[0] = 3 << 40  # ties
    for shifts in ([1, 2, 3, 17, 31, 41, 61, 62, 40], [0, 1, 5, 62, 63, 80, 31, 2, -1]):
        got = rq.ref_round_shift_half_even(v, torch.tensor(shifts))
        for c, e in enumerate(shifts):
            col = [int(a) for a in v[:, c]]
            exp = ([0 if a == 0 else (1 if a > 0 else -1) * 2**62 for a in col] if e < 0
                   else [_python_round_shift(a, e) for a in col])
            assert got[:, c].tolist() == exp, (shifts, e)


def test_requantize_int32_against_exact_python(gen):
    # int32 inputs: I * m reaches 2^62, beyond float64 exactness; check with exact rationals.
    x = randint(gen, (3, 40), torch.int32)
    in_scale, out_scale = torch.rand(40, generator=gen) + 0.1, torch.rand(1, generator=gen) * 1e3 + 1
    y = requantize(x, in_scale, out_scale, out_bits=32)
    m, e = rq.dyadic_params(in_scale, out_scale)
    for (r, c), val in zip(torch.cartesian_prod(torch.arange(3), torch.arange(40)).tolist(), y.reshape(-1).tolist()):
        exact = _python_round_shift(int(x[r, c]) * int(m[c]), int(e[c]))
        assert val == max(-(2**31), min(2**31 - 1, exact))


def test_requantize_exact_ties():
    # in/out = 0.5 exactly: m = 2^30, e = 31 - 0 = 31 -> y = round-half-even(I / 2)
    x = torch.tensor([[-5, -3, -1, 1, 3, 5, 7]], dtype=torch.int32)
    y = requantize(x, 1.0, 2.0, out_bits=8)
    assert y.tolist() == [[-2, -2, 0, 0, 2, 2, 4]]


def test_layernorm_mean_ties_round_half_even():
    # sums/C of 2.5 and 3.5 (ties) and -2.5: mu = 2, 4, -2
    for row, mu in [([2, 3], 2), ([3, 4], 4), ([-2, -3], -2)]:
        x = torch.tensor([row], dtype=torch.int8)
        mean = ki.ref_div_round_half_even(x.to(torch.int64).sum(-1, keepdim=True), 2)
        assert mean.item() == mu


def test_dyadic_params_round_half_up():
    # ratio = 1 - 2^-40: mantissa * 2^31 = 2^31 - 2^-9 rounds up to 2^31.
    m, e = rq.dyadic_params(torch.tensor(1 - 2.0**-40, dtype=torch.float64), torch.tensor(1.0))
    assert m.item() == 2**31 and e.item() == 31


def test_gelu_reproduces_ivit_saturation_for_large_row_max():
    # Real values -5 and 12 (scale 0.1). 12 > 9.4, so exp(-max) is stuck at the clamp of the
    # shift-exp, as is exp(-5 - 12): the sigmoid of -5 comes out as 1/2, not ~0, and
    # gelu(-5) as about -2.5. I-ViT computes the same, and trained models depend on it.
    x = torch.tensor([[-50, 120]], dtype=torch.int8)
    y, s = int_gelu(x, 0.1)
    assert torch.equal(y.to(torch.float64), ivit.ivit_gelu(x, f32(0.1)))
    assert abs(y[0, 0].item() * s.item() - (-2.5)) < 0.05
    # Without the large maximum the same entry gives ~0, as GELU should.
    y, s = int_gelu(torch.tensor([[-50, 50]], dtype=torch.int8), 0.1)
    assert abs(y[0, 0].item() * s.item()) < 0.01


def test_softmax_output_range_and_sum(gen):
    x = randint(gen, (64, 197), torch.int16)
    y, s = int_softmax(x, 1e-2)
    assert y.min() >= 0 and y.max() <= 127
    total = y.to(torch.float64).sum(-1) * s.item()
    assert ((total > 0.7) & (total <= 1.0)).all()  # a shift-based approximation of softmax


# --------------------------------------------------------------------------------------------
# 2. Every backend against the reference, bit-exactly, through the public ops
# --------------------------------------------------------------------------------------------


def _softmax_cases(gen):
    yield randint(gen, (2, 3, 197), torch.int8), 0.05, 8
    yield randint(gen, (4, 785), torch.int16), 2e-3, 16
    yield randint(gen, (3, 4097), torch.int32, -(2**20), 2**20), 1e-3, 8
    yield randint(gen, (2, 1), torch.int8), 0.1, 8
    yield randint(gen, (0, 197), torch.int8), 0.1, 8
    yield torch.full((3, 33), 127, dtype=torch.int8), 0.05, 8
    extremes = torch.tensor([[-(2**31), 2**31 - 1, 0, -1]], dtype=torch.int32)
    yield extremes, 0.5, 16
    yield randint(gen, (16, 40), torch.int8).t(), 0.02, 8  # non-contiguous
    yield randint(gen, (5, 197), torch.int8), 2.0**15 / (2**31 - 1) * 1.0001, 8  # tiniest allowed
    yield randint(gen, (5, 64), torch.int16), 250.0, 16  # large scale: x0 = -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_softmax_backends(gen, backend):
    require_backend("int_softmax", backend)
    for x, scale, out_bits in _softmax_cases(gen):
        x = x.to(DEVICE)
        with effkern.backend(backend):
            y, _ = int_softmax(x, scale, out_bits=out_bits)
        x0 = ki.shift_exp_x0(f32(scale))
        expected = ki.ref_int_softmax_rows(x.cpu().reshape(-1, x.shape[-1]), x0, 15, out_bits).reshape(x.shape)
        assert y.shape == x.shape and torch.equal(y.cpu(), expected), (tuple(x.shape), scale)


def _gelu_cases(gen):
    yield randint(gen, (2, 5, 384), torch.int8), 0.05, 8
    yield randint(gen, (3, 1536), torch.int8), 0.01, 8
    yield randint(gen, (3, 4097), torch.int16, -3000, 3000), 2e-3, 16
    yield randint(gen, (4, 1), torch.int8), 0.1, 8
    yield randint(gen, (0, 7), torch.int8), 0.1, 8
    yield torch.full((2, 9), -128, dtype=torch.int8), 0.05, 8  # negative max: em saturates
    yield torch.tensor([[-(2**15), 2**15 - 1, 0]], dtype=torch.int16), 0.05, 8
    yield randint(gen, (40, 16), torch.int8).t(), 0.03, 8
    yield randint(gen, (3, 50), torch.int8), 300.0, 8  # large scale: x0 = -1
    yield randint(gen, (3, 50), torch.int8), 1e-6, 8  # small scale: the sum saturates, f = 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_gelu_backends(gen, backend):
    require_backend("int_gelu", backend)
    for x, scale, out_bits in _gelu_cases(gen):
        x = x.to(DEVICE)
        with effkern.backend(backend):
            y, _ = int_gelu(x, scale, out_bits=out_bits)
        x0 = ki.shift_exp_x0(f32(scale) * 1.702)
        expected = ki.ref_int_gelu_rows(x.cpu().reshape(-1, x.shape[-1]), x0, 23, out_bits).reshape(x.shape)
        assert torch.equal(y.cpu(), expected), (tuple(x.shape), scale)


def _layernorm_cases(gen):
    yield randint(gen, (2, 5, 384), torch.int8), 10
    yield randint(gen, (3, 768), torch.int16), 10
    yield randint(gen, (2, 4097), torch.int8), 10
    yield randint(gen, (3, 1), torch.int8), 10
    yield torch.full((2, 100), -7, dtype=torch.int8), 16  # var = 0
    yield randint(gen, (0, 8), torch.int8), 10
    yield torch.tensor([[-(2**15), 2**15 - 1, 0, 5]], dtype=torch.int16), 0
    yield randint(gen, (24, 10), torch.int16).t(), 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_layernorm_backends(gen, backend):
    require_backend("int_layernorm", backend)
    for x, iters in _layernorm_cases(gen):
        c = x.shape[-1]
        weight = (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
        bias = (torch.randn(c, generator=gen) * 0.3).to(DEVICE)
        x = x.to(DEVICE)
        with effkern.backend(backend):
            y, scale = int_layernorm(x, weight, bias, iters=iters)
        bias_int, expected_scale = ki.layernorm_constants(c, weight.cpu(), bias.cpu())
        expected = ki.ref_int_layernorm_rows(x.cpu().reshape(-1, c), bias_int, iters).reshape(x.shape)
        assert torch.equal(y.cpu(), expected), tuple(x.shape)
        assert torch.equal(scale.cpu(), expected_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requantize_backends(gen, backend):
    require_backend("requantize", backend)
    cases = [
        (randint(gen, (7, 1536), torch.int32), torch.rand(1536, generator=gen) * 1e-4 + 1e-6, 0.03, 8),
        (randint(gen, (2, 3, 50), torch.int16), 1e-3, 0.02, 16),
        (randint(gen, (4, 9), torch.int8), 0.7, 1.0, 4),
        (randint(gen, (4, 9), torch.int32), 1.0, 1e-12, 32),   # e < 0: saturates
        (randint(gen, (4, 9), torch.int32), 1e-30, 1.0, 8),    # e > 62: zero
        (torch.tensor([[-5, -3, -1, 1, 3, 5]], dtype=torch.int32), 1.0, 2.0, 8),  # ties
        (randint(gen, (0, 9), torch.int8), 0.5, 1.0, 8),
        (randint(gen, (30, 12), torch.int32).t(), 1e-3, 0.5, 8),
    ]
    for x, in_scale, out_scale, out_bits in cases:
        x = x.to(DEVICE)
        in_s = in_scale.to(DEVICE) if isinstance(in_scale, torch.Tensor) else in_scale
        with effkern.backend(backend):
            y = requantize(x, in_s, out_scale, out_bits=out_bits)
        m, e = rq.dyadic_params(torch.as_tensor(in_scale, dtype=torch.float32), f32(out_scale))
        m, e = m.expand(x.shape[-1]), e.expand(x.shape[-1])
        expected = rq.ref_requantize_rows(x.cpu().reshape(-1, x.shape[-1]), m, e, out_bits).reshape(x.shape)
        assert y.dtype == ki.int_dtype_for_bits(out_bits) and torch.equal(y.cpu(), expected), tuple(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_backends(gen, backend):
    require_backend("int8_linear", backend)
    for (lead, k, n) in [((1,), 1, 1), ((3,), 7, 5), ((2, 9), 384, 33), ((0,), 16, 8), ((5,), 4096, 3)]:
        x = randint(gen, (*lead, k), torch.int8).to(DEVICE)
        w = randint(gen, (n, k), torch.int8).to(DEVICE)
        bias = randint(gen, (n,), torch.int32, -(2**20), 2**20).to(DEVICE)
        in_scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-5)
        variants = [
            dict(bias=None), dict(bias=bias), dict(bias=bias, in_scale=in_scale.to(DEVICE), out_scale=0.05, out_bits=8),
            dict(bias=None, in_scale=1e-4, out_scale=in_scale.to(DEVICE) * 10, out_bits=16),
        ]
        for kw in variants:
            with effkern.backend(backend):
                y = int8_linear(x, w, kw.get("bias"), in_scale=kw.get("in_scale"), out_scale=kw.get("out_scale"),
                                out_bits=kw.get("out_bits", 8))
            expected = int8_linear(x.cpu(), w.cpu(), None if kw.get("bias") is None else bias.cpu(),
                                   in_scale=_cpu(kw.get("in_scale")), out_scale=_cpu(kw.get("out_scale")),
                                   out_bits=kw.get("out_bits", 8))
            assert y.shape == (*lead, n) and torch.equal(y.cpu(), expected), (lead, k, n, sorted(kw))


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def test_int8_linear_reference_is_exact(gen):
    x = randint(gen, (6, 300), torch.int8)
    w = randint(gen, (10, 300), torch.int8)
    bias = randint(gen, (10,), torch.int32)
    acc = x.to(torch.int64) @ w.to(torch.int64).T + bias.to(torch.int64)
    assert torch.equal(int8_linear(x, w, bias).to(torch.int64), acc.clamp(-(2**31), 2**31 - 1))
    # saturation of the bias add
    big = torch.full((10,), 2**31 - 1, dtype=torch.int32)
    ones = torch.ones(1, 300, dtype=torch.int8)
    assert (int8_linear(ones, torch.ones(10, 300, dtype=torch.int8), big) == 2**31 - 1).all()


# --------------------------------------------------------------------------------------------
# 3. torch.library contract: opcheck (schema, fake impl, autograd registration) and compile
# --------------------------------------------------------------------------------------------


def _opcheck_cases(gen):
    x8 = randint(gen, (3, 17), torch.int8, device=DEVICE)
    w = randint(gen, (5, 17), torch.int8, device=DEVICE)
    yield torch.ops.effkern.int_softmax.default, (x8, f32(0.05), 8, 15)
    yield torch.ops.effkern.int_gelu.default, (x8, f32(0.05), 8, 23)
    ln_w = (torch.rand(17, generator=gen) + 0.5).to(DEVICE)
    ln_b = (torch.randn(17, generator=gen) * 0.3).to(DEVICE)  # |bias/weight| < sqrt(17): no overflow
    yield torch.ops.effkern.int_layernorm.default, (x8, ln_w, ln_b, 10)
    yield torch.ops.effkern.requantize.default, (x8.to(torch.int32) * 1000, f32(1e-3), f32(0.1), 8)
    yield torch.ops.effkern.int8_linear.default, (x8, w, None, None, None, 8)
    yield torch.ops.effkern.int8_linear.default, (x8, w, torch.arange(5, dtype=torch.int32, device=DEVICE), f32(1e-3), (torch.rand(5, generator=gen) + 0.1).to(DEVICE), 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(gen, backend):
    require_backend("int_softmax", backend)
    # requantize and int8_linear have no cuda kernel: with "cuda" they fall back to torch
    with effkern.backend(backend, "torch"):
        for op, args in _opcheck_cases(gen):
            torch.library.opcheck(op, args)


def _integer_pipeline(x, w, bias, ln_w, ln_b):
    """int8 linear -> requantise -> layernorm -> requantise -> GELU, softmax: a fullgraph chain."""
    acc = int8_linear(x, w, bias)
    a = requantize(acc, 1e-3, 0.05, out_bits=8)
    y, s = int_layernorm(a, ln_w, ln_b)
    y8 = requantize(y, s, 0.05, out_bits=8)
    g, _ = int_gelu(y8, 0.05)
    p, _ = int_softmax(y8, 0.05)
    return g, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(gen, backend):
    require_backend("int_softmax", backend)
    x = randint(gen, (4, 9, 32), torch.int8, device=DEVICE)
    w = randint(gen, (48, 32), torch.int8, device=DEVICE)
    bias = randint(gen, (48,), torch.int32, -1000, 1000, device=DEVICE)
    ln_w = (torch.rand(48, generator=gen) + 0.5).to(DEVICE)
    ln_b = (torch.randn(48, generator=gen) * 0.1).to(DEVICE)
    compiled = torch.compile(_integer_pipeline, fullgraph=True)
    expected = _integer_pipeline(x.cpu(), w.cpu(), bias.cpu(), ln_w.cpu(), ln_b.cpu())
    with effkern.backend(backend, "torch"):  # read when the ops run, inside the compiled graph
        got = compiled(x, w, bias, ln_w, ln_b)
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)


# --------------------------------------------------------------------------------------------
# 4. Bad input: clear errors naming the problem
# --------------------------------------------------------------------------------------------

x8 = torch.zeros(2, 4, dtype=torch.int8) + 1

BAD_CALLS = [
    (lambda: int_softmax(x8.float(), 0.1), TypeError, "x must have dtype int8 or int16 or int32, got float32"),
    (lambda: int_softmax(torch.tensor(3, dtype=torch.int8), 0.1), ValueError, "at least one dimension"),
    (lambda: int_softmax(torch.zeros(2, 0, dtype=torch.int8), 0.1), ValueError, "row length"),
    (lambda: int_softmax(x8, 0.0), ValueError, "scale must be finite and > 0, got 0.0"),
    (lambda: int_softmax(x8, float("nan")), ValueError, "scale must be finite"),
    (lambda: int_softmax(x8, -1.0), ValueError, "scale must be finite and > 0"),
    (lambda: int_softmax(x8, torch.tensor([0.1, 0.2])), ValueError, "scale must hold a single value"),
    (lambda: int_softmax(x8, torch.tensor(1, dtype=torch.int32)), TypeError, "scale must be floating point"),
    (lambda: int_softmax(x8, 1e-6), ValueError, "too small for n=15"),
    (lambda: int_softmax(x8, 0.1, out_bits=4), ValueError, "out_bits must be 8 or 16"),
    (lambda: int_softmax(x8, 0.1, n=0), ValueError, r"n must be an integer in \[1, 30\]"),
    (lambda: int_gelu(x8.to(torch.int32), 0.1), TypeError, "int8 or int16"),
    (lambda: int_gelu(x8.to(torch.int16), 1e-7), ValueError, "could overflow the int32 output"),
    (lambda: int_gelu(x8, 1e-10, n=1), ValueError, "below -2"),
    (lambda: int_layernorm(x8, torch.ones(3), torch.zeros(4)), ValueError, r"weight must have shape \(4,\)"),
    (lambda: int_layernorm(x8, torch.ones(4), torch.zeros(4), iters=17), ValueError, "iters"),
    (lambda: int_layernorm(x8, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(4)), ValueError, "channel 1"),
    (lambda: int_layernorm(x8, torch.full((4,), 1e-3), torch.ones(4)), ValueError, "channel 0"),
    (lambda: requantize(x8, 0.1, torch.ones(3), out_bits=8), ValueError, "out_scale must be per-tensor"),
    (lambda: requantize(x8, 0.1, 0.2, out_bits=33), ValueError, "out_bits"),
    (lambda: requantize(x8, float("inf"), 0.2, out_bits=8), ValueError, "in_scale must be finite"),
    (lambda: int8_linear(x8, torch.ones(3, 5, dtype=torch.int8)), ValueError, "4 input features"),
    (lambda: int8_linear(x8, torch.ones(3, 4, dtype=torch.int16)), TypeError, "w must be a 2-D int8"),
    (lambda: int8_linear(x8, torch.ones(3, 4, dtype=torch.int8), torch.ones(3)), ValueError, "bias must be int32"),
    (lambda: int8_linear(x8, torch.ones(3, 4, dtype=torch.int8), out_scale=0.1), ValueError, "both in_scale and out_scale"),
    (lambda: int8_linear(torch.ones(1, 2**17, dtype=torch.int8), torch.ones(1, 2**17, dtype=torch.int8)), ValueError, "int32 accumulation"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_forced_unsupported_backend_lists_reasons():
    # int8_linear has no CUDA kernel; forcing it must say so rather than fall back silently.
    with effkern.backend("cuda"), pytest.raises(effkern.BackendNotSupported, match="cuda: int8_linear has no cuda"):
        int8_linear(x8, torch.ones(3, 4, dtype=torch.int8))
    with effkern.backend("cuda"), pytest.raises(effkern.BackendNotSupported, match=r"int_softmax: forced backend\(s\) cuda declined"):
        int_softmax(x8.to("cpu"), 0.1)


# --------------------------------------------------------------------------------------------
# Host synchronisation: the constants path
# --------------------------------------------------------------------------------------------


def test_host_constants_match_torch_float32(gen):
    """x0 (softmax, and GELU's 1.702 * S), the dyadic (m, e) and LayerNorm's s, computed on the
    host in Python / numpy float32, equal what torch's float32 / float64 CPU ops give, across
    many scales, subnormal-adjacent and huge ones included."""
    mant = torch.rand(3000, generator=gen) + 0.5
    scales = (mant * 2.0 ** torch.randint(-40, 40, (3000,), generator=gen).to(torch.float32)).tolist()
    scales += [1.0, 0.5, 1.0 / 3, 0.08, 0.0005, 1e-30, 1e-38, 3e38, 2.0**-126, 1.5 * 2.0**-24]
    for s in scales:
        t = torch.tensor(s, dtype=torch.float32)
        for what, dev in (("scale", t), ("1.702 * scale", t * 1.702)):
            try:
                want = int(torch.floor(-1.0 / dev))
            except (OverflowError, ValueError):
                want = None  # not finite: shift_exp_x0 must refuse it
            try:
                got = ki.shift_exp_x0(float(dev), "t", what)
            except ValueError:
                got = None
            if got is not None:
                assert got == want, (s, what)
        with np.errstate(over="ignore"):
            host = ki._np_f32(float(t)) * ki._np_f32(1.702)
        assert float(host) == float(t * 1.702), s
    pairs = list(zip(scales[:1500], scales[1500:3000]))
    for i, o in pairs:
        m, e = rq.dyadic_params(torch.tensor(i, dtype=torch.float32), torch.tensor(o, dtype=torch.float32))
        assert rq.dyadic_host(float(torch.tensor(i, dtype=torch.float32)), float(torch.tensor(o, dtype=torch.float32))) \
            == (int(m), int(e)), (i, o)


class _WouldBeSyncs:
    """Counts, on CPU, the calls that would synchronise host and device if x lived on a GPU:
    reading a tensor's values on the host (item, tolist, cpu, numpy, bool/int/float) unless the
    tensor is a host scale (made by torch.tensor without a device: a Python-float scale),
    torch.tensor / as_tensor with a device, and moving a host tensor to a device."""

    READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.host, self.calls = set(), []
        for factory in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, factory, self._factory(getattr(torch, factory), factory))
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._read(getattr(torch.Tensor, name), name))
        for name in ("to", "cuda"):
            monkeypatch.setattr(torch.Tensor, name, self._move(getattr(torch.Tensor, name), name))

    def _is_host(self, t) -> bool:
        return t.untyped_storage().data_ptr() in self.host

    def _factory(self, real, name):
        def factory(*args, **kwargs):
            t = real(*args, **kwargs)
            if kwargs.get("device") is not None:
                self.calls.append(f"torch.{name}(device=)")
            else:
                self.host.add(t.untyped_storage().data_ptr())
            return t
        return factory

    def _read(self, real, name):
        def read(t, *args, **kwargs):
            if not self._is_host(t):
                self.calls.append(f"Tensor.{name}")
            return real(t, *args, **kwargs)
        return read

    def _move(self, real, name):
        def move(t, *args, **kwargs):
            to_device = name == "cuda" or "device" in kwargs or any(
                isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor)) for a in args)
            if to_device and self._is_host(t):
                self.calls.append(f"Tensor.{name}(device) of a host tensor")
            return real(t, *args, **kwargs)
        return move


def test_no_would_be_sync_on_the_hot_path(monkeypatch, gen):
    """Every integer op, called with Python-float scales and validation off (a GPU's default),
    on the torch backend: no host read of a device tensor, no torch.tensor(device=), no copy of
    a host tensor to the device."""
    x8 = randint(gen, (3, 5, 64), torch.int8)
    x32 = randint(gen, (3, 64), torch.int32, -(2**20), 2**20)
    w = randint(gen, (16, 64), torch.int8)
    bias = randint(gen, (16,), torch.int32, -(2**10), 2**10)
    weight, ln_bias = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen) * 0.1
    calls = {
        "int_softmax": lambda: int_softmax(x8, 0.08, out_bits=8, n=15),
        "int_softmax int16": lambda: int_softmax(x8.to(torch.int16), 0.0005, out_bits=16, n=15),
        "int_gelu": lambda: int_gelu(x8, 0.05, out_bits=8, n=23),
        "int_layernorm": lambda: int_layernorm(x8, weight, ln_bias, iters=10),
        "requantize": lambda: requantize(x32, 2e-5, 0.05, out_bits=8),
        "int8_linear": lambda: int8_linear(x8, w, bias, in_scale=1e-4, out_scale=0.02, out_bits=8),
        "int8_linear int32": lambda: int8_linear(x8, w, bias),
    }
    expected = {}
    with effkern.backend("torch"), effkern.validation(False):
        for name, call in calls.items():
            expected[name] = call()  # warm: first-call work (registry, caches) is not the hot path
        counter = _WouldBeSyncs(monkeypatch)
        for name, call in calls.items():
            counter.calls.clear()
            out = call()
            assert counter.calls == [], f"{name}: {counter.calls}"
            monkeypatch.undo()  # compare with the real methods
            got = out if isinstance(out, tuple) else (out,)
            want = expected[name] if isinstance(expected[name], tuple) else (expected[name],)
            for g, w_ in zip(got, want):
                assert torch.equal(g, w_), name
            counter = _WouldBeSyncs(monkeypatch)


def test_layernorm_validation_is_opt_in(gen):
    """The bias_int range check (a read-back on a GPU) follows the validation switch."""
    x8 = randint(gen, (2, 4), torch.int8)
    weight, bias = torch.full((4,), 1e-3), torch.ones(4)
    with effkern.validation(False):
        int_layernorm(x8, weight, bias)  # unchecked: the caller's responsibility
    with effkern.validation(True), pytest.raises(ValueError, match="channel 0"):
        int_layernorm(x8, weight, bias)
