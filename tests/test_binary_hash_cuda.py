"""The CUDA backend of binary-hash attention (csrc/binary_hash, kernels/binary_hash):
``effkern::cuda_binary_attention`` against the torch backend
(:func:`effkern.ops.binary_hash.binary_attention_fwd`, run in float64 as the reference).

CPU (always): the library, when built, registers the op with a schema that fits the Python kernel
calling it and refuses CPU tensors, its constants (kernels/common/constants.h) are the Python
side's; the kernels' per-thread code (kernels/binary_hash/binary_attention.cuh), compiled
for the host through kernels/binary_hash/host_check.cpp and run lane by lane over the
launchers' grids (with the warps' xor butterflies), matches the float64 reference; pass 1's
split over tokens visits every token once, its partials are exactly their splits' sums and
are reduced in ascending split order, a capped grid and an unaligned v give the same bits.
CUDA (marked): the kernels themselves, over forms x nbits x d x N x odd B/H and the three
dtypes, with outputs poisoned beforehand; the token split's edges (one token, one split and
one more, 16 splits), an unaligned v, empty shapes, grid striding, 64-bit offsets, the current
stream, determinism and bad arguments.

Tolerances: float32 rtol 1e-5 with an atol of 1e-5 of the output's largest magnitude
(float32 accumulation of up to N * nbits terms against float64). float16 / bfloat16: at most
twice the torch primitive's own error in that dtype (float32 math, rounded once) plus that
same small atol.
"""

import ctypes

import pytest
import torch

from effkern.ops.binary_hash import SHIFTADD_EPS, binary_attention_fwd, num_words, pack_codes
from tests.cuda_lib_helpers import (assert_cpu_tensors_refused, assert_cuda_op_matches_python, build_host_check,
                                    case_id, cuda_kernels, needs_lib, poison_allocator, require_cuda)

FORMS = {"ecoformer": 0, "shiftadd": 1}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # kernels/common/dtypes.h FloatType
NBITS = [8, 16, 32, 64]
DS = [32, 64, 128]
NS = [1, 7, 197, 785, 3136]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# --------------------------------------------------------------------------------------------
# inputs and references
# --------------------------------------------------------------------------------------------


def make_inputs(gen, b, h, n, d, nbits, dtype):
    v = torch.randn((b, h, n, d), generator=gen).to(dtype)
    q = pack_codes(torch.randn((b, h, n, nbits), generator=gen))
    k = pack_codes(torch.randn((b, h, n, nbits), generator=gen))
    return v, q, k


def bh_for(n):
    """Odd B and H, fewer heads for long sequences (the host check runs thread by thread)."""
    return (3, 5) if n <= 7 else (1, 3) if n <= 197 else (1, 1)


def check_close(got, v, q, k, nbits, form, what=""):
    """got (v's dtype) against binary_attention_fwd in float64; see the module docstring."""
    assert got.shape == v.shape and got.dtype == v.dtype, (what, got.shape, got.dtype)
    ref = binary_attention_fwd(q_codes=q.cpu(), k_codes=k.cpu(), v=v.cpu().double(), nbits=nbits, form=form)
    got64 = got.cpu().double()
    assert torch.isfinite(got64).all(), what
    scale = ref.abs().max().item()
    atol = 1e-5 * scale
    if v.dtype == torch.float32:
        torch.testing.assert_close(got64, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")
        return
    prim = binary_attention_fwd(q_codes=q.cpu(), k_codes=k.cpu(), v=v.cpu(), nbits=nbits, form=form).double()
    prim_err = (prim - ref).abs().max().item()
    err = (got64 - ref).abs().max().item()
    assert err <= 2 * prim_err + atol, f"{what}: max error {err:.3g}, torch {v.dtype} primitive {prim_err:.3g}"


# --------------------------------------------------------------------------------------------
# the library: schema, CPU refusal
# --------------------------------------------------------------------------------------------


@needs_lib
@pytest.mark.parametrize("kernel", sorted(cuda_kernels("binary_hash")))
def test_schema(kernel):
    assert_cuda_op_matches_python(kernel)


@needs_lib
def test_cpu_tensors_are_refused():
    v = torch.zeros(1, 2, 5, 32)
    c = torch.zeros(1, 2, 5, 1, dtype=torch.int32)
    assert_cpu_tensors_refused({
        "cuda_binary_attention": lambda: torch.ops.effkern.cuda_binary_attention(v, c, c, 8, 0),
    })


# --------------------------------------------------------------------------------------------
# the per-thread code, compiled for the host, against the float64 reference
# --------------------------------------------------------------------------------------------


# the host build below runs once: one xdist worker takes the whole file (the CI's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("binary_hash_cuda")


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_check(tmp_path_factory, "binary_hash")
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ek_binary_attention.argtypes = [ptr, ptr, ptr, cint, cint, i64, ptr, ptr, i64, i64, i64, i64]
    lib.ek_binary_attention.restype = cint
    for name, args in [("ek_kv_chunk", [i64]), ("ek_kv_splits", [i64]), ("ek_kv_bits", []),
                       ("ek_kv_items", [i64, i64, i64]), ("ek_kv_grid", [i64, i64, i64]),
                       ("ek_workspace_elems", [i64, i64, i64, i64])]:
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = i64
    lib.ek_workspace_layout.argtypes = [i64, i64, i64, i64, ptr]
    lib.ek_workspace_layout.restype = None
    lib.ek_kv_token_hits.argtypes = [i64, i64, i64, i64, i64, ptr]
    lib.ek_kv_token_hits.restype = cint
    lib.ek_shiftadd_eps.restype = ctypes.c_float
    lib.ek_num_words.argtypes = [i64]
    lib.ek_num_words.restype = i64
    return lib


def test_host_constants_are_the_python_ones(host_lib):
    """The kernels' constants (kernels/common/constants.h) agree with effkern.ops.binary_hash."""
    assert host_lib.ek_shiftadd_eps() == torch.tensor(SHIFTADD_EPS, dtype=torch.float32).item()
    for nbits in (1, 31, 32, 33, 64, 1000, 1024):
        assert host_lib.ek_num_words(nbits) == num_words(nbits)


def host_run(lib, v, q, k, nbits, form, max_grid=0, ws_out=None):
    """The host transcription's out; ws_out (a list) receives the workspace. max_grid > 0 caps
    pass 1's grid (grid-stride loop). v may be a view at any element offset (the kernels' vector
    loads then fall back to element loads)."""
    b, h, n, d = v.shape
    bh = b * h
    out = torch.empty(v.shape, dtype=v.dtype)
    out.view(BITS[v.dtype]).fill_(0x5B5B if v.dtype != torch.float32 else 0x5B5B5B5B)
    ws = torch.full((max(lib.ek_workspace_elems(bh, n, nbits, d), 1),), float("nan"))
    rc = lib.ek_binary_attention(v.data_ptr(), q.data_ptr(), k.data_ptr(), TYPE_CODE[v.dtype], FORMS[form], nbits,
                                 ws.data_ptr(), out.data_ptr(), bh, n, d, max_grid)
    assert rc == 0
    if ws_out is not None:
        ws_out.append(ws)
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_host_binary_attention(host_lib, gen, form, nbits, d, n):
    b, h = bh_for(n)
    for dtype in DTYPES if n <= 785 else [torch.float32, torch.bfloat16]:
        v, q, k = make_inputs(gen, b, h, n, d, nbits, dtype)
        check_close(host_run(host_lib, v, q, k, nbits, form), v, q, k, nbits, form,
                    f"{form} nbits={nbits} d={d} n={n} {case_id(dtype)}")


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("nbits", [1, 5, 33, 100, 1024])
def test_host_odd_nbits_and_padding_bits(host_lib, gen, form, nbits):
    """nbits not a multiple of 8 / 32, up to 1024; garbage bits beyond nbits are ignored."""
    v, q, k = make_inputs(gen, 1, 3, 41, 64, nbits, torch.float32)
    out = host_run(host_lib, v, q, k, nbits, form)
    check_close(out, v, q, k, nbits, form, f"{form} nbits={nbits}")
    if nbits % 32:
        junk = torch.tensor(-(1 << (nbits % 32)), dtype=torch.int32)  # every bit above nbits
        qj, kj = q.clone(), k.clone()
        qj[..., -1] |= junk
        kj[..., -1] |= junk
        assert torch.equal(host_run(host_lib, v, qj, kj, nbits, form), out)


def test_host_shiftadd_zero_t(host_lib):
    """t = 0 (v = 0, no bits): out = 0 / max(0, eps) = 0, not NaN."""
    v = torch.zeros(1, 1, 3, 32)
    c = torch.zeros(1, 1, 3, 1, dtype=torch.int32)
    assert torch.equal(host_run(host_lib, v, c, c, 8, "shiftadd"), torch.zeros_like(v))


def test_host_rejects(host_lib):
    v = torch.zeros(1, 1, 3, 48)
    c = torch.zeros(1, 1, 3, 1, dtype=torch.int32)
    out, ws = torch.empty_like(v), torch.empty(1000)
    f = host_lib.ek_binary_attention
    assert f(v.data_ptr(), c.data_ptr(), c.data_ptr(), 2, 0, 8, ws.data_ptr(), out.data_ptr(), 1, 3, 48, 0) == 3
    assert f(v.data_ptr(), c.data_ptr(), c.data_ptr(), 2, 2, 8, ws.data_ptr(), out.data_ptr(), 1, 3, 32, 0) == 2
    assert f(v.data_ptr(), c.data_ptr(), c.data_ptr(), 2, 0, 0, ws.data_ptr(), out.data_ptr(), 1, 3, 32, 0) == 2


# --------------------------------------------------------------------------------------------
# pass 1's split over tokens (kernels/binary_hash: kv_chunk / kv_splits, kv_item, kv_reduce),
# through the host transcription
# --------------------------------------------------------------------------------------------

SPLIT_NS = [1, 2, 31, 255, 256, 257, 511, 785, 3136, 4097, 12544]  # one token, < / = / > one split


def unaligned(v):
    """v's values in a view one element past an aligned base (not 16-byte aligned)."""
    buf = torch.empty(v.numel() + 1, dtype=v.dtype)
    view = buf[1:].view(v.shape)
    view.copy_(v)
    return view


def codes_to_signs(codes, nbits, signed):
    """[BH, N, W] int32 -> [BH, N, nbits] float64 h (+-1 signed, 0/1 unsigned)."""
    bits = torch.stack([(codes[..., i // 32] >> (i % 32)) & 1 for i in range(nbits)], dim=-1).double()
    return 2 * bits - 1 if signed else bits


@pytest.mark.parametrize("n", SPLIT_NS + [100003, 2**31 + 5, 2**40])
def test_host_kv_plan(host_lib, n):
    """Chunks: a multiple of 32, at least 256 tokens, at most 16 of them, each non-empty, covering N;
    the workspace holds KV, ksum and (more than one split) every split's partials, in order."""
    chunk, splits = host_lib.ek_kv_chunk(n), host_lib.ek_kv_splits(n)
    assert chunk % 32 == 0 and chunk >= 256 and 1 <= splits <= 16, (chunk, splits)
    assert (splits - 1) * chunk < n <= splits * chunk
    assert chunk == max(256, 32 * -(-(-(-n // 16)) // 32))  # else the smallest multiple of 32 >= N / 16
    for bh, nbits, d in [(1, 1, 32), (384, 16, 64), (7, 100, 128)]:
        if n > 2**20:
            continue
        off = (ctypes.c_int64 * 4)()
        host_lib.ek_workspace_layout(bh, n, nbits, d, off)
        e, r = bh * nbits * d, bh * nbits
        p = splits if splits > 1 else 0
        assert list(off) == [0, e if p else -1, e * (1 + p), e * (1 + p) + r if p else -1]
        assert host_lib.ek_workspace_elems(bh, n, nbits, d) == (e + r) * (1 + p)
        assert host_lib.ek_kv_items(bh, n, nbits) == bh * splits * -(-nbits // host_lib.ek_kv_bits())
        assert host_lib.ek_kv_grid(bh, n, nbits) == -(-host_lib.ek_kv_items(bh, n, nbits) // 4)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n, bh, nbits, max_grid", [
    (1, 3, 8, 0), (7, 2, 33, 0), (256, 2, 16, 0), (257, 3, 16, 2), (785, 2, 64, 0), (3136, 1, 16, 3),
    (12544, 2, 16, 0), (30011, 1, 9, 5),
])
def test_host_kv_every_token_once(host_lib, n, bh, nbits, d, max_grid):
    """Pass 1's walk (grid-stride loop over items, lanes, token slots): every (head, token, bit
    group, column group) visited exactly once, also with a grid capped below the items."""
    groups, col_groups = -(-nbits // host_lib.ek_kv_bits()), d // 8
    hits = torch.zeros(bh * n * groups * col_groups, dtype=torch.int32)
    assert host_lib.ek_kv_token_hits(bh, n, nbits, d, max_grid, hits.data_ptr()) == 0
    assert int(hits.min()) == 1 and int(hits.max()) == 1


def _partials(ws, lib, bh, n, nbits, d):
    off = (ctypes.c_int64 * 4)()
    lib.ek_workspace_layout(bh, n, nbits, d, off)
    s, e, r = lib.ek_kv_splits(n), bh * nbits * d, bh * nbits
    kv, ksum = ws[off[0]:off[0] + e].view(bh, nbits, d), ws[off[2]:off[2] + r].view(bh, nbits)
    if s == 1:
        return kv, ksum, None, None
    part_kv = ws[off[1]:off[1] + s * e].view(s, bh, nbits, d)
    part_cnt = ws[off[3]:off[3] + s * r].view(torch.int32).view(s, bh, nbits)
    return kv, ksum, part_kv, part_cnt


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", [1, 200, 257, 785, 4097])
def test_host_kv_partials_are_the_splits_sums(host_lib, gen, form, dtype, d, n):
    """Integer-valued v, so every sum is exact: split s's partial sums and counts are exactly those of
    its tokens s * chunk .. (s + 1) * chunk - 1 (a token missed, doubled or in the wrong split would
    show), and KV, ksum are their totals."""
    b, h, nbits = 1, 2, 33
    v = torch.randint(-8, 9, (b, h, n, d), generator=gen).to(dtype)
    q = pack_codes(torch.randn((b, h, n, nbits), generator=gen))
    k = pack_codes(torch.randn((b, h, n, nbits), generator=gen))
    ws = []
    host_run(host_lib, v, q, k, nbits, form, ws_out=ws)
    kv, ksum, part_kv, part_cnt = _partials(ws[0], host_lib, b * h, n, nbits, d)
    signed = form == "ecoformer"
    hk = codes_to_signs(k.view(b * h, n, -1), nbits, signed)
    vv = v.view(b * h, n, d).double()
    assert torch.equal(kv.double(), torch.einsum("znb,znd->zbd", hk, vv))
    assert torch.equal(ksum.double(), hk.sum(1))
    chunk, splits = host_lib.ek_kv_chunk(n), host_lib.ek_kv_splits(n)
    assert (part_kv is None) == (splits == 1)
    for s in range(splits if splits > 1 else 0):
        sl = slice(s * chunk, min(n, (s + 1) * chunk))
        assert torch.equal(part_kv[s].double(), torch.einsum("znb,znd->zbd", hk[:, sl], vv[:, sl])), s
        bits = codes_to_signs(k.view(b * h, n, -1)[:, sl], nbits, False)
        assert torch.equal(part_cnt[s].double(), bits.sum(1)), s


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("n", [257, 785, 3136])
def test_host_kv_reduction_order(host_lib, gen, form, n):
    """KV is the partials' float32 sum in ascending split order, bit for bit (0 + p0 + p1 + ...)."""
    b, h, d, nbits = 1, 3, 64, 16
    v, q, k = make_inputs(gen, b, h, n, d, nbits, torch.float32)
    ws = []
    host_run(host_lib, v, q, k, nbits, form, ws_out=ws)
    kv, _, part_kv, _ = _partials(ws[0], host_lib, b * h, n, nbits, d)
    total = torch.zeros_like(kv)
    for s in range(part_kv.shape[0]):
        total = total + part_kv[s]
    assert torch.equal(kv, total)
    shuffled = torch.zeros_like(kv)
    for s in reversed(range(part_kv.shape[0])):
        shuffled = shuffled + part_kv[s]
    if part_kv.shape[0] > 2:  # the order is observable, so the check above means something
        assert not torch.equal(kv, shuffled)


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("d", DS)
def test_host_grid_stride_and_unaligned_v(host_lib, gen, dtype, d):
    """A pass-1 grid capped at 1 or 3 blocks, and v not 16-byte aligned (element loads instead of
    16-byte vectors): the same bits as the plain run."""
    for form in FORMS:
        v, q, k = make_inputs(gen, 1, 3, 300, d, 40, dtype)
        ref = host_run(host_lib, v, q, k, 40, form)
        check_close(ref, v, q, k, 40, form, f"{form} d={d} {case_id(dtype)}")
        for max_grid in (1, 3):
            assert torch.equal(host_run(host_lib, v, q, k, 40, form, max_grid=max_grid), ref), max_grid
        vu = unaligned(v)
        assert vu.data_ptr() % 16 != 0
        assert torch.equal(host_run(host_lib, vu, q, k, 40, form), ref)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("n", [1, 255, 256, 257, 12544])
def test_host_split_edges(host_lib, gen, form, n):
    """One token, just under / at / over one split, and the largest benchmark N (16 splits)."""
    v, q, k = make_inputs(gen, 1, 1 if n > 4096 else 3, n, 32, 16, torch.float32)
    check_close(host_run(host_lib, v, q, k, 16, form), v, q, k, 16, form, f"{form} n={n}")


# --------------------------------------------------------------------------------------------
# the kernels (GPU)
# --------------------------------------------------------------------------------------------


def cuda_run(v, q, k, nbits, form):
    vc, qc, kc = v.cuda(), q.cuda(), k.cuda()
    poison_allocator(v.numel() * v.element_size())
    return torch.ops.effkern.cuda_binary_attention(vc, qc, kc, nbits, FORMS[form])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_cuda_binary_attention(gen, dtype, form, nbits, d, n):
    require_cuda()
    b, h = (3, 5) if n <= 785 else (3, 3)
    v, q, k = make_inputs(gen, b, h, n, d, nbits, dtype)
    got = cuda_run(v, q, k, nbits, form)
    check_close(got, v, q, k, nbits, form, f"{form} nbits={nbits} d={d} n={n} {case_id(dtype)}")


@pytest.mark.cuda
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("nbits", [1, 5, 33, 100, 1024])
def test_cuda_odd_nbits_and_padding_bits(gen, form, nbits):
    require_cuda()
    v, q, k = make_inputs(gen, 3, 1, 41, 64, nbits, torch.float32)
    out = cuda_run(v, q, k, nbits, form)
    check_close(out, v, q, k, nbits, form, f"{form} nbits={nbits}")
    if nbits % 32:
        junk = torch.tensor(-(1 << (nbits % 32)), dtype=torch.int32)
        q[..., -1] |= junk
        k[..., -1] |= junk
        assert torch.equal(cuda_run(v, q, k, nbits, form), out)


@pytest.mark.cuda
def test_cuda_matches_host_check_and_is_deterministic(host_lib, gen):
    """Same inputs twice: bit-identical outputs (no atomics); close to the host transcription
    (the device may contract multiply-adds into FMAs)."""
    require_cuda()
    for form in FORMS:
        v, q, k = make_inputs(gen, 1, 3, 785, 128, 64, torch.float32)
        a, b2 = cuda_run(v, q, k, 64, form), cuda_run(v, q, k, 64, form)
        assert torch.equal(a, b2)
        torch.testing.assert_close(a.cpu(), host_run(host_lib, v, q, k, 64, form), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4097, 12544, 30011])
def test_cuda_token_splits(host_lib, gen, dtype, form, d, n):
    """Pass 1's split over tokens: one token, under / at / over one split (256), odd N, the largest
    benchmark N and beyond (16 splits); against float64, the host transcription (same split and
    reduction order) and itself (bit-identical twice)."""
    require_cuda()
    b, h = (3, 5) if n <= 257 else (1, 3) if n <= 4097 else (1, 1)
    v, q, k = make_inputs(gen, b, h, n, d, 40, dtype)
    got = cuda_run(v, q, k, 40, form)
    check_close(got, v, q, k, 40, form, f"{form} d={d} n={n} {case_id(dtype)}")
    assert torch.equal(cuda_run(v, q, k, 40, form), got)
    if n <= 257 or (n <= 4097 and d == 64):
        # the same pass 1 bit for bit; pass 2 may contract multiply-adds (one bfloat16 ulp after rounding)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(got.cpu().float(), host_run(host_lib, v, q, k, 40, form).float(), **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("d", DS)
def test_cuda_unaligned_v(gen, dtype, d):
    """v one element past a 16-byte boundary (a contiguous view with an offset): element loads
    instead of 16-byte vectors, the same bits."""
    require_cuda()
    for form in FORMS:
        v, q, k = make_inputs(gen, 2, 3, 785, d, 16, dtype)
        buf = torch.empty(v.numel() + 1, dtype=dtype, device="cuda")
        vu = buf[1:].view(v.shape)
        vu.copy_(v.cuda())
        assert vu.data_ptr() % 16 != 0 and vu.is_contiguous()
        got = torch.ops.effkern.cuda_binary_attention(vu, q.cuda(), k.cuda(), 16, FORMS[form])
        assert torch.equal(got, cuda_run(v, q, k, 16, form)), form


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_cuda_empty(dtype):
    require_cuda()
    for shape in [(0, 3, 5, 32), (2, 0, 5, 64), (2, 3, 0, 128)]:
        v = torch.zeros(shape, dtype=dtype, device="cuda")
        c = torch.zeros(shape[:3] + (2,), dtype=torch.int32, device="cuda")
        out = torch.ops.effkern.cuda_binary_attention(v, c, c, 40, 1)
        assert out.shape == shape and out.dtype == dtype


@pytest.mark.cuda
def test_cuda_grid_stride(gen):
    """More (head, word) blocks and token tiles than one grid covers (kMaxGrid = 2^20)."""
    require_cuda()
    bh = (1 << 20) + 3
    v, q, k = make_inputs(gen, bh, 1, 2, 32, 8, torch.float32)
    for form in FORMS:
        got = cuda_run(v, q, k, 8, form).cpu()
        ref = binary_attention_fwd(q_codes=q, k_codes=k, v=v.double(), nbits=8, form=form)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_64bit_offsets(gen):
    """v and out of more than 2^31 elements: element offsets past int32."""
    require_cuda()
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    b, h, n, d, nbits = 1, 5, (1 << 22) + 7, 128, 8  # 5 * n * 128 > 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn((b, h, n, d), generator=g, device="cuda", dtype=torch.float16)
    q = torch.randint(0, 256, (b, h, n, 1), generator=g, device="cuda", dtype=torch.int32)
    k = torch.randint(0, 256, (b, h, n, 1), generator=g, device="cuda", dtype=torch.int32)
    for form in FORMS:
        got = torch.ops.effkern.cuda_binary_attention(v, q, k, nbits, FORMS[form])
        ref = binary_attention_fwd(q_codes=q[:, -1:], k_codes=k[:, -1:], v=v[:, -1:], nbits=nbits,
                                   form=form)  # the last head, float32 math
        torch.testing.assert_close(got[:, -1:, -1000:].float(), ref[..., -1000:, :].float(), rtol=2e-3, atol=2e-3)
        del got


@pytest.mark.cuda
def test_cuda_current_stream(gen):
    """The kernels run on the current stream: on a side stream held up by a sleep, the op must
    see the copy queued before it."""
    require_cuda()
    old, q, k = make_inputs(gen, 4, 6, 197, 64, 16, torch.float32)
    new = torch.randn(old.shape, generator=gen)
    vc, new_c, qc, kc = old.cuda(), new.cuda(), q.cuda(), k.cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        vc.copy_(new_c)
        out = torch.ops.effkern.cuda_binary_attention(vc, qc, kc, 16, 0)
    s.synchronize()
    check_close(out, new, q, k, 16, "ecoformer", "side stream")


def _bad_calls():
    f = torch.ops.effkern.cuda_binary_attention
    return [
        (lambda v, q, k: f(v.cpu(), q, k, 40, 0), "'v' must be a CUDA tensor"),
        (lambda v, q, k: f(v.double(), q, k, 40, 0), "'v' must be float16, bfloat16 or float32, got float64"),
        (lambda v, q, k: f(v[0], q, k, 40, 0), "'v' must be 4-D"),
        (lambda v, q, k: f(v.transpose(1, 2), q, k, 40, 0), "'v' must be contiguous"),
        (lambda v, q, k: f(v[..., :48].contiguous(), q, k, 40, 0), "head dim d = v.size\\(3\\) must be 32, 64 or 128, got 48"),
        (lambda v, q, k: f(v, q, k, 0, 0), "'nbits' must be in \\[1, 1024\\], got 0"),
        (lambda v, q, k: f(v, q, k, 1025, 0), "'nbits' must be in \\[1, 1024\\], got 1025"),
        (lambda v, q, k: f(v, q, k, 40, 2), "'form' must be 0 \\(ecoformer\\) or 1 \\(shiftadd\\), got 2"),
        (lambda v, q, k: f(v, q.cpu(), k, 40, 0), "'q_codes' must be on the same CUDA device"),
        (lambda v, q, k: f(v, q, k.long(), 40, 0), "'k_codes' must be int32, got int64"),
        (lambda v, q, k: f(v, q, k, 64, 0), "'q_codes' must be \\[B, H, N, ceil\\(nbits / 32\\)\\]"),
        (lambda v, q, k: f(v, q, k[:, :, :-1], 40, 0), "'k_codes' must be \\[B, H, N, ceil\\(nbits / 32\\)\\]"),
        (lambda v, q, k: f(v, q.transpose(0, 1).contiguous().transpose(0, 1), k, 40, 0), "'q_codes' must be contiguous"),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_cuda_bad_arguments(i):
    require_cuda()
    call, msg = _bad_calls()[i]
    v = torch.randn(2, 3, 5, 64, device="cuda")
    q = torch.zeros(2, 3, 5, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=msg):
        call(v, q, q.clone())
