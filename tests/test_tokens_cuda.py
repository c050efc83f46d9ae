"""The CUDA backend of the token gather/scatter primitives (csrc/tokens, kernels/tokens):
``effkern::cuda_token_gather`` and ``effkern::cuda_token_scatter`` against the torch backend
(:func:`effkern.ops.tokens.gather_rows` / :func:`scatter_rows` with :func:`scatter_plan`).

CPU (always): the library, when built, registers both ops with schemas that fit the Python kernels calling
them and refuses
CPU tensors with a clear error; the launch plan (vector width, lanes per row, grid) and the
kernels' row code, compiled for the host through kernels/tokens/host_check.cpp and run thread by
thread over the launchers' grid, match the torch backend bit for bit. CUDA (marked): the kernels
themselves do, with their own outputs poisoned beforehand, on misaligned inputs too; empty
shapes, more rows than one grid covers, 64-bit offsets, the current stream, and bad arguments.

Bit for bit: copies (gather, scatter replace) and scatter add without repeated targets match
the torch backend exactly; scatter add with repeated targets matches an ascending-k float32
transcription exactly (the torch backend's scatter_add_ may sum in another order: close only).

compute-sanitizer: ``test_cuda_sanitizer_smoke`` runs every kernel instantiation once on small
shapes (``-k sanitizer_smoke``).
"""

import ctypes

import pytest
import torch

from effkern.ops.tokens import gather_rows, scatter_plan, scatter_rows
from tests.cuda_lib_helpers import (assert_cpu_tensors_refused, assert_cuda_op_matches_python, build_host_check,
                                    case_id, cuda_kernels, needs_lib, poison_allocator, require_cuda)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IDX_DTYPES = [torch.int64, torch.int32]
NS = [1, 2, 3, 197, 785]
# 1, 3, 67: rows of 2..268 bytes, not multiples of 16 (narrow vectors); 384, 1024: 16-byte rows.
CS = [1, 3, 67, 384, 1024]
# Storage offsets (in elements) giving x a base address 2/4/8 bytes off a 16-byte boundary.
OFFSETS = [0, 1, 2, 4]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
TYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # kernels/common/dtypes.h FloatType


# --------------------------------------------------------------------------------------------
# inputs and references
# --------------------------------------------------------------------------------------------


def placed(t, offset=0, device="cpu"):
    """A contiguous copy of t on device whose data starts `offset` elements into its storage
    (so its base address is offset * element_size bytes past the allocator's alignment)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.storage_offset() == offset
    return out


def make_x(gen, shape, dtype):
    return torch.randn(shape, generator=gen).to(dtype)


def far_indices(dtype):
    """Index values far outside any row range (overflow bait for offset arithmetic)."""
    info = torch.iinfo(dtype)
    return [info.min, info.max, info.min + 1, -1]


def make_idx(gen, b, n, k, kind, dtype):
    """[b, k] indices into n rows. kind: 'perm' (distinct, in range; k <= n), 'perm_oob'
    (distinct in-range ones mixed with out-of-range ones, negative, >= n and extreme),
    'repeats' (in range, with repeats), 'repeats_oob' (both)."""
    if kind.startswith("perm"):
        rows = [torch.randperm(max(n, 1), generator=gen)[:k] for _ in range(b)]
        idx = torch.stack(rows) if b else torch.zeros(0, k, dtype=torch.int64)
        idx = idx[:, :k]
    else:
        idx = torch.randint(0, max(n, 1), (b, k), generator=gen)
    if kind.endswith("oob") and b * k:
        bad = torch.tensor([-1, -2, n, n + 1, 2 * n + 5] + far_indices(dtype), dtype=torch.int64)
        mask = torch.rand(b, k, generator=gen) < 0.3
        pick = bad[torch.randint(0, len(bad), (b, k), generator=gen)]
        idx = torch.where(mask, pick, idx)
    return idx.to(dtype).contiguous()


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


def assert_bits_equal(got, ref, what=""):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype)
    if not torch.equal(bits(got), bits(ref)):
        bad = (bits(got) != bits(ref)).nonzero()
        raise AssertionError(f"{what}: {len(bad)} elements differ, first at {bad[0].tolist()}")


def seq_scatter(x, y, idx, add):
    """Transcription of the scatter kernels' per-row semantics, in ascending k: replace (the
    last k wins) or add (float32, x first, then y rows in ascending k, rounded once). Runs
    over the repeat rank (k is the r-th index aimed at its row): one rank's targets are
    distinct within a batch, so each step is a plain indexed update."""
    n = x.shape[1]
    t = idx.to(torch.int64)
    valid = (t >= 0) & (t < n)
    k = t.shape[1]
    srt, pos = torch.sort(t, dim=1, stable=True)
    first = torch.searchsorted(srt, srt, side="left")  # first position of each value
    rank = torch.empty_like(t).scatter_(1, pos, torch.arange(k).expand_as(t) - first)
    acc = x.float().clone() if add else x.clone()
    for r in range(int(rank.max()) + 1 if k else 0):
        bs, ks = ((rank == r) & valid).nonzero(as_tuple=True)
        if add:
            acc[bs, t[bs, ks]] += y[bs, ks].float()
        else:
            acc[bs, t[bs, ks]] = y[bs, ks]
    return acc.to(x.dtype)


def targeted_rows(idx, n):
    """[B, N] bool: rows some in-range index points at."""
    b = idx.shape[0]
    mask = torch.zeros(b, n + 1, dtype=torch.bool)
    t = idx.to(torch.int64)
    t = torch.where((t >= 0) & (t < n), t, n)
    mask.scatter_(1, t, True)
    return mask[:, :n]


def check_gather(run, x, idx, what):
    got = run(x, idx)
    assert_bits_equal(got, gather_rows(x, idx), what)


def check_scatter(run, x, y, idx, what, repeats):
    """run(x, y, order, starts, add) -> out, for both modes, against the torch backend."""
    n = x.shape[1]
    order, starts = scatter_plan(idx, n)
    untouched = ~targeted_rows(idx, n)
    for add in (False, True):
        tag = f"{what} add={add}"
        got = run(x, y, order, starts, add)
        ref = scatter_rows(x, y, idx, order, starts, add)
        assert_bits_equal(got, seq_scatter(x, y, idx, add), tag + " vs ascending-k transcription")
        if add and repeats:
            torch.testing.assert_close(got, ref, msg=tag)
        else:
            assert_bits_equal(got, ref, tag)
        assert_bits_equal(got[untouched], x[untouched], tag + " untargeted rows")


def idx_cases(n):
    """(kind, k) pairs for n rows: distinct targets with k = 0, a few, n; repeats; out of range."""
    cases = [("perm", 0), ("perm", min(n, 5)), ("perm", n), ("perm_oob", n), ("repeats", 2 * n + 1),
             ("repeats_oob", n + 3)]
    return cases


def check_gather_cases(run, gen, x):
    """run (a gather) on every idx_cases index set, in both index dtypes."""
    b, n, _ = x.shape
    for idx_dtype in IDX_DTYPES:
        for kind, k in idx_cases(n):
            idx = make_idx(gen, b, n, k, kind, idx_dtype)
            check_gather(run, x, idx, f"{case_id(idx_dtype)} {kind} k={k}")


def check_scatter_cases(run, gen, x):
    """run (a scatter, both modes) on every idx_cases index set, the index dtypes alternating
    (the kernels see int64 plans only)."""
    b, n, c = x.shape
    for i, (kind, k) in enumerate(idx_cases(n)):
        idx_dtype = IDX_DTYPES[i % 2]
        idx = make_idx(gen, b, n, k, kind, idx_dtype)
        y = make_x(gen, (b, k, c), x.dtype)
        what = f"{case_id(idx_dtype)} {kind} k={k}"
        check_scatter(run, x, y, idx, what, repeats=kind.startswith("repeats"))


def over_shapes(test):
    """Parametrizes ``test`` over dtype (DTYPES) x n rows (NS) x row length c (CS)."""
    for name, values in (("dtype", DTYPES), ("n", NS), ("c", CS)):
        test = pytest.mark.parametrize(name, values, ids=case_id)(test)
    return test


# --------------------------------------------------------------------------------------------
# the library: ops registered, CPU tensors refused
# --------------------------------------------------------------------------------------------


@needs_lib
@pytest.mark.parametrize("kernel", sorted(cuda_kernels("tokens")))
def test_library_registers_ops(kernel):
    assert_cuda_op_matches_python(kernel)


@needs_lib
def test_cpu_tensors_are_refused():
    x = torch.zeros(2, 5, 4)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    order, starts = scatter_plan(idx, 5)
    assert_cpu_tensors_refused({
        "cuda_token_gather": lambda: torch.ops.effkern.cuda_token_gather(x, idx),
        "cuda_token_scatter": lambda: torch.ops.effkern.cuda_token_scatter(x, x[:, :3], order, starts, True),
    })


# --------------------------------------------------------------------------------------------
# the launch plan and the row code, compiled for the host, against the torch backend
# --------------------------------------------------------------------------------------------


# the host build below runs once: one xdist worker takes the whole file (the CI's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("tokens_cuda")


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_check(tmp_path_factory, "tokens")
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ek_token_gather_plan.argtypes = [ptr, ptr, i64, i64, i64, ptr]
    lib.ek_token_scatter_plan.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, cint, ptr]
    lib.ek_token_gather.argtypes = [ptr, ptr, cint, ptr, i64, i64, i64, i64, i64]
    lib.ek_token_scatter.argtypes = [ptr, ptr, ptr, ptr, cint, cint, ptr, i64, i64, i64, i64, i64]
    return lib


def _poisoned(shape, dtype, offset):
    out = placed(torch.empty(shape, dtype=dtype), offset)
    out.view(BITS[dtype]).fill_(0x5B5B if dtype != torch.float32 else 0x5B5B5B5B)
    return out


def host_gather(lib, max_grid=0, x_offset=0, out_offset=0):
    def run(x, idx):
        b, n, c = x.shape
        xs = placed(x, x_offset)
        out = _poisoned((b, idx.shape[1], c), x.dtype, out_offset)
        rc = lib.ek_token_gather(xs.data_ptr(), idx.data_ptr(), int(idx.dtype == torch.int64), out.data_ptr(),
                                 b, n, idx.shape[1], c * x.element_size(), max_grid)
        assert rc == 0
        return out

    return run


def host_scatter(lib, max_grid=0, x_offset=0, y_offset=0, out_offset=0):
    def run(x, y, order, starts, add):
        b, n, c = x.shape
        xs, ys = placed(x, x_offset), placed(y, y_offset)
        out = _poisoned(x.shape, x.dtype, out_offset)
        rc = lib.ek_token_scatter(xs.data_ptr(), ys.data_ptr(), order.data_ptr(), starts.data_ptr(),
                                  TYPE_CODE[x.dtype], int(add), out.data_ptr(), b, n, y.shape[1], c, max_grid)
        assert rc == 0
        return out

    return run


def _plan(lib, fn, *args):
    info = (ctypes.c_int64 * 4)()
    vb = fn(*args, info)
    assert vb == info[0]
    return {"vb": info[0], "lanes": 1 << info[1], "nvec": info[2], "grid": info[3]}


BASE = 1 << 20  # a 256-byte aligned fake address for the plan tests


@pytest.mark.parametrize(
    "row_bytes, x_addr, vb, lanes",
    [
        (384 * 2, BASE, 16, 16),  # bf16 C=384: 48 vectors, 16 lanes x 3
        (768 * 2, BASE, 16, 32),  # bf16 C=768: 96 vectors, 32 lanes x 3
        (1024 * 2, BASE, 16, 32),  # bf16 C=1024: 128 vectors
        (1024 * 4, BASE, 16, 32),
        (384 * 2, BASE + 8, 8, 32),  # x 8 bytes off: 96 8-byte vectors
        (384 * 2, BASE + 2, 2, 32),  # x 2 bytes off: 384 2-byte vectors
        (67 * 2, BASE, 2, 8),  # 67 vectors: 8 lanes (72 slots) beat 16 (80) and 32 (96)
        (67 * 4, BASE, 4, 8),
        (3 * 4, BASE, 4, 4),  # 3 vectors: 4 lanes
        (1 * 2, BASE, 2, 1),
        (12, BASE, 4, 4),
        (40 * 16, BASE, 16, 8),  # 40 vectors: 8 lanes x 5 (40 slots)
        (5, BASE, 0, None),  # odd row size: no vector fits
        (6, BASE + 1, 0, None),  # odd address
    ],
)
def test_host_gather_plan(host_lib, row_bytes, x_addr, vb, lanes):
    p = _plan(host_lib, host_lib.ek_token_gather_plan, x_addr, BASE + 4096, 64, 197, row_bytes)
    assert p["vb"] == vb
    if vb:
        assert p["lanes"] == lanes and p["nvec"] * vb == row_bytes
        rows_per_block = 256 // lanes
        assert p["grid"] == min(-(-64 * 197 // rows_per_block), 65536)


def test_host_scatter_plan(host_lib):
    f = host_lib.ek_token_scatter_plan
    assert _plan(host_lib, f, BASE, BASE, BASE, 2, 5, 3, 384, 2)["vb"] == 16
    assert _plan(host_lib, f, BASE, BASE + 4, BASE, 2, 5, 3, 384, 2)["vb"] == 4  # y counts
    assert _plan(host_lib, f, BASE, BASE + 4, BASE, 2, 5, 0, 384, 2)["vb"] == 16  # unless K = 0
    assert _plan(host_lib, f, BASE, BASE, BASE + 8, 2, 5, 3, 384, 2)["vb"] == 8  # out counts
    assert _plan(host_lib, f, BASE + 2, BASE, BASE, 2, 5, 3, 384, 4)["vb"] == 0  # fp32 at 2 bytes
    assert _plan(host_lib, f, BASE, BASE, BASE, 2, 5, 3, 3, 4)["vb"] == 4
    assert _plan(host_lib, f, BASE, BASE, BASE, 2, 5, 3, 3, 2)["vb"] == 2
    p = _plan(host_lib, f, BASE, BASE, BASE, 1 << 23, 4, 1, 1, 4)  # 32M rows of 1 vector
    assert p["lanes"] == 1 and p["grid"] == 65536  # capped: grid-strided


@over_shapes
def test_host_gather(host_lib, gen, dtype, n, c):
    b = 3
    x = make_x(gen, (b, n, c), dtype)
    check_gather_cases(host_gather(host_lib), gen, x)
    idx = make_idx(gen, b, n, n + 2, "repeats_oob", torch.int64)
    for off in OFFSETS[1:]:
        check_gather(host_gather(host_lib, x_offset=off), x, idx, f"x offset {off}")
        check_gather(host_gather(host_lib, out_offset=off), x, idx, f"out offset {off}")
    check_gather(host_gather(host_lib, max_grid=1), x, idx, "grid of 1 block")
    check_gather(host_gather(host_lib, max_grid=3), x, idx, "grid of 3 blocks")


@over_shapes
def test_host_scatter(host_lib, gen, dtype, n, c):
    b = 3
    x = make_x(gen, (b, n, c), dtype)
    check_scatter_cases(host_scatter(host_lib), gen, x)
    idx = make_idx(gen, b, n, 2 * n + 1, "repeats_oob", torch.int64)
    y = make_x(gen, (b, 2 * n + 1, c), dtype)
    for off in OFFSETS[1:]:
        for name in ("x", "y", "out"):
            run = host_scatter(host_lib, **{f"{name}_offset": off})
            check_scatter(run, x, y, idx, f"{name} offset {off}", repeats=True)
    check_scatter(host_scatter(host_lib, max_grid=1), x, y, idx, "grid of 1 block", repeats=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_host_scatter_add_rounds_once(host_lib, dtype):
    """Many small y rows into one target: summed in float32 and rounded once, not per add."""
    x = torch.ones(1, 2, 8, dtype=dtype)
    y = torch.full((1, 64, 8), 2.0**-12, dtype=dtype)  # below half an ulp of 1 in fp16/bf16
    idx = torch.zeros(1, 64, dtype=torch.int64)
    order, starts = scatter_plan(idx, 2)
    got = host_scatter(host_lib)(x, y, order, starts, True)
    assert torch.equal(got[0, 0], torch.full((8,), 1 + 64 * 2.0**-12, dtype=torch.float32).to(dtype))
    assert torch.equal(got[0, 1], x[0, 1])


def test_host_malformed_plan_stays_in_bounds(host_lib, gen):
    """order/starts outside their ranges (a plan not from scatter_plan) are clamped/skipped,
    never followed: starts clamped to [0, K], order entries outside [0, K) skipped (replace:
    the row keeps x)."""
    b, n, k, c = 2, 4, 3, 8
    x, y = make_x(gen, (b, n, c), torch.float32), make_x(gen, (b, k, c), torch.float32)
    order = torch.tensor([[3, -1, 2], [0, 1, 1 << 40]], dtype=torch.int64)
    starts = torch.tensor([[-7, 1, 1, 3, 99], [0, 0, 2, 3, 3]], dtype=torch.int64)
    rep = host_scatter(host_lib)(x, y, order, starts, False)
    add = host_scatter(host_lib)(x, y, order, starts, True)
    # batch 0: row 0 = [0, 1) -> order 3 = K (skipped); row 1 empty; row 2 = [1, 3) -> -1 (skip), 2;
    # row 3 = [3, 3) after clamping 99 -> 3: empty.
    assert torch.equal(rep[0, 0], x[0, 0]) and torch.equal(add[0, 0], x[0, 0])
    assert torch.equal(rep[0, 2], y[0, 2]) and torch.equal(add[0, 2], x[0, 2] + y[0, 2])
    assert torch.equal(rep[0, 3], x[0, 3]) and torch.equal(add[0, 3], x[0, 3])
    # batch 1: row 1 = [0, 2) -> 0, 1; row 2 = [2, 3) -> 2^40 (skipped).
    assert torch.equal(rep[1, 1], y[1, 1]) and torch.equal(add[1, 1], (x[1, 1] + y[1, 0]) + y[1, 1])
    assert torch.equal(rep[1, 2], x[1, 2]) and torch.equal(add[1, 2], x[1, 2])


# --------------------------------------------------------------------------------------------
# the CUDA kernels against the torch backend (GPU only)
# --------------------------------------------------------------------------------------------


def cuda_gather(x_offset=0):
    def run(x, idx):
        xc, ic = placed(x, x_offset, "cuda"), idx.cuda()
        poison_allocator(x.shape[0] * idx.shape[1] * x.shape[2] * x.element_size())
        out = torch.ops.effkern.cuda_token_gather(xc, ic)
        torch.cuda.synchronize()
        return out.cpu()

    return run


def cuda_scatter(x_offset=0, y_offset=0):
    def run(x, y, order, starts, add):
        xc, yc = placed(x, x_offset, "cuda"), placed(y, y_offset, "cuda")
        oc, sc = order.cuda(), starts.cuda()
        poison_allocator(x.numel() * x.element_size())
        out = torch.ops.effkern.cuda_token_scatter(xc, yc, oc, sc, add)
        torch.cuda.synchronize()
        return out.cpu()

    return run


@pytest.mark.cuda
@over_shapes
def test_cuda_gather(gen, dtype, n, c):
    require_cuda()
    b = 3
    x = make_x(gen, (b, n, c), dtype)
    check_gather_cases(cuda_gather(), gen, x)
    idx = make_idx(gen, b, n, n + 2, "repeats_oob", torch.int32)
    for off in OFFSETS[1:]:
        check_gather(cuda_gather(x_offset=off), x, idx, f"x offset {off}")


@pytest.mark.cuda
@over_shapes
def test_cuda_scatter(gen, dtype, n, c):
    require_cuda()
    b = 3
    x = make_x(gen, (b, n, c), dtype)
    check_scatter_cases(cuda_scatter(), gen, x)
    idx = make_idx(gen, b, n, 2 * n + 1, "repeats_oob", torch.int64)
    y = make_x(gen, (b, 2 * n + 1, c), dtype)
    for off in OFFSETS[1:]:
        check_scatter(cuda_scatter(x_offset=off), x, y, idx, f"x offset {off}", repeats=True)
        check_scatter(cuda_scatter(y_offset=off), x, y, idx, f"y offset {off}", repeats=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_cuda_empty(gen, dtype):
    """Empty inputs give correctly shaped outputs; N = 0 with K > 0 gathers zero rows; K = 0
    scatters nothing (a copy of x)."""
    require_cuda()
    gather, scatter = torch.ops.effkern.cuda_token_gather, torch.ops.effkern.cuda_token_scatter
    for b, n, k, c in [(0, 5, 3, 8), (2, 5, 0, 8), (2, 0, 3, 8), (2, 5, 3, 0), (0, 0, 0, 0)]:
        x = make_x(gen, (b, n, c), dtype).cuda()
        y = make_x(gen, (b, k, c), dtype).cuda()
        idx = make_idx(gen, b, n, k, "repeats_oob", torch.int64).cuda()
        out = gather(x, idx)
        assert out.shape == (b, k, c) and out.dtype == dtype
        ref = torch.zeros(b, k, c, dtype=dtype) if n == 0 else gather_rows(x.cpu(), idx.cpu())
        assert torch.equal(out.cpu(), ref)
        order, starts = scatter_plan(idx, n)
        for add in (False, True):
            out = scatter(x, y, order, starts, add)
            assert out.shape == (b, n, c) and out.dtype == dtype
            assert torch.equal(out, x)  # nothing in range to scatter


@pytest.mark.cuda
def test_cuda_many_rows_grid_stride(gen):
    """More rows than one grid covers (65536 blocks of 256 one-vector rows): grid-strided."""
    require_cuda()
    rows = (1 << 24) + 5
    x = make_x(gen, (1, 7, 1), torch.float32)
    idx = torch.randint(-1, 8, (1, rows), generator=gen, dtype=torch.int32)
    got = torch.ops.effkern.cuda_token_gather(x.cuda(), idx.cuda())
    assert torch.equal(got, gather_rows(x.cuda(), idx.cuda()))
    xs = make_x(gen, (1, rows, 1), torch.float16).cuda()
    ys = make_x(gen, (1, 3, 1), torch.float16).cuda()
    tgt = torch.tensor([[rows - 1, 0, rows - 1]], device="cuda")
    order, starts = scatter_plan(tgt, rows)
    rep = torch.ops.effkern.cuda_token_scatter(xs, ys, order, starts, False)
    assert torch.equal(bits(rep), bits(scatter_rows(xs, ys, tgt, order, starts, False)))
    add = torch.ops.effkern.cuda_token_scatter(xs, ys, order, starts, True)
    assert torch.equal(add[0, 1:-1], xs[0, 1:-1])
    assert torch.equal(add[0, 0], (xs[0, 0].float() + ys[0, 1].float()).half())
    assert torch.equal(add[0, -1], (xs[0, -1].float() + ys[0, 0].float() + ys[0, 2].float()).half())


@pytest.mark.cuda
def test_cuda_64bit_offsets(gen):
    """Outputs of more than 2^31 elements: element offsets past int32, and (an odd C, so
    2-byte vectors) vector offsets too."""
    require_cuda()
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    rows, c = (1 << 21) + (1 << 16) + 3, 1023  # rows * c > 2^31
    x = make_x(gen, (1, 197, c), torch.bfloat16).cuda()
    idx = torch.randint(0, 197, (1, rows), generator=gen).cuda()
    idx[0, -3:] = torch.tensor([196, -1, 197])
    out = torch.ops.effkern.cuda_token_gather(x, idx)
    for s in range(0, rows, 1 << 19):
        assert torch.equal(out[:, s : s + (1 << 19)], gather_rows(x, idx[:, s : s + (1 << 19)])), s
    del out
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = torch.randn((1, rows, c), generator=g, device="cuda", dtype=torch.bfloat16)
    edges = torch.tensor([[rows - 1, rows - 2, 0, rows, rows - 1]])  # last row twice, one out of range
    tgt = torch.cat([torch.randint(0, rows, (1, 60), generator=gen), edges], 1).cuda()
    ys = make_x(gen, (1, tgt.shape[1], c), torch.bfloat16).cuda()
    order, starts = scatter_plan(tgt, rows)
    for add in (False, True):
        got = torch.ops.effkern.cuda_token_scatter(xs, ys, order, starts, add)
        rows_in = {}  # target -> its row: float32 sum in ascending k (add) or the last y row
        for k in range(tgt.shape[1]):
            t = int(tgt[0, k])
            if 0 <= t < rows:
                rows_in[t] = rows_in.get(t, xs[0, t].float()) + ys[0, k].float() if add else ys[0, k]
        ref = xs.clone()
        for t, v in rows_in.items():
            ref[0, t] = v.to(torch.bfloat16)
        assert torch.equal(got, ref), add
        del got, ref


@pytest.mark.cuda
def test_cuda_current_stream(gen):
    """The kernels run on the current stream: on a side stream held up by a sleep, the op must
    see the copy queued before it, not the tensor's older contents."""
    require_cuda()
    old, new = make_x(gen, (64, 197, 384), torch.bfloat16), make_x(gen, (64, 197, 384), torch.bfloat16)
    idx = make_idx(gen, 64, 197, 150, "perm", torch.int64)
    y = make_x(gen, (64, 150, 384), torch.bfloat16)
    order, starts = scatter_plan(idx, 197)
    xc, new_c, ic, yc, oc, sc = old.cuda(), new.cuda(), idx.cuda(), y.cuda(), order.cuda(), starts.cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copy
        xc.copy_(new_c)
        g = torch.ops.effkern.cuda_token_gather(xc, ic)
        sc_out = torch.ops.effkern.cuda_token_scatter(xc, yc, oc, sc, True)
    s.synchronize()
    assert torch.equal(g.cpu(), gather_rows(new, idx))
    assert torch.equal(sc_out.cpu(), scatter_rows(new, y, idx, order, starts, True))


@pytest.mark.cuda
def test_cuda_sanitizer_smoke(gen):
    """Every kernel instantiation once, small shapes, out-of-range indices included: the test
    to run under compute-sanitizer (memcheck / racecheck)."""
    require_cuda()
    for dtype in DTYPES:
        for c, off in [(1024, 0), (384, 4), (384, 2), (67, 1), (3, 0)]:  # 16/8/4/2-byte vectors
            x = make_x(gen, (2, 197, c), dtype)
            for idx_dtype in IDX_DTYPES:
                idx = make_idx(gen, 2, 197, 150, "repeats_oob", idx_dtype)
                check_gather(cuda_gather(x_offset=off), x, idx, f"{case_id(dtype)} c={c} off={off}")
            idx = make_idx(gen, 2, 197, 211, "repeats_oob", torch.int64)
            y = make_x(gen, (2, 211, c), dtype)
            check_scatter(cuda_scatter(x_offset=off), x, y, idx, f"{case_id(dtype)} c={c} off={off}", True)


def _bad_calls():
    g, s = (lambda *a: torch.ops.effkern.cuda_token_gather(*a)), (lambda *a: torch.ops.effkern.cuda_token_scatter(*a))
    return [
        (lambda x, y, i, o, st: g(x.cpu(), i), "'x' must be a CUDA tensor"),
        (lambda x, y, i, o, st: g(x.double(), i), "'x' must be float16, bfloat16 or float32, got float64"),
        (lambda x, y, i, o, st: g(x[0], i), "'x' must be 3-D"),
        (lambda x, y, i, o, st: g(x.transpose(1, 2), i), "'x' must be contiguous"),
        (lambda x, y, i, o, st: g(x, i.cpu()), "'idx' must be on the same CUDA device"),
        (lambda x, y, i, o, st: g(x, i[0]), "'idx' must be 2-D"),
        (lambda x, y, i, o, st: g(x, i[:1]), r"'idx' must be \[B, K\] with B = x.size\(0\) = 2"),
        (lambda x, y, i, o, st: g(x, i.float()), "'idx' must be int64 or int32, got float32"),
        (lambda x, y, i, o, st: g(x, i.short()), "'idx' must be int64 or int32, got int16"),
        (lambda x, y, i, o, st: g(x, i.t().contiguous().t()), "'idx' must be contiguous"),
        (lambda x, y, i, o, st: s(x.cpu(), y, o, st, False), "'x' must be a CUDA tensor"),
        (lambda x, y, i, o, st: s(x.half(), y, o, st, False), "'y' must have the dtype of 'x'"),
        (lambda x, y, i, o, st: s(x, y.cpu(), o, st, False), "'y' must be on the same CUDA device"),
        (lambda x, y, i, o, st: s(x, y[0], o, st, False), "'y' must be 3-D"),
        (lambda x, y, i, o, st: s(x, y[:, :, :-1], o, st, False), r"'y' must be \[B, K, C\]"),
        (lambda x, y, i, o, st: s(x, y[:1], o, st, False), r"'y' must be \[B, K, C\]"),
        (lambda x, y, i, o, st: s(x, y.transpose(0, 1).contiguous().transpose(0, 1), o, st, True),
         "'y' must be contiguous"),
        (lambda x, y, i, o, st: s(x, y, o.int(), st, False), "'order' must be int64, got int32"),
        (lambda x, y, i, o, st: s(x, y, o[:, :-1], st, False), r"'order' must be \[B, K\] with K = y.size\(1\) = 3"),
        (lambda x, y, i, o, st: s(x, y, o.cpu(), st, False), "'order' must be on the same CUDA device"),
        (lambda x, y, i, o, st: s(x, y, o, st[:, :-1], False), r"'starts' must be \[B, N \+ 1\] with N \+ 1"),
        (lambda x, y, i, o, st: s(x, y, o, st.int(), True), "'starts' must be int64, got int32"),
        (lambda x, y, i, o, st: s(x, y, o, st[:1], True), r"'starts' must be \[B, N \+ 1\] with B"),
        (lambda x, y, i, o, st: s(x, y, o, st.t().contiguous().t(), True), "'starts' must be contiguous"),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_cuda_bad_arguments(case):
    require_cuda()
    call, match = _bad_calls()[case]
    x = torch.zeros(2, 5, 4, device="cuda")
    y = torch.zeros(2, 3, 4, device="cuda")
    idx = torch.tensor([[0, 4, 1], [2, 2, 3]], device="cuda")
    order, starts = scatter_plan(idx, 5)
    with pytest.raises(RuntimeError, match=match):
        call(x, y, idx, order, starts)
