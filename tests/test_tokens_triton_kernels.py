"""The Triton backend of the sparse token primitives (:mod:`effkern.triton.tokens`) against the
torch primitives of :mod:`effkern.ops.tokens` (section 1), on fresh random inputs.

Runs on CUDA when available, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set before Python starts); skipped otherwise. The Triton functions allocate their outputs (and
topk_rank its scratch) with ``torch.empty``, which every call here poisons with random bytes
(NaNs and garbage integers included), so an element a kernel fails to write shows up as a
mismatch; ``test_every_element_is_written`` makes that certain with two fixed fill patterns.

Copies (gather, replace-scatter, add-scatter without repeated indices) and the ranking must match
exactly. Sums are compared with a float64 evaluation of the same torch primitive: within half an
ulp of the output dtype (relative, with slack) plus float32 accumulation error (relative to the
sum of the terms' magnitudes); the torch primitive itself is held to the same bound, which keeps
the tolerance honest.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tests.triton_helpers import GarbageBytes, poisoned_empty, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

from effkern.ops import tokens as ref  # noqa: E402  (after the skip)
from effkern.triton import tokens as tri  # noqa: E402

FLOATS = [torch.float16, torch.bfloat16, torch.float32]
INDEX_DTYPES = [torch.int64, torch.int32]
# Relative rounding slack of one output value: an ulp (half an ulp is the rounding, doubled).
REL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}
ACC_REL = 1e-5  # float32 accumulation error, relative to the sum of the terms' magnitudes

# The interpreter runs kernels as numpy code, which warns on the NaNs and infinities the tests
# feed it on purpose (0 / 0 for an empty merge segment, inf - inf, overflow to inf).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def call(fn, *args, gen: torch.Generator, pattern: int | None = None):
    """fn(*args) with torch.empty poisoned for the duration of the call only: every tensor but
    bool ones comes back filled with garbage bytes (random from ``gen``, or the byte
    ``pattern``)."""
    with poisoned_empty(GarbageBytes(gen, pattern)):
        return fn(*args)


def randn(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def rand_idx(b: int, k: int, n: int, dtype: torch.dtype, gen: torch.Generator, *, unique: bool = False,
             oob: float = 0.15) -> torch.Tensor:
    """[b, k] indices into n rows: random (with repeats) or, with ``unique`` and k <= n, distinct
    in-range ones; a fraction ``oob`` replaced by out-of-range values (negative, >= n, and near
    the index dtype's limits)."""
    if unique and k <= n:
        idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)]) if b else torch.zeros(0, k)
    else:
        idx = torch.randint(0, max(n, 1), (b, k), generator=gen)
    idx = idx.to(torch.int64)
    big = 2**40 if dtype == torch.int64 else 2**31 - 1
    bad = torch.tensor([-1, -2, -n - 3, n, n + 1, 2 * n + 5, -big, big, -(2**31)], dtype=torch.int64)
    if oob and idx.numel():
        pick = torch.rand((b, k), generator=gen) < oob
        idx = torch.where(pick, bad[torch.randint(0, len(bad), (b, k), generator=gen)], idx)
    return idx.to(dtype).to(DEVICE)


def assert_same(out: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exactly equal (NaN where expected is NaN), same dtype and shape."""
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if out.is_floating_point():
        same = (out == expected) | (out.isnan() & expected.isnan())
    else:
        same = out == expected
    if not bool(same.all()):
        bad = (~same).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} of {out.numel()} elements differ; first at {i}: "
                             f"got {out[i].item()}, expected {expected[i].item()}")


def assert_close(out: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 what: str = "") -> None:
    """|out - exact| <= REL[dtype] |exact| + ACC_REL scale + the dtype's subnormal spacing,
    elementwise (exact: float64; scale: the magnitude of the summed terms); NaN exactly where
    exact is NaN."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    o = out.double()
    nan = exact.isnan()
    assert torch.equal(o.isnan(), nan), f"{what}: NaNs at {o.isnan().nonzero()[:5].tolist()} " \
                                        f"expected at {nan.nonzero()[:5].tolist()}"
    err = (o - exact).abs().masked_fill(nan, 0)
    fi = torch.finfo(dtype)
    tol = (REL[dtype] * exact.abs() + ACC_REL * scale).masked_fill(nan, 0) + fi.smallest_normal * fi.eps
    if not bool((err <= tol).all()):
        i = tuple(int(v) for v in torch.unravel_index((err / tol).flatten().argmax(), err.shape))
        raise AssertionError(f"{what}: error {err[i].item():.3g} > tol {tol[i].item():.3g} at {i}: "
                             f"got {o[i].item()}, exact {exact[i].item()}")


# Shapes (B, N, C, K): single rows and columns, K = 0, K = N, K > N (repeats), odd C, ViT rows.
# Big shapes stay few (the interpreter is slow): C = 384 only with N <= 197 and B = 1.
ROW_SHAPES = [(1, 1, 1, 1), (3, 2, 3, 5), (3, 3, 67, 0), (1, 197, 384, 197), (3, 785, 3, 300),
              (2, 197, 67, 97), (1, 785, 1, 785)]
EMPTY_SHAPES = [(0, 5, 3, 2), (2, 0, 3, 4), (2, 4, 0, 3)]


# --------------------------------------------------------------------------------------------
# gather_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", ROW_SHAPES + EMPTY_SHAPES)
def test_gather_rows(shape, dtype, gen):
    b, n, c, k = shape
    x = randn((b, n, c), dtype, gen)
    for idx_dtype in INDEX_DTYPES:
        idx = rand_idx(b, k, n, idx_dtype, gen)
        # the torch primitive's torch.gather rejects N = 0 (every index is out of range there)
        expected = ref.gather_rows(x, idx) if n else torch.zeros(b, k, c, dtype=dtype, device=DEVICE)
        assert_same(call(tri.gather_rows, x, idx, gen=gen), expected, f"idx {idx_dtype}")


def test_gather_rows_out_of_range_rows_are_zero(gen):
    x = randn((2, 5, 7), torch.float32, gen)
    idx = torch.tensor([[4, -1, 5, 0], [-(2**40), 2**40, 3, 3]], device=DEVICE)
    out = call(tri.gather_rows, x, idx, gen=gen)
    assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[1, 2], x[1, 3]) and torch.equal(out[1, 3], x[1, 3])
    for bi, ki in [(0, 1), (0, 2), (1, 0), (1, 1)]:
        assert torch.equal(out[bi, ki], torch.zeros(7, device=DEVICE))


# --------------------------------------------------------------------------------------------
# scatter_rows
# --------------------------------------------------------------------------------------------


def _scatter_case(shape, dtype, idx_dtype, gen, unique):
    b, n, c, k = shape
    x = randn((b, n, c), dtype, gen)
    y = randn((b, k, c), dtype, gen)
    idx = rand_idx(b, k, n, idx_dtype, gen, unique=unique)
    order, starts = ref.scatter_plan(idx, n)
    return x, y, idx, order, starts


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", ROW_SHAPES + [(2, 197, 67, 500)] + EMPTY_SHAPES)
def test_scatter_rows_replace(shape, dtype, gen):
    """add=False: the last k aimed at a row wins (repeats: validate=False semantics)."""
    for idx_dtype in INDEX_DTYPES:
        for unique in (True, False):
            args = _scatter_case(shape, dtype, idx_dtype, gen, unique)
            assert_same(call(tri.scatter_rows, *args, False, gen=gen), ref.scatter_rows(*args, False),
                        f"idx {idx_dtype} unique={unique}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", ROW_SHAPES + [(2, 197, 67, 500)] + EMPTY_SHAPES)
def test_scatter_rows_add(shape, dtype, gen):
    """add=True: exact without repeats (one float32 add, one rounding); with repeats the sum of
    several rows, compared with float64."""
    for idx_dtype in INDEX_DTYPES:
        if shape[3] <= shape[1]:
            args = _scatter_case(shape, dtype, idx_dtype, gen, unique=True)
            assert_same(call(tri.scatter_rows, *args, True, gen=gen), ref.scatter_rows(*args, True),
                        f"idx {idx_dtype} distinct indices")
        x, y, idx, order, starts = _scatter_case(shape, dtype, idx_dtype, gen, unique=False)
        out = call(tri.scatter_rows, x, y, idx, order, starts, True, gen=gen)
        assert out.dtype == dtype
        exact = ref.scatter_rows(x.double(), y.double(), idx, order, starts, True)
        scale = ref.scatter_rows(x.double().abs(), y.double().abs(), idx, order, starts, True)
        assert_close(out, exact, scale, dtype, f"idx {idx_dtype} repeated indices")
        assert_close(ref.scatter_rows(x, y, idx, order, starts, True), exact, scale, dtype, "torch primitive")


def test_scatter_rows_keeps_signed_zero(gen):
    """A row with nothing added keeps x's bits, -0.0 included."""
    x = torch.zeros(1, 3, 4, device=DEVICE).neg()
    y = torch.ones(1, 1, 4, device=DEVICE)
    idx = torch.tensor([[1]], device=DEVICE)
    order, starts = ref.scatter_plan(idx, 3)
    out = call(tri.scatter_rows, x, y, idx, order, starts, True, gen=gen)
    assert torch.equal(torch.signbit(out[0, [0, 2]]), torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    assert torch.equal(out[0, 1], torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("dtype", FLOATS)
def test_scatter_rows_add_rounding(dtype, gen):
    """x + y rounded once to the dtype, to nearest even, bit for bit: exact ties (y half an ulp
    of x), overflow to inf, inf - inf, NaN, subnormals."""
    fi = torch.finfo(dtype)
    x = (torch.randn(64, generator=gen) * 4).to(dtype).float()
    ulp = torch.where(x == 0, fi.tiny, x.abs() * fi.eps)  # ~ an ulp of x (exact: a power of two times x's)
    half_ulp = 2.0 ** torch.floor(torch.log2(ulp)) / 2
    y = torch.cat([half_ulp, -half_ulp, half_ulp * 3, torch.full((4,), fi.max)])
    x = torch.cat([x, x, x, torch.tensor([fi.max, -fi.max, float("inf"), float("nan")])])
    y = torch.cat([y, torch.tensor([float("-inf"), fi.tiny / 4, fi.tiny, -fi.tiny * 2])])
    x = torch.cat([x, torch.tensor([fi.tiny / 2, -fi.tiny / 8, 0.0, -0.0])])
    n = x.numel()
    xs = x.to(dtype).reshape(1, n, 1).to(DEVICE)
    ys = y.reshape(1, n, 1).to(dtype).to(DEVICE)
    idx = torch.arange(n, device=DEVICE)[None]
    order, starts = ref.scatter_plan(idx, n)
    assert_same(call(tri.scatter_rows, xs, ys, idx, order, starts, True, gen=gen),
                ref.scatter_rows(xs, ys, idx, order, starts, True))


def test_scatter_rows_int32_plan(gen):
    """order / starts as int32 work too (the kernels widen every index they load)."""
    x, y, idx, order, starts = _scatter_case((3, 50, 19, 70), torch.float32, torch.int32, gen, False)
    for add in (False, True):
        expected = ref.scatter_rows(x, y, idx, order, starts, add)
        assert_same(call(tri.scatter_rows, x, y, idx, order.int(), starts.int(), add, gen=gen), expected)


# --------------------------------------------------------------------------------------------
# weighted_sum_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", ROW_SHAPES + [(2, 50, 130, 200)] + EMPTY_SHAPES)
def test_weighted_sum_rows(shape, dtype, gen):
    b, n, c, j = shape
    x = randn((b, n, c), dtype, gen)
    for idx_dtype, w_dtype in [(torch.int64, dtype), (torch.int32, torch.float32)]:
        w = torch.rand((b, n), generator=gen).to(w_dtype).to(DEVICE)
        idx = rand_idx(b, j, n, idx_dtype, gen)
        out = call(tri.weighted_sum_rows, x, w, idx, gen=gen)
        assert out.dtype == dtype and out.shape == (b, 1, c)
        if n == 0:  # the torch primitive's gather rejects N = 0; nothing is in range
            assert_same(out, torch.zeros(b, 1, c, dtype=dtype, device=DEVICE))
            continue
        exact = ref.weighted_sum_rows(x.double(), w.double(), idx)
        scale = ref.weighted_sum_rows(x.double().abs(), w.double().abs(), idx)
        assert_close(out, exact, scale, dtype, f"idx {idx_dtype} weights {w_dtype}")
        assert_close(ref.weighted_sum_rows(x, w, idx), exact, scale, dtype, "torch primitive")


def test_weighted_sum_rows_no_indices_is_zero(gen):
    x = randn((3, 4, 5), torch.bfloat16, gen)
    out = call(tri.weighted_sum_rows, x, torch.ones(3, 4, device=DEVICE), torch.zeros(3, 0, dtype=torch.int64,
                                                                                      device=DEVICE), gen=gen)
    assert_same(out, torch.zeros(3, 1, 5, dtype=torch.bfloat16, device=DEVICE))


# --------------------------------------------------------------------------------------------
# topk_rank
# --------------------------------------------------------------------------------------------


def _scores(b: int, m: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    s = torch.randn((b, m), generator=gen)
    if kind == "ties":  # few distinct values: long runs of ties
        s = torch.randint(-2, 3, (b, m), generator=gen).float() * 0.5
    elif kind == "special":  # NaN, +-inf, +-0.0, ties among them, denormals, extremes
        vals = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40,
                             3.0e38, -3.0e38, 0.5])
        pick = torch.randint(0, len(vals), (b, m), generator=gen)
        s = torch.where(torch.rand((b, m), generator=gen) < 0.7, vals[pick], s)  # fp16: +-3e38 -> +-inf
    elif kind == "constant":
        s = torch.full((b, m), -0.0)
        s[:, ::3] = 0.0
    return s.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 2, 3, 17, 64, 197])
def test_topk_rank(m, dtype, gen):
    for kind in ("random", "ties", "special", "constant"):
        scores = _scores(3 if m < 100 else 2, m, kind, dtype, gen)
        for k in sorted({0, 1, m // 2, m - 1, m} & set(range(m + 1))):
            for keep_cls in (False, True):
                keep, drop = call(tri.topk_rank, scores, k, keep_cls, gen=gen)
                ekeep, edrop = ref.topk_rank(scores, k, keep_cls)
                what = f"{kind} k={k} keep_cls={keep_cls}"
                assert_same(keep, ekeep, what + " keep")
                assert_same(drop, edrop, what + " drop")


@pytest.mark.parametrize("m, k, dtype, keep_cls", [(785, 400, torch.float16, False), (1100, 700, torch.bfloat16, True),
                                                   (1100, 1099, torch.float32, False)])
def test_topk_rank_long_rows(m, k, dtype, keep_cls, gen):
    """Many rank blocks per row, two drop blocks (M > 1024), NaNs and ties across blocks."""
    scores = torch.cat([_scores(1, m, "special", dtype, gen), _scores(1, m, "ties", dtype, gen)])
    keep, drop = call(tri.topk_rank, scores, k, keep_cls, gen=gen)
    ekeep, edrop = ref.topk_rank(scores, k, keep_cls)
    assert_same(keep, ekeep, "keep")
    assert_same(drop, edrop, "drop")


def test_topk_rank_empty(gen):
    for b, m, k in [(0, 5, 2), (2, 0, 0), (3, 4, 0), (3, 4, 4)]:
        scores = _scores(b, m, "random", torch.float16, gen)
        for keep_cls in (False, True):
            keep, drop = call(tri.topk_rank, scores, k, keep_cls, gen=gen)
            ekeep, edrop = ref.topk_rank(scores, k, keep_cls)
            assert_same(keep, ekeep, f"{(b, m, k)} keep")
            assert_same(drop, edrop, f"{(b, m, k)} drop")


# --------------------------------------------------------------------------------------------
# segment_mean_rows and its backward
# --------------------------------------------------------------------------------------------

# (B, N, C, M): one row; every row its own segment; M > N (empty segments: NaN rows, as torch);
# ToMe-like merges; odd C.
MERGE_SHAPES = [(1, 1, 1, 1), (3, 3, 3, 2), (2, 9, 1, 12), (1, 197, 384, 120), (2, 197, 67, 100),
                (3, 785, 3, 400), (1, 50, 19, 50)]


def _merge_case(shape, dtype, gen, with_size):
    b, n, c, m = shape
    x = randn((b, n, c), dtype, gen)
    dest = torch.randint(0, m, (b, n), generator=gen).to(DEVICE)
    if m == n and n > 1:  # a permutation: every segment holds one row
        dest = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]).to(DEVICE)
    sources, starts = ref.scatter_plan(dest, m)
    size = (torch.rand((b, n), generator=gen) * 4 + 0.25).to(DEVICE) if with_size else None
    return x, size, dest, sources, starts


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", MERGE_SHAPES)
def test_segment_mean_rows(shape, dtype, gen):
    for with_size in (False, True):
        x, size, dest, sources, starts = _merge_case(shape, dtype, gen, with_size)
        out, size_out = call(tri.segment_mean_rows, x, size, dest, sources, starts, gen=gen)
        assert out.dtype == dtype and size_out.dtype == torch.float32
        s64 = None if size is None else size.double()
        exact, exact_size = ref.segment_mean_rows(x.double(), s64, dest, sources, starts)
        scale, _ = ref.segment_mean_rows(x.double().abs(), s64, dest, sources, starts)
        what = f"size={with_size}"
        assert_close(out, exact, scale, dtype, what + " out")
        assert_close(size_out, exact_size, exact_size, torch.float32, what + " size_out")
        torch_out, _ = ref.segment_mean_rows(x, size, dest, sources, starts)
        assert_close(torch_out, exact, scale, dtype, "torch primitive")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", MERGE_SHAPES)
def test_segment_mean_rows_bwd(shape, dtype, gen):
    b, _, c, m = shape
    for with_size, with_grad_size in [(False, False), (False, True), (True, False), (True, True)]:
        x, size, dest, sources, starts = _merge_case(shape, dtype, gen, with_size)
        out, size_out = ref.segment_mean_rows(x, size, dest, sources, starts)
        grad = randn((b, m, c), dtype, gen)
        grad_size = randn((b, m), torch.float32, gen) if with_grad_size else None
        dx, dsize = call(tri.segment_mean_rows_bwd, grad, grad_size, x, size, out, size_out, dest, gen=gen)
        what = f"size={with_size} grad_size={with_grad_size}"
        s64 = None if size is None else size.double()
        gs64 = None if grad_size is None else grad_size.double()
        args64 = (grad.double(), gs64, x.double(), s64, out.double(), size_out.double(), dest)
        edx, edsize = ref.segment_mean_rows_bwd(*args64)
        assert dx.dtype == dtype
        assert_close(dx, edx, edx.abs(), dtype, what + " dx")
        if size is None:
            assert dsize is None
            continue
        assert dsize.dtype == torch.float32
        # scale of dsize: sum |g| |x - out| / S + |gS|
        so = size_out.double().gather(1, dest)
        gathered = ref.gather_rows(grad.double(), dest).abs() * (x.double() - ref.gather_rows(out.double(), dest)).abs()
        scale = gathered.sum(-1) / so + (0 if gs64 is None else gs64.gather(1, dest).abs())
        assert_close(dsize, edsize, scale, torch.float32, what + " dsize")
        assert_close(ref.segment_mean_rows_bwd(grad, grad_size, x, size, out, size_out, dest)[1], edsize, scale,
                     torch.float32, "torch primitive")


def test_segment_mean_rows_empty(gen):
    """B = 0 and N = M = 0: empty outputs; C = 0: no rows of out, but size_out and dsize."""
    for b, n, c, m in [(0, 3, 4, 2), (2, 0, 4, 0), (2, 5, 0, 3)]:
        x = randn((b, n, c), torch.float32, gen)
        size = torch.rand((b, n), generator=gen).to(DEVICE) + 0.5
        dest = torch.randint(0, max(m, 1), (b, n), generator=gen).to(DEVICE)
        sources, starts = ref.scatter_plan(dest, m)
        out, size_out = call(tri.segment_mean_rows, x, size, dest, sources, starts, gen=gen)
        eout, esize = ref.segment_mean_rows(x, size, dest, sources, starts)
        assert_same(out, eout)
        assert_close(size_out, esize.double(), esize.double(), torch.float32, "size_out")
        grad, grad_size = randn((b, m, c), torch.float32, gen), randn((b, m), torch.float32, gen)
        dx, dsize = call(tri.segment_mean_rows_bwd, grad, grad_size, x, size, eout, esize, dest, gen=gen)
        edx, edsize = ref.segment_mean_rows_bwd(grad, grad_size, x, size, eout, esize, dest)
        assert_same(dx, edx)
        assert_close(dsize, edsize.double(), edsize.double().abs(), torch.float32, "dsize")


# --------------------------------------------------------------------------------------------
# Every output element is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [0x00, 0xFF])
def test_every_element_is_written(pattern, gen):
    """Outputs allocated all-zero bytes and all-one bytes (NaN / -1) come out the same."""
    b, n, c, k = 2, 37, 67, 29
    x = randn((b, n, c), torch.bfloat16, gen)
    idx = rand_idx(b, k, n, torch.int32, gen)
    assert_same(call(tri.gather_rows, x, idx, gen=gen, pattern=pattern), ref.gather_rows(x, idx))
    y = randn((b, k, c), torch.bfloat16, gen)
    order, starts = ref.scatter_plan(idx, n)
    for add in (False, True):
        assert_same(call(tri.scatter_rows, x, y, idx, order, starts, add, gen=gen, pattern=pattern),
                    ref.scatter_rows(x, y, idx, order, starts, add))
    out = call(tri.weighted_sum_rows, x, torch.rand((b, n), generator=gen).to(DEVICE), idx, gen=gen,
               pattern=pattern)
    assert not bool(out.isnan().any())
    scores = _scores(b, 300, "ties", torch.float32, gen)
    for kk in (0, 5, 300):
        for got, expected in zip(call(tri.topk_rank, scores, kk, True, gen=gen, pattern=pattern),
                                 ref.topk_rank(scores, kk, True)):
            assert_same(got, expected)
    xs, size, dest, sources, starts = _merge_case((b, n, c, 20), torch.float32, gen, True)
    mean, size_out = call(tri.segment_mean_rows, xs, size, dest, sources, starts, gen=gen, pattern=pattern)
    emean, esize = ref.segment_mean_rows(xs, size, dest, sources, starts)
    assert torch.equal(mean.isnan(), emean.isnan()) and torch.equal(size_out.isnan(), esize.isnan())
    grad = randn(mean.shape, torch.float32, gen)
    dx, dsize = call(tri.segment_mean_rows_bwd, grad, None, xs, size, emean, esize, dest, gen=gen, pattern=pattern)
    assert not bool(dx.isnan().any()) and not bool(dsize.isnan().any())


# --------------------------------------------------------------------------------------------
# Offsets beyond int32 (a GPU only: the torch primitive's float32 add-scatter needs ~30 GB)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_offsets_beyond_int32(gen):
    """B * N * C > 2^31: row offsets must be computed in int64."""
    if not torch.cuda.is_available() or torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB free")
    c = 384
    n = 2**31 // c + 64
    x = torch.zeros((1, n, c), dtype=torch.float16, device=DEVICE)
    x[0, -16:] = randn((16, c), torch.float16, gen)
    x[0, :4] = randn((4, c), torch.float16, gen)
    idx = torch.tensor([[n - 1, 0, n - 16, n, 3, n - 2]], device=DEVICE)
    assert_same(call(tri.gather_rows, x, idx, gen=gen), ref.gather_rows(x, idx))
    w = torch.rand((1, n), generator=gen).to(DEVICE)
    out = call(tri.weighted_sum_rows, x, w, idx, gen=gen)
    rows = torch.tensor([n - 1, 0, n - 16, 3, n - 2], device=DEVICE)  # idx without the out-of-range n
    terms = x[0, rows].double() * w[0, rows, None].double()
    assert_close(out, terms.sum(0).reshape(1, 1, c), terms.abs().sum(0).reshape(1, 1, c), torch.float16)
    y = randn((1, 3, c), torch.float16, gen)
    sidx = torch.tensor([[n - 1, 2, n - 5]], device=DEVICE)
    order, starts = ref.scatter_plan(sidx, n)
    for add in (False, True):
        got = call(tri.scatter_rows, x, y, sidx, order, starts, add, gen=gen)
        assert_same(got, ref.scatter_rows(x, y, sidx, order, starts, add), f"add={add}")
        del got
