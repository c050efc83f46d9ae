"""The integer row kernels of the compiled CUDA library (csrc/integer, kernels/integer).

CPU (always): the library, when built, registers the family's ops with schemas that fit the
Python kernels calling them, and refuses CPU tensors with a clear error; the kernels' integer
math (kernels/integer/integer_math.cuh, compiled for the host through
kernels/integer/host_check.cpp) matches the torch reference bit for bit. CUDA (marked): the
kernels themselves match the reference bit for bit, and bad arguments raise errors that name
them. The library as a whole (loading, build info): tests/test_cuda_build.py.
"""

import ctypes

import pytest
import torch

from effkern._common import INT32_MAX
from effkern.ops.integer import ref_int_gelu_rows, ref_int_layernorm_rows, ref_int_softmax_rows
from tests.cuda_lib_helpers import (assert_cpu_tensors_refused, assert_cuda_op_matches_python, build_host_check,
                                    case_id, cuda_kernels, needs_lib, poison_allocator, require_cuda)

RANGE = {torch.int8: (-128, 127), torch.int16: (-(2**15), 2**15 - 1), torch.int32: (-(2**31), 2**31 - 1)}
LENGTHS = [1, 3, 197, 1024, 1025, 4096, 4097, 20000]  # register paths and the looped path
# (x0, n, out_bits): typical scales, the largest allowed exp terms, int16 outputs.
SOFTMAX_ARGS = [(-10, 15, 8), (-3, 15, 16), (-400, 20, 8), (-1, 30, 16), (-65535, 15, 8)]
# GELU: x0 from 1.702 * scale; (-600, 23) saturates e + e(-max) (f = 1).
GELU_ARGS = [(-6, 23, 8), (-1, 23, 16), (-40, 15, 4), (-600, 23, 8), (-2, 30, 16)]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def make_rows(gen, rows, length, dtype):
    """rows x length integers mixing the interesting cases: full range, a narrow range (so exp
    terms are not all at the floor), all-equal rows (incl. at the dtype's min/max), rows holding
    both extremes, negative-only rows, rows whose mean is an exact tie."""
    lo, hi = RANGE[dtype]
    rows = max(rows, 10)  # one row of each kind below
    x = torch.randint(lo, hi + 1, (rows, length), generator=gen, dtype=torch.int64)
    kinds = [
        lambda: torch.randint(-20, 21, (length,), generator=gen),
        lambda: torch.full((length,), lo),
        lambda: torch.full((length,), hi),
        lambda: torch.full((length,), int(torch.randint(lo, hi + 1, (), generator=gen))),
        lambda: torch.where(torch.rand(length, generator=gen) < 0.5, lo, hi),
        lambda: torch.randint(lo, 0, (length,), generator=gen),
        lambda: torch.randint(-300, 300, (length,), generator=gen).clamp(lo, hi),
        # a, a+1, a, a+1, ...: for even lengths the row mean is an exact tie (x.5), once
        # with a even and once odd (round half to even goes down, then up)
        lambda: torch.arange(length) % 2 + int(torch.randint(lo // 2, hi // 2, (), generator=gen)) * 2,
        lambda: torch.arange(length) % 2 + int(torch.randint(lo // 2, hi // 2, (), generator=gen)) * 2 + 1,
    ]
    for r in range(1, rows):
        x[r] = kinds[(r - 1) % len(kinds)]()
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# the family's ops: registered, schemas fitting the Python side, CPU tensors refused
# --------------------------------------------------------------------------------------------


@needs_lib
@pytest.mark.parametrize("kernel", sorted(cuda_kernels("integer")))
def test_library_registers_ops(kernel):
    assert_cuda_op_matches_python(kernel)


@needs_lib
def test_cpu_tensors_are_refused():
    x = torch.zeros(2, 5, dtype=torch.int8)
    assert_cpu_tensors_refused({
        "cuda_int_softmax": lambda: torch.ops.effkern.cuda_int_softmax(x, -10, 15, 8),
        "cuda_int_gelu": lambda: torch.ops.effkern.cuda_int_gelu(x, -10, 15, 8),
        "cuda_int_layernorm": lambda: torch.ops.effkern.cuda_int_layernorm(x, torch.zeros(5, dtype=torch.int32), 8),
    })


# --------------------------------------------------------------------------------------------
# the kernels' integer math, compiled for the host, against the torch reference
# --------------------------------------------------------------------------------------------


# the host build below runs once: one xdist worker takes the whole file (the CI's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("integer_cuda")


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_check(tmp_path_factory, "integer")
    i64, u32, i32, cint, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int32, ctypes.c_int, ctypes.c_void_p
    lib.ek_int_softmax_rows.argtypes = [ptr, i64, i64, i64, cint, cint, cint, cint, ptr]
    lib.ek_int_gelu_rows.argtypes = [ptr, i64, i64, i64, cint, cint, cint, cint, ptr]
    lib.ek_int_layernorm_rows.argtypes = [ptr, ptr, i64, i64, cint, cint, cint, ptr]
    for name, args in [("ek_check_div_magic", [u32, u32]), ("ek_check_shift_exp32", [i64, cint, cint]),
                       ("ek_check_gelu_out32", [i64, cint, cint, i32, i32]),
                       ("ek_check_softmax_out32", [i64, i64, cint]), ("ek_check_layernorm_out32", [i64, i64, ptr, cint, ptr, cint]),
                       ("ek_check_layernorm_row", [ptr, i64, cint]),
                       ("ek_check_layernorm_factor32", [i64, i64]), ("ek_check_row_split", [i64, i64, cint, cint])]:
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = i64
    for name in ("ek_int_softmax_rows", "ek_int_gelu_rows", "ek_int_layernorm_rows"):
        getattr(lib, name).restype = cint
    return lib


def _host_call(fn, x, *args, bias=None, g0=0):
    """The kernels' math on the host; g0: the chunk phase of the row layout (-1: all scalar)."""
    x32 = x.to(torch.int32).contiguous()
    y = torch.empty(x.shape, dtype=torch.int64)
    in_bytes = x.element_size()
    if bias is None:
        rc = fn(x32.data_ptr(), x.shape[0], x.shape[1], *args, in_bytes, g0, y.data_ptr())
    else:
        b = bias.to(torch.int32).contiguous()
        rc = fn(x32.data_ptr(), b.data_ptr(), x.shape[0], x.shape[1], *args, in_bytes, g0, y.data_ptr())
    assert rc == 0, "host check refused its arguments or split a row wrongly"
    return y


@pytest.mark.parametrize("length", LENGTHS + [100000], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32], ids=case_id)
def test_host_softmax_math(host_lib, gen, dtype, length):
    x = make_rows(gen, 10, length, dtype)
    for x0, n, out_bits in SOFTMAX_ARGS:
        ref = ref_int_softmax_rows(x, x0, n, out_bits)
        got = _host_call(host_lib.ek_int_softmax_rows, x, x0, n, out_bits)
        assert torch.equal(got, ref.to(torch.int64)), (x0, n, out_bits)


@pytest.mark.parametrize("length", LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_host_gelu_math(host_lib, gen, dtype, length):
    x = make_rows(gen, 8, length, dtype)
    for x0, n, out_bits in GELU_ARGS:
        ref = ref_int_gelu_rows(x, x0, n, out_bits)
        got = _host_call(host_lib.ek_int_gelu_rows, x, x0, n, out_bits)
        assert torch.equal(got, ref.to(torch.int64)), (x0, n, out_bits)


@pytest.mark.parametrize("length", LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_host_layernorm_math(host_lib, gen, dtype, length):
    x = make_rows(gen, 8, length, dtype)
    bias = torch.randint(-(2**30), 2**30 + 1, (length,), generator=gen).to(torch.int32)
    for iters in (0, 1, 10, 16):
        ref = ref_int_layernorm_rows(x, bias, iters)
        got = _host_call(host_lib.ek_int_layernorm_rows, x, iters, bias=bias)
        assert torch.equal(got, ref.to(torch.int64)), iters


# The 32-bit arithmetic of the kernels (integer_math.cuh) against its plain int64 form, at the
# edges of its ranges: x0 from -1 to -2^30 (powers of two and their neighbours, I-ViT's typical
# scales), every n.
EDGE_X0 = [-1, -2, -3, -5, -7, -10, -11, -13, -100, -255, -256, -257, -600, -641, -65535, -65536, -65537,
           -(2**20) + 1, -(2**29) - 1, -(2**30) + 1, -(2**30)]
EDGE_N = [0, 1, 2, 8, 15, 16, 20, 23, 30, 31]


@pytest.mark.parametrize("x0", EDGE_X0)
def test_host_div_magic(host_lib, x0):
    """floor(P / X) by the host-computed multiplier, for every dividend range a launch can
    have (P + 1 <= min(n * X, 2^31 - 1) + 1), and the widest (2^31)."""
    x = -x0
    for pcap in sorted({min(n * x, 2**31 - 1) + 1 for n in EDGE_N} | {2**31, 94209}):
        assert host_lib.ek_check_div_magic(x, pcap) == 0, (x, pcap)


@pytest.mark.parametrize("x0", EDGE_X0)
def test_host_shift_exp32(host_lib, x0):
    """Every 16-bit row-max difference (int8/int16 rows), narrow and wide; for 32-bit rows (only
    with -x0 * 2^n <= 2^31 - 1, which the softmax requires) also the clamp of the difference."""
    for n in EDGE_N:
        assert host_lib.ek_check_shift_exp32(x0, n, 0) == 0, (x0, n)
        if (-x0) << n <= INT32_MAX:
            assert host_lib.ek_check_shift_exp32(x0, n, 1) == 0, (x0, n)
        else:
            assert host_lib.ek_check_shift_exp32(x0, n, 1) == -1, (x0, n)  # refused: not a launch


@pytest.mark.parametrize("x0, n, out_bits", GELU_ARGS + [(-11, 23, 8), (-(2**30), 30, 2), (-256, 23, 16),
                                                          (-1, 0, 16), (-65536, 16, 8), (-3, 31, 2)])
def test_host_gelu_out32(host_lib, x0, n, out_bits):
    """The GELU element formula for every int8 / int16 element under row maxima at the
    extremes (negative maxima make e(-max) large)."""
    for m, xmin in [(127, -128), (0, -128), (-1, -128), (-128, -128), (32767, -32768), (-1, -32768),
                    (-32768, -32768), (100, -30000)]:
        assert host_lib.ek_check_gelu_out32(x0, n, out_bits, m, xmin) == 0, (m, xmin)


@pytest.mark.parametrize("out_bits", [8, 16])
def test_host_softmax_out32(host_lib, out_bits):
    """(e * f) >> (32 - out_bits) in 32 bits for the largest exp terms K, unsaturated and
    saturated row sums."""
    for k in (1, 2, 65535 * 2**15, 2**30, INT32_MAX):
        for s in (1, 2, 3, 197, k, k + 1, 2**30 + 7, INT32_MAX - 1, INT32_MAX, 2**40):
            assert host_lib.ek_check_softmax_out32(k, s, out_bits) == 0, (k, s)


def test_host_layernorm_out32(host_lib):
    """((y * f) >> 1) + bias in 32 bits (as x * f - mu * f) for every int16 x with |x - mu| <= k,
    row means at the extremes, biases at the int32 extremes (the reference wraps them too)."""
    bias = torch.tensor([-(2**31), -1, 0, 2**30, INT32_MAX], dtype=torch.int32)
    mus = torch.tensor([-(2**15), -1, 0, 1, 2**15 - 1], dtype=torch.int32)
    for kmin, kmax in [(1, 40), (2**16 - 20, 2**16 + 2), (2**20, 2**20 + 1), (2**31 - 2, 2**31 - 1)]:
        assert host_lib.ek_check_layernorm_out32(kmin, kmax, mus.data_ptr(), len(mus), bias.data_ptr(),
                                                 len(bias)) == 0, (kmin, kmax)


def test_host_layernorm_factor32(host_lib, gen):
    """The square-root iteration with 32-bit divisions (var < 2^32) against the int64 one, every
    iteration count: all var up to 2^20, around 2^32 (where it hands over), random ones."""
    ranges = [(0, 2**20), (2**32 - 2**18, 2**32 + 2**10), (2**31 - 5, 2**31 + 5), (2**16 * 2**16 - 1, 2**32)]
    ranges += [(v, v + 64) for v in torch.randint(0, 2**32, (64,), generator=gen).tolist()]
    for lo, hi in ranges:
        assert host_lib.ek_check_layernorm_factor32(lo, hi) == 0, (lo, hi)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_host_layernorm_rows_bound(host_lib, gen, dtype):
    """layernorm_var == sum((x - mu)^2), and the square-root iteration keeps k >= |x - mu| (which
    makes the output's 32-bit product exact) after any number of iterations."""
    for length in (1, 2, 3, 197, 384, 785):
        x = make_rows(gen, 10, length, dtype).to(torch.int32)
        for row in x:
            row = row.contiguous()
            for iters in range(17):
                assert host_lib.ek_check_layernorm_row(row.data_ptr(), length, iters) == 0, (length, iters)


@pytest.mark.parametrize("vec", [4, 8, 16])
def test_host_row_split(host_lib, vec):
    """Head / 16-byte chunks / tail cover each row exactly once, chunks on the phase's grid."""
    for length in (1, 2, 3, 15, 16, 17, 31, 197, 785, 1024, 4097):
        for g0 in [-1] + list(range(vec)):
            assert host_lib.ek_check_row_split(40, length, g0, vec) == 0, (length, g0)


@pytest.mark.parametrize("length", [1, 3, 17, 197, 785], ids=case_id)
def test_host_math_any_row_phase(host_lib, gen, length):
    """The kernels' math is the same whatever the rows' alignment (chunk phase g0, as offset
    or odd-length inputs give): every phase against the reference."""
    bias = torch.randint(-(2**30), 2**30 + 1, (length,), generator=gen).to(torch.int32)
    for dtype, vec in [(torch.int8, 16), (torch.int16, 8), (torch.int32, 16)]:
        x = make_rows(gen, 6, length, dtype)
        for g0 in [-1, 1, vec - 1]:
            assert torch.equal(_host_call(host_lib.ek_int_softmax_rows, x, -13, 15, 8, g0=g0),
                               ref_int_softmax_rows(x, -13, 15, 8).to(torch.int64)), (dtype, g0)
            if dtype == torch.int32:
                continue
            assert torch.equal(_host_call(host_lib.ek_int_gelu_rows, x, -600, 23, 8, g0=g0),
                               ref_int_gelu_rows(x, -600, 23, 8).to(torch.int64)), (dtype, g0)
            assert torch.equal(_host_call(host_lib.ek_int_layernorm_rows, x, 10, bias=bias, g0=g0),
                               ref_int_layernorm_rows(x, bias, 10).to(torch.int64)), (dtype, g0)


# --------------------------------------------------------------------------------------------
# the CUDA kernels against the torch reference (GPU only)
# --------------------------------------------------------------------------------------------

def _on_cuda(fn, x, *args, out_elem_size):
    xc = x.cuda()
    poison_allocator(x.numel() * out_elem_size)
    y = fn(xc, *args)
    torch.cuda.synchronize()
    return y.cpu()


@pytest.mark.cuda
@pytest.mark.parametrize("length", LENGTHS + [100000], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32], ids=case_id)
def test_cuda_softmax(gen, dtype, length):
    require_cuda()
    x = make_rows(gen, 16, length, dtype)
    for x0, n, out_bits in SOFTMAX_ARGS:
        got = _on_cuda(torch.ops.effkern.cuda_int_softmax, x, x0, n, out_bits, out_elem_size=out_bits // 8)
        ref = ref_int_softmax_rows(x, x0, n, out_bits)
        assert got.dtype == ref.dtype and torch.equal(got, ref), (x0, n, out_bits)


@pytest.mark.cuda
@pytest.mark.parametrize("length", LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_cuda_gelu(gen, dtype, length):
    require_cuda()
    x = make_rows(gen, 16, length, dtype)
    for x0, n, out_bits in GELU_ARGS:
        got = _on_cuda(torch.ops.effkern.cuda_int_gelu, x, x0, n, out_bits, out_elem_size=4)
        ref = ref_int_gelu_rows(x, x0, n, out_bits)
        assert got.dtype == torch.int32 and torch.equal(got, ref), (x0, n, out_bits)


@pytest.mark.cuda
@pytest.mark.parametrize("length", LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_cuda_layernorm(gen, dtype, length):
    require_cuda()
    x = make_rows(gen, 16, length, dtype)
    bias = torch.randint(-(2**30), 2**30 + 1, (length,), generator=gen).to(torch.int32)
    xc, bc = x.cuda(), bias.cuda()
    for iters in (0, 1, 10, 16):
        poison_allocator(x.numel() * 4)
        got = torch.ops.effkern.cuda_int_layernorm(xc, bc, iters).cpu()
        ref = ref_int_layernorm_rows(x, bias, iters)
        assert got.dtype == torch.int32 and torch.equal(got, ref), iters


@pytest.mark.cuda
def test_cuda_empty_and_many_rows(gen):
    require_cuda()
    for shape in [(0, 197), (0, 1)]:
        x = torch.zeros(shape, dtype=torch.int8, device="cuda")
        assert torch.ops.effkern.cuda_int_softmax(x, -10, 15, 8).shape == shape
        assert torch.ops.effkern.cuda_int_gelu(x, -10, 15, 8).shape == shape
        bias = torch.zeros(shape[1], dtype=torch.int32, device="cuda")
        assert torch.ops.effkern.cuda_int_layernorm(x, bias, 8).shape == shape
    x = make_rows(gen, 70000, 3, torch.int8)  # more rows than one grid dimension of 65535
    got = torch.ops.effkern.cuda_int_softmax(x.cuda(), -10, 15, 8).cpu()
    assert torch.equal(got, ref_int_softmax_rows(x, -10, 15, 8))


@pytest.mark.cuda
def test_cuda_current_stream(gen):
    """The kernels run on the current stream: on a (non-blocking) side stream held up by a
    sleep, the op must see the copy queued before it, not the tensor's older contents."""
    require_cuda()
    old, new = make_rows(gen, 64, 785, torch.int16), make_rows(gen, 64, 785, torch.int16)
    xc, new_c = old.cuda(), new.cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copy
        xc.copy_(new_c)
        y = torch.ops.effkern.cuda_int_softmax(xc, -10, 15, 16)
    s.synchronize()
    assert torch.equal(y.cpu(), ref_int_softmax_rows(new, -10, 15, 16))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x.float(), -10, 15, 8), "'x' must be int8, int16 or int32"),
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x.t(), -10, 15, 8), "'x' must be contiguous"),
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x[None], -10, 15, 8), "'x' must be 2-D"),
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x, -10, 15, 12), "'out_bits' must be 8 or 16"),
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x, 3, 15, 8), "'x0' must be in"),
        (lambda x, b: torch.ops.effkern.cuda_int_softmax(x, -10, 40, 8), "'n' must be in"),
        (lambda x, b: torch.ops.effkern.cuda_int_gelu(x.int(), -10, 15, 8), "'x' must be int8 or int16"),
        (lambda x, b: torch.ops.effkern.cuda_int_gelu(x, -10, 15, 17), "'out_bits' must be in"),
        (lambda x, b: torch.ops.effkern.cuda_int_layernorm(x, b[:-1], 8), "'bias_int' must be 1-D of size C"),
        (lambda x, b: torch.ops.effkern.cuda_int_layernorm(x, b.long(), 8), "'bias_int' must be int32"),
        (lambda x, b: torch.ops.effkern.cuda_int_layernorm(x, b.cpu(), 8), "'bias_int' must be on the same CUDA"),
        (lambda x, b: torch.ops.effkern.cuda_int_layernorm(x, b, 17), "'iters' must be in"),
    ],
)
def test_cuda_bad_arguments(call, match):
    require_cuda()
    x = torch.zeros(4, 6, dtype=torch.int8, device="cuda")
    b = torch.zeros(6, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        call(x, b)


# --------------------------------------------------------------------------------------------
# the 32-bit kernels at their edges (GPU only): extreme x0 and n, short and odd rows, rows that
# start anywhere in a 16-byte vector (offset inputs), the wide GELU regime
# --------------------------------------------------------------------------------------------

EDGE_LENGTHS = [1, 3, 15, 16, 17, 197, 257, 785, 1040, 4111]  # every configuration, odd tails
# -x0 * 2^n <= 2^31 - 1 (the softmax's 32-bit bound) at its limit, n = 0 and the largest x0
EDGE_SOFTMAX_ARGS = [(-1, 0, 8), (-1, 30, 16), (-(2**30), 0, 16), (-(2**30) + 1, 1, 8), (-65535, 15, 16),
                     (-3, 29, 8), (-13, 15, 8), (-1023, 21, 16)]
# narrow and wide (-x0 * 2^n > 2^31 - 1: 64-bit exp terms) GELU, out_bits 2 to 16
EDGE_GELU_ARGS = [(-1, 0, 16), (-11, 23, 8), (-256, 23, 8), (-2, 30, 16), (-(2**30), 30, 2), (-65536, 16, 4)]


def _offset_rows(x, offset):
    """x's values in a contiguous tensor whose data starts offset elements into a fresh
    allocation: rows no longer start on 16-byte boundaries (or, for some offsets, no element
    of any row does for the output's alignment)."""
    flat = torch.empty(x.numel() + offset, dtype=x.dtype, device="cuda")
    view = flat[offset:].view(x.shape)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % 16 == (offset * x.element_size()) % 16
    return view


@pytest.mark.cuda
@pytest.mark.parametrize("length", EDGE_LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32], ids=case_id)
def test_cuda_softmax_edges(gen, dtype, length):
    require_cuda()
    x = make_rows(gen, 37, length, dtype)
    for x0, n, out_bits in EDGE_SOFTMAX_ARGS:
        ref = ref_int_softmax_rows(x, x0, n, out_bits)
        for offset in (0, 1, 3, 8):
            poison_allocator(x.numel() * out_bits // 8)
            got = torch.ops.effkern.cuda_int_softmax(_offset_rows(x, offset), x0, n, out_bits).cpu()
            assert torch.equal(got, ref), (x0, n, out_bits, offset)


@pytest.mark.cuda
@pytest.mark.parametrize("length", EDGE_LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_cuda_gelu_edges(gen, dtype, length):
    require_cuda()
    x = make_rows(gen, 37, length, dtype)
    for x0, n, out_bits in EDGE_GELU_ARGS:
        ref = ref_int_gelu_rows(x, x0, n, out_bits)
        for offset in (0, 1, 5):
            poison_allocator(x.numel() * 4)
            got = torch.ops.effkern.cuda_int_gelu(_offset_rows(x, offset), x0, n, out_bits).cpu()
            assert torch.equal(got, ref), (x0, n, out_bits, offset)


@pytest.mark.cuda
@pytest.mark.parametrize("length", EDGE_LENGTHS, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=case_id)
def test_cuda_layernorm_edges(gen, dtype, length):
    """Offset x and offset bias (the bias moves in 16-byte vectors only where a row allows)."""
    require_cuda()
    x = make_rows(gen, 37, length, dtype)
    bias = torch.randint(-(2**31), 2**31, (length,), generator=gen).to(torch.int32)
    for iters in (0, 3, 10, 16):
        ref = ref_int_layernorm_rows(x, bias, iters)
        for offset, bias_offset in ((0, 0), (1, 0), (0, 1), (7, 3)):
            poison_allocator(x.numel() * 4)
            got = torch.ops.effkern.cuda_int_layernorm(_offset_rows(x, offset), _offset_rows(bias, bias_offset),
                                                      iters).cpu()
            assert torch.equal(got, ref), (iters, offset, bias_offset)


@pytest.mark.cuda
def test_cuda_softmax_refuses_wide_exp_terms():
    """The 32-bit softmax needs every exp term (up to -x0 * 2^n) within int32."""
    require_cuda()
    x = torch.zeros(4, 6, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match=r"-x0 \* 2\^n must be at most 2\^31 - 1"):
        torch.ops.effkern.cuda_int_softmax(x, -65536, 15, 8)
    torch.ops.effkern.cuda_int_softmax(x, -65535, 15, 8)  # the largest x0 allowed at n = 15
