"""The CUDA backend of the shift family (csrc/shift, kernels/shift): ``effkern::cuda_shift_linear``
(tensor cores) and ``effkern::cuda_deepshift_linear`` (CUDA cores) against the torch references
in effkern/ops/shift.py.

CPU (always): the library, when built, registers both ops with schemas that fit the Python
kernels and refuses CPU tensors; the kernels' data path, compiled for the host through
kernels/shift/host_check.cpp and run block by block, warp by warp and lane by lane with the
kernels' own helpers (swizzled shared-memory tiles, the permuted k order of the fragments, the
in-register decoding, the epilogue, split-K) and an emulated mma.sync m16n8k16 laid out as the
PTX ISA specifies, matches the references: shift_linear to float32 rounding, deepshift_linear
bit for bit. CUDA (marked): the kernels themselves, with their outputs poisoned beforehand.
"""

import ctypes

import pytest
import torch

from effkern.ops.shift import (
    SHIFT_LINEAR,
    ShiftWeight,
    decode_weight,
    pack_codes,
    ref_deepshift_linear_rows,
    ref_shift_linear_rows,
)
from tests.cuda_lib_helpers import (
    assert_cpu_tensors_refused,
    assert_cuda_op_matches_python,
    build_host_check,
    needs_lib,
    poison_allocator,
    require_cuda,
)

P = ctypes.POINTER


def ptr(t, ctype):
    return ctypes.cast(t.data_ptr(), P(ctype)) if t is not None else None


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    lib = build_host_check(tmp_path_factory, "shift")
    i64, i32, u8, u16, f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_uint8, ctypes.c_uint16, ctypes.c_float
    lib.shift_plan.argtypes = [i64, i64, i64, ctypes.c_int, P(i64)]
    lib.shift_decode_pair.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
    lib.shift_decode_pair.restype = ctypes.c_uint32
    lib.shift_linear_emulate.argtypes = [P(u16), ctypes.c_int, P(u8), P(i32), P(f32), P(f32), i64, i64, i64, i64,
                                         ctypes.c_int, ctypes.c_int]
    lib.shift_linear_emulate.restype = ctypes.c_int
    lib.deepshift_linear_emulate.argtypes = [P(i32), P(u8), P(i32), P(i32), P(i32), i64, i64, i64, i64, ctypes.c_int]
    return lib


def random_weight(gen, n, k, bits, base_lo=-10, base_hi=2):
    """A ShiftWeight with random signs (zeros included), exponents and per-channel bases."""
    sign = torch.randint(-1, 2, (n, k), generator=gen)
    base = torch.randint(base_lo, base_hi + 1, (n,), generator=gen, dtype=torch.int32)
    p = base[:, None] + torch.randint(0, 2 ** (bits - 1) - 1, (n, k), generator=gen)
    return ShiftWeight(pack_codes(sign, p, base, bits), base, k, bits)


# --------------------------------------------------------------------------------------------
# host checks (no GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_pair_gives_every_codes_exact_16bit_value(host, bits, dtype):
    """Both halves, every code: the 16-bit pattern of (-1)^sign 2^(mag - 1), +0 for magnitude 0."""
    half = 2 ** (bits - 1)
    for lo in range(2 * half):
        for hi in (lo, (lo * 7 + 3) % (2 * half)):
            got = host.shift_decode_pair(lo | (hi << 16), int(dtype == torch.bfloat16), bits)
            for code, pattern in ((lo, got & 0xFFFF), (hi, got >> 16)):
                mag, neg = code % half, code >= half
                want = 0.0 if mag == 0 else (-1.0 if neg else 1.0) * 2.0 ** (mag - 1)
                value = torch.tensor([pattern], dtype=torch.int32).to(torch.int16).view(dtype).item()
                assert value == want and (mag != 0 or pattern == 0), (code, hex(pattern))


def test_plan_splits_k_at_small_m_only(host):
    plan = (ctypes.c_int64 * 5)()
    host.shift_plan(1, 384, 1536, 132, plan)
    assert (plan[0], plan[3]) == (16, 8)  # 3 tiles: split 8 ways (the cap)
    host.shift_plan(64 * 197, 3072, 768, 132, plan)
    assert (plan[0], plan[3]) == (64, 1)
    host.shift_plan(16, 384, 100, 132, plan)  # two K steps: at most two ranges, none empty
    assert plan[3] == 2 and plan[4] == 1


def emulate(host, x, w, bias, sms):
    m, k = x.shape
    y = torch.full((m, w.codes.shape[0]), float("nan"))
    bias_f = None if bias is None else bias.float().contiguous()
    splits = host.shift_linear_emulate(ptr(x.view(torch.int16), ctypes.c_uint16), int(x.dtype == torch.bfloat16),
                                       ptr(w.codes, ctypes.c_uint8), ptr(w.base, ctypes.c_int32),
                                       ptr(bias_f, ctypes.c_float), ptr(y, ctypes.c_float), m, w.codes.shape[0], k,
                                       w.codes.shape[1], w.bits, sms)
    return y, splits


# (M, N, K, bits): tails in every dimension, one and several M and N tiles, K not a multiple of 64
SHAPES = [(1, 130, 208, 5), (5, 72, 200, 4), (17, 136, 64, 5), (70, 200, 136, 4), (3, 256, 784, 4)]


@pytest.mark.parametrize("m,n,k,bits", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sms", [1, 132])
def test_shift_linear_kernel_data_path_matches_reference(host, m, n, k, bits, dtype, sms):
    """sms=1: one K range; sms=132: split-K where the tiles fill less than half the GPU."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k + bits)
    w = random_weight(gen, n, k, bits)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    for b in (bias, None):
        y, splits = emulate(host, x, w, b, sms)
        assert (splits > 1) == (sms > 1 and -(-m // (16 if m <= 16 else 64)) * -(-n // 128) < 66 and k > 64)
        ref = x.double() @ decode_weight(w.codes, w.base, k, bits, torch.float64).T
        if b is not None:
            ref = ref + b.double()
        scale = (x.double().abs() @ decode_weight(w.codes, w.base, k, bits, torch.float64).abs().T) + 1
        err = ((y.double() - ref).abs() / scale).max().item()
        assert err < 4e-7 * (1 + k / 16) ** 0.5, err  # float32 roundings of the 16-k MMA sums
        # and the kernel's final rounding is the reference's: the same value in x's dtype
        torch.testing.assert_close(y.to(dtype), ref_shift_linear_rows(x, w.codes, w.base, b, k, bits), atol=0,
                                   rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)


@pytest.mark.parametrize("bits", [4, 5])
def test_deepshift_kernel_arithmetic_is_the_reference_bit_for_bit(host, bits):
    """Extreme inputs (int32 limits), every shift of the range (right shifts up to 31 and beyond),
    zero weights, and sums that saturate."""
    gen = torch.Generator().manual_seed(bits)
    m, n, k = 7, 33, 200
    w = random_weight(gen, n, k, bits, base_lo=-40, base_hi=1 - (2 ** (bits - 1) - 1))
    x = torch.randint(-(2**31), 2**31 - 1, (m, k), generator=gen, dtype=torch.int64).to(torch.int32)
    x[0] = 2**31 - 1
    x[1] = -(2**31)
    bias = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    for b in (bias, None):
        y = torch.empty(m, n, dtype=torch.int32)
        host.deepshift_linear_emulate(ptr(x, ctypes.c_int32), ptr(w.codes, ctypes.c_uint8), ptr(w.base, ctypes.c_int32),
                                      ptr(b, ctypes.c_int32), ptr(y, ctypes.c_int32), m, n, k, w.codes.shape[1], bits)
        want = ref_deepshift_linear_rows(x, w.codes, w.base, b, k, bits)
        assert torch.equal(y, want)
    assert bool(((want == 2**31 - 1) | (want == -(2**31))).any()), "no saturated sum: the case is too weak"


def test_cuda_backend_declines_rows_it_cannot_copy_in_16_bytes():
    x = torch.zeros(3, 200, dtype=torch.bfloat16)
    w = random_weight(torch.Generator().manual_seed(0), 8, 200, 5)
    check = SHIFT_LINEAR.kernels.impls["cuda"].check
    assert check(x, w.codes, w.base, None, 200, 5) == [("K=200 is not a multiple of 16 (16-byte rows of x and of "
                                                        "5-bit codes)")]
    w4 = random_weight(torch.Generator().manual_seed(0), 8, 200, 4)
    assert check(x, w4.codes, w4.base, None, 200, 4) == []
    assert any("aligned" in r for r in check(torch.zeros(3 * 200 + 1, dtype=torch.bfloat16)[1:].view(3, 200),
                                             w4.codes, w4.base, None, 200, 4))


@needs_lib
@pytest.mark.parametrize("kernel", ["shift_linear", "deepshift_linear"])
def test_library_op_fits_the_python_kernel(kernel):
    assert_cuda_op_matches_python(kernel)


@needs_lib
def test_library_ops_refuse_cpu_tensors():
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), random_weight(torch.Generator().manual_seed(0), 8, 64, 4)
    assert_cpu_tensors_refused({
        "cuda_shift_linear": lambda: torch.ops.effkern.cuda_shift_linear(x, w.codes, w.base, None, 64, 4),
        "cuda_deepshift_linear": lambda: torch.ops.effkern.cuda_deepshift_linear(x.int(), w.codes, w.base, None, 64, 4),
    })


# --------------------------------------------------------------------------------------------
# the kernels themselves (GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k,bits", SHAPES + [(197 * 4, 1536, 384, 4), (1, 384, 1536, 5), (256, 768, 3072, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_shift_linear_matches_reference(m, n, k, bits, dtype):
    require_cuda()
    gen = torch.Generator().manual_seed(m + n + k)
    w = random_weight(gen, n, k, bits)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    wc = ShiftWeight(w.codes.cuda(), w.base.cuda(), k, bits)
    for b in (bias, None):
        poison_allocator(m * n * 2)
        y = torch.ops.effkern.cuda_shift_linear(x.cuda(), wc.codes, wc.base, None if b is None else b.cuda(), k, bits)
        ref = ref_shift_linear_rows(x.double(), w.codes, w.base, None if b is None else b.double(), k, bits)
        scale = (x.double().abs() @ decode_weight(w.codes, w.base, k, bits, torch.float64).abs().T) + 1
        err = ((y.cpu().double() - ref).abs() / scale).max().item()
        assert err <= 2 ** (-8 if dtype == torch.bfloat16 else -11), err  # one rounding to dtype


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 5])
def test_cuda_deepshift_linear_is_the_reference_bit_for_bit(bits):
    require_cuda()
    gen = torch.Generator().manual_seed(bits)
    m, n, k = 67, 129, 333
    w = random_weight(gen, n, k, bits, base_lo=-40, base_hi=1 - (2 ** (bits - 1) - 1))
    x = torch.randint(-(2**31), 2**31 - 1, (m, k), generator=gen, dtype=torch.int64).to(torch.int32)
    bias = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    poison_allocator(m * n * 4)
    y = torch.ops.effkern.cuda_deepshift_linear(x.cuda(), w.codes.cuda(), w.base.cuda(), bias.cuda(), k, bits)
    assert torch.equal(y.cpu(), ref_deepshift_linear_rows(x, w.codes, w.base, bias, k, bits))
