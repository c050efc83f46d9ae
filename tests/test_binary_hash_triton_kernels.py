"""The Triton backend of the binary-hash attention primitives (effkern.triton.binary_hash)
against the torch primitives of effkern.ops.binary_hash.

Runs on CUDA when available, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py before triton is imported); skipped otherwise. ``pack_codes`` must match
exactly. Attention results are compared with the torch primitive run in float64 on the same
values (the same rounded v): the Triton error may be at most twice the error of the torch
primitive run in the test dtype (float32 accumulation, rounded to the output dtype), plus
REL_TOL of the result's scale (and, under the interpreter, which truncates float32 to bfloat16,
one bfloat16 ulp). While a wrapper runs, ``torch.empty`` returns NaN-filled (float) or
garbage-filled (integer) tensors, so an element a kernel fails to write shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tests.triton_helpers import check, run, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

from effkern.ops import binary_hash as ref
from effkern.triton import binary_hash as tri

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(shape, nbits, dtype, gen):
    b, h, n, d = shape
    v = torch.randn((b, h, n, d), generator=gen).to(dtype).to(DEVICE)
    q_codes = ref.pack_codes(torch.randn((b, h, n, nbits), generator=gen)).to(DEVICE)
    k_codes = ref.pack_codes(torch.randn((b, h, n, nbits), generator=gen)).to(DEVICE)
    return v, q_codes, k_codes


# (shape, nbits, dtype): forms x nbits {8, 16, 32, 64} x d {32, 64} x N {1, 7, 197}, odd B / H,
# every dtype; plus N = 785 at d = 128 (several chunks of the two-stage
# sum), nbits off the word grid (100: a partial second word; 1, 5) and d off the power-of-two
# grid (17, 3).
def _cases():
    cases = []
    i = 0
    for nbits in (8, 16, 32, 64):
        for d in (32, 64):
            for n in (1, 7, 197):
                bh = (1, 3) if i % 2 == 0 else (3, 1)
                cases += [((*bh, n, d), nbits, dtype) for dtype in FLOATS]
                i += 1
    cases += [((1, 1, 785, 128), 32, torch.bfloat16), ((1, 3, 50, 17), 100, torch.float32),
              ((2, 1, 9, 3), 1, torch.float16), ((1, 1, 40, 33), 5, torch.float32)]
    return cases


CASES = _cases()
IDS = [f"{'x'.join(map(str, s))}-b{nb}-{str(dt).removeprefix('torch.')}" for s, nb, dt in CASES]


@pytest.mark.parametrize("form", ref.FORMS)
@pytest.mark.parametrize("shape,nbits,dtype", CASES, ids=IDS)
def test_binary_attention_fwd(shape, nbits, dtype, form, gen):
    v, qc, kc = _inputs(shape, nbits, dtype, gen)
    out = run(tri.binary_attention_fwd, qc, kc, v, nbits, form)
    check(out, ref.binary_attention_fwd(qc, kc, v.double(), nbits, form),
          ref.binary_attention_fwd(qc, kc, v, nbits, form), "out")


@pytest.mark.parametrize("form", ref.FORMS)
@pytest.mark.parametrize("shape,nbits,dtype", CASES, ids=IDS)
def test_binary_attention_bwd(shape, nbits, dtype, form, gen):
    v, qc, kc = _inputs(shape, nbits, dtype, gen)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    got = run(tri.binary_attention_bwd, g, qc, kc, v, nbits, form)
    exact = ref.binary_attention_bwd(g.double(), qc, kc, v.double(), nbits, form)
    lowp = ref.binary_attention_bwd(g, qc, kc, v, nbits, form)
    # The code gradients cancel (to 0 at N = 1): their scale is |g| |v|, not the result's.
    scale = g.abs().max().item() * v.abs().max().item()
    for name, o, e, lw in zip(("d_hq", "d_hk", "dv"), got, exact, lowp):
        check(o, e, lw, name, scale if name != "dv" else 0.0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 1, 1), (3, 7, 32), (4, 31), (1, 33), (2, 64), (1, 2, 100),
                                   (5, 1024), (0, 16)])
def test_pack_codes_exact(shape, dtype, gen):
    h = torch.randn(shape, generator=gen).to(dtype)
    h[..., ::7] = 0.0  # zeros (and -0.0 below) count as 0
    h[..., 3::11] = -0.0
    h = h.to(DEVICE)
    got = run(tri.pack_codes, h)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref.pack_codes(h).cpu())


@pytest.mark.parametrize("form", ref.FORMS)
@pytest.mark.parametrize("shape", [(0, 3, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8), (2, 3, 5, 0)])
def test_binary_attention_degenerate_sizes(shape, form, gen):
    """Empty batch / heads / tokens (empty results) and d = 0 (zero code gradients, as the torch
    primitive gives; its unpack_codes cannot reshape empty codes, so only d = 0 is run there)."""
    nbits = 40
    v, qc, kc = _inputs(shape, nbits, torch.float32, gen)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    out = run(tri.binary_attention_fwd, qc, kc, v, nbits, form)
    assert out.shape == v.shape and out.dtype == v.dtype
    got = run(tri.binary_attention_bwd, g, qc, kc, v, nbits, form)
    code_shape = tuple(shape[:3]) + (nbits,)
    assert [(t.shape, t.dtype) for t in got] == [(code_shape, torch.float32), (code_shape, torch.float32),
                                                 (v.shape, v.dtype)]
    if qc.numel():  # d = 0
        for o, want in zip(got, ref.binary_attention_bwd(g, qc, kc, v, nbits, form)):
            torch.testing.assert_close(o, want)
        assert not bool(got[0].any()) and not bool(got[1].any())


@pytest.mark.parametrize("form", ref.FORMS)
def test_hashed_attention_fwd(form, gen):
    """pack both hashes, then the attention: the torch kernel's result on the same codes."""
    v = torch.randn((2, 3, 37, 32), generator=gen).to(DEVICE)
    y_q, y_k = (torch.randn((2, 3, 37, 20), generator=gen).to(DEVICE) for _ in range(2))
    out = run(tri.hashed_attention_fwd, y_q, y_k, v, form)
    check(out, ref.hashed_attention_fwd(y_q, y_k, v.double(), form), ref.hashed_attention_fwd(y_q, y_k, v, form), "out")


def test_constants_and_imports_agree_with_the_op_module():
    """The kernels' copy of the family constant is the op module's; the Triton module imports
    nothing of effkern but effkern._common and the shared Triton helpers (dependencies point
    ops -> triton -> common; no family imports another's files)."""
    import ast
    import inspect

    assert tri._SHIFTADD_EPS.value == ref.SHIFTADD_EPS
    tree = ast.parse(inspect.getsource(tri))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("effkern")} <= {"effkern._common", "effkern.triton.mma"}


# --------------------------------------------------------------------------------------------
# Tensor-core products: the exact split, the piece products, fp32 accuracy against FP32 cores
# --------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from effkern.triton.mma import bf16_widen  # noqa: E402


@triton.jit
def _split3_probe(x_ptr, p_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    p0, p1, p2 = tri._split3(tl.load(x_ptr + i))
    tl.store(p_ptr + i, bf16_widen(p0))
    tl.store(p_ptr + BLOCK + i, bf16_widen(p1))
    tl.store(p_ptr + 2 * BLOCK + i, bf16_widen(p2))


@triton.jit
def _dot_probe(a_ptr, b_ptr, acc_ptr, out_ptr, S: tl.constexpr):
    i = tl.arange(0, S)
    offs = i[:, None] * S + i[None, :]
    out = tri._dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(acc_ptr + offs), True)
    tl.store(out_ptr + offs, out)


FLT_MAX_BITS = 0x7F7FFFFF


def _finite_fp32(count, gen):
    """Random finite fp32 values: random bit patterns (every exponent, subnormals, both signs)
    plus the edges: +-0, the smallest and largest subnormal, the smallest normal, the largest
    values (which bfloat16 rounding to nearest would take to infinity), full 24-bit mantissas."""
    bits = torch.randint(-(2**31), 2**31 - 1, (count,), generator=gen, dtype=torch.int64)
    bits = torch.where((bits & 0x7F800000) == 0x7F800000, bits & ~0x40000000, bits)  # no inf / NaN
    edges = [0, 1 << 31, 1, 0x007FFFFF, 0x00800000, 0x00FFFFFF, FLT_MAX_BITS, FLT_MAX_BITS | (1 << 31),
             0x7F7F8000, 0x7F7F7FFF, 0x3F800001, 0x3FFFFFFF, 0x0000FFFF, 0x00008001, 0x33FFFFFF]
    bits[: len(edges)] = torch.tensor(edges, dtype=torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _finite_values(count, dtype, gen):
    """Random finite values of dtype (as fp32), every exponent: _finite_fp32 for fp32, its
    truncation for bfloat16, random bit patterns without inf / NaN for float16."""
    if dtype == torch.float16:
        bits = torch.randint(-(2**15), 2**15, (count,), generator=gen, dtype=torch.int32)
        bits = torch.where((bits & 0x7C00) == 0x7C00, bits & ~0x4000, bits)
        return bits.to(torch.int16).view(torch.float16).float()
    x = _finite_fp32(count, gen)
    return (x.view(torch.int32) & -65536).view(torch.float32) if dtype == torch.bfloat16 else x


def test_split3_pieces_are_bf16_and_reconstruct_fp32_exactly(gen):
    """x = p0 + p1 2^-8 + p2 2^-16 exactly (checked in float64) with every piece a bfloat16
    value, for random finite fp32 bit patterns and the edge values: what makes the three
    bfloat16 tensor-core products of an fp32 operand exact on a GPU (the interpreter's dot only
    widens these pieces; the split itself is the same integer and fp32 arithmetic there)."""
    block = 4096
    x = _finite_fp32(block, gen)
    p = torch.empty(3 * block, dtype=torch.float32)
    _split3_probe[(1,)](x.to(DEVICE), p := p.to(DEVICE), BLOCK=block)
    p0, p1, p2 = p.cpu().view(3, block)
    for name, piece in (("p0", p0), ("p1", p1), ("p2", p2)):
        assert torch.isfinite(piece).all(), f"{name} overflowed"
        assert torch.equal(piece.bfloat16().float(), piece), f"{name} is not a bfloat16 value"
    recon = p0.double() + p1.double() * 2.0**-8 + p2.double() * 2.0**-16
    bad = recon != x.double()
    assert not bad.any(), f"{int(bad.sum())} values not reconstructed, e.g. {x[bad][:4].tolist()}"
    assert torch.equal(p0.view(torch.int32) & 0xFFFF, torch.zeros_like(p0, dtype=torch.int32))


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16)])
def test_dot_piece_products_are_exact(a_dtype, b_dtype, gen):
    """_dot on tensor cores against permutation matrices: P @ b and a @ P (a single product
    per output element) must give b's rows and a's columns bit for bit, for every finite fp32
    value (subnormals and the largest ones too): a piece dropped or scaled wrongly shows up here."""
    s = 16
    perm = torch.randperm(s, generator=gen)
    p = torch.zeros(s, s)
    p[torch.arange(s), perm] = 1.0
    zero = torch.zeros(s, s)
    for _ in range(4):
        vals = _finite_values(s * s, b_dtype, gen).view(s, s)
        out = torch.empty(s, s)
        _dot_probe[(1,)](p.to(a_dtype).to(DEVICE), vals.to(b_dtype).to(DEVICE), zero.to(DEVICE),
                         out := out.to(DEVICE), S=s)
        assert torch.equal(out.cpu(), (p.double() @ vals.double()).float()), "P @ b"
        a = vals.to(a_dtype)
        if torch.isfinite(a).all():
            _dot_probe[(1,)](a.to(DEVICE), p.to(b_dtype).to(DEVICE), zero.to(DEVICE), out, S=s)
            assert torch.equal(out.cpu(), (a.double() @ p.double()).float()), "a @ P"
    # acc is added: integer-valued operands, exact sums
    a = torch.randint(-8, 9, (s, s), generator=gen).float()
    b = torch.randint(-8, 9, (s, s), generator=gen).float()
    acc = torch.randint(-1000, 1001, (s, s), generator=gen).float()
    _dot_probe[(1,)](a.to(a_dtype).to(DEVICE), b.to(b_dtype).to(DEVICE), acc.to(DEVICE), out, S=s)
    assert torch.equal(out.cpu(), acc + a @ b)


def _max_errors(fn, exact):
    got = fn()
    got = got if isinstance(got, tuple) else (got,)
    exact = exact if isinstance(exact, tuple) else (exact,)
    return [((g.double().cpu() - e.double().cpu()).abs().max().item(), e.abs().max().item())
            for g, e in zip(got, exact)]


# (shape, nbits, dtype): fp32 needs the three pieces; bf16 / fp16 v their own products, fp32
# gradients and KV the pieces; 64 bits: two words, BLOCK_K 32.
ACCURACY_CASES = [((1, 2, 197, 64), 16, torch.float32), ((2, 1, 150, 32), 64, torch.float32),
                  ((1, 2, 197, 64), 16, torch.bfloat16), ((1, 1, 100, 48), 40, torch.float16)]


@pytest.mark.parametrize("form", ref.FORMS)
@pytest.mark.parametrize("shape,nbits,dtype", ACCURACY_CASES,
                         ids=[f"{'x'.join(map(str, s))}-b{nb}-{str(dt).removeprefix('torch.')}"
                              for s, nb, dt in ACCURACY_CASES])
def test_tensor_core_products_as_accurate_as_fp32_cores(shape, nbits, dtype, form, gen, monkeypatch):
    """Forward and backward with the products on tensor cores (TENSOR_CORES, the default) and on
    FP32 cores (the former input_precision="ieee" kernels), on the same fresh inputs whose
    values span 2^-20 .. 2^20 (float16: 2^-10 .. 2^10; a lost low piece would cost ~2^-16 of the result): the
    tensor-core error against float64 is no larger than the FP32-core error plus one fp32
    rounding (2^-24) of the result's scale per block of the token reduction: the piece products
    of a block are summed apart and added to the accumulator once per block (``acc += t``), one
    rounding the FP32-core path does not make. (A single rounding in all was too tight: which
    way each rounds depends on the order numpy's BLAS sums the interpreter's dots, per CPU.)"""
    v, qc, kc = _inputs(shape, nbits, torch.float32, gen)
    span = 10 if dtype == torch.float16 else 20  # float16 ends at 65504
    v = (v * 2.0 ** torch.randint(-span, span + 1, v.shape, generator=gen).to(v.device)).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    exact_f = ref.binary_attention_fwd(qc, kc, v.double(), nbits, form)
    exact_b = ref.binary_attention_bwd(g.double(), qc, kc, v.double(), nbits, form)
    errs = {}
    for tc in (True, False):
        monkeypatch.setattr(tri, "TENSOR_CORES", tc)
        errs[tc] = (_max_errors(lambda: run(tri.binary_attention_fwd, qc, kc, v, nbits, form), exact_f)
                    + _max_errors(lambda: run(tri.binary_attention_bwd, g, qc, kc, v, nbits, form), exact_b))
    for name, (e_tc, scale), (e_ieee, _) in zip(("out", "d_hq", "d_hk", "dv"), errs[True], errs[False]):
        if dtype != torch.float32 and name in ("out", "dv"):
            scale = max(scale, e_ieee)  # rounded to v's dtype: compare up to that rounding
        blocks = -(-shape[2] // 16)  # BLOCK 16 rows of the token reduction (the smallest the kernels use)
        assert e_tc <= e_ieee + blocks * 2.0**-24 * scale, f"{name}: tensor cores {e_tc:.3g} > FP32 cores {e_ieee:.3g}"


@pytest.mark.parametrize("form", ref.FORMS)
def test_folded_chunk_rows_equal_the_chunk_sum(form, gen, monkeypatch):
    """Up to FOLD_CHUNKS chunk rows are summed by the kernels that read KV, more by one
    _chunk_sum_kernel launch: the same order, so the same bits (and both deterministic)."""
    shape, nbits = (1, 1, 785, 32), 40
    v, qc, kc = _inputs(shape, nbits, torch.float32, gen)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    results = []
    for fold in (tri.FOLD_CHUNKS, 0):
        monkeypatch.setattr(tri, "FOLD_CHUNKS", fold)
        results.append((run(tri.binary_attention_fwd, qc, kc, v, nbits, form),
                        *run(tri.binary_attention_bwd, g, qc, kc, v, nbits, form)))
    for name, a, b in zip(("out", "d_hq", "d_hk", "dv"), *results):
        assert torch.equal(a, b), name
    check(results[1][0], ref.binary_attention_fwd(qc, kc, v.double(), nbits, form),
          ref.binary_attention_fwd(qc, kc, v, nbits, form), "out")
