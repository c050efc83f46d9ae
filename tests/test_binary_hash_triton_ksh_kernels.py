"""The Triton backend of the KSH hash primitives (effkern.triton.binary_hash_ksh) against the torch
primitives of effkern.ops.binary_hash.

Runs on CUDA when available, else on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py before triton is imported); skipped otherwise. Every Triton result is compared
with the torch primitive run in float64 on the same values. The tolerance comes from the dtype:
the Triton error may be at most twice the error of the torch primitive run on the test dtype
(which computes in float32 and rounds to the output dtype), plus 1e-5 of the result's scale (and,
under the interpreter, which truncates float32 to bfloat16, one bfloat16 ulp). While a wrapper
runs, ``torch.empty`` returns NaN-filled tensors (garbage in integer ones), so an output or
scratch element that a kernel fails to write shows up as a mismatch.

The fused hash-and-pack (``ksh_hash_codes``) must give exactly pack_codes of the hash kernel's y,
bit for bit. The products run as 3xTF32 on tensor cores; their accuracy is measured against the
same kernels run with IEEE float32 products (the kernels' former arithmetic) on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_helpers import check, f64, randn, run, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

from effkern.ops import binary_hash as ref
from effkern.triton import binary_hash_ksh as tri

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# 3xTF32 error / IEEE float32 error, at most (measured here: 0.92-1.15 for y, 0.97-1.0 for grad_x)
SPLIT_SLACK = 1.25

# (B, H, N, d, m, b): one token; d off the power-of-two grid (masked lanes); m = 25 (the
# published models) and 7 (BLOCK_M = 16); several token blocks at N = 197 (BLOCK_N = 64, a
# partial last block); b = 8, 16, 64, and b = 200 with d = 80 (several b chunks and d chunks).
SHAPES = [(1, 1, 1, 32, 25, 8), (3, 3, 7, 17, 7, 16), (1, 3, 197, 64, 25, 64), (3, 1, 197, 17, 25, 8),
          (1, 3, 7, 64, 7, 64), (3, 3, 197, 32, 7, 16), (1, 2, 70, 80, 25, 200)]


def _inputs(shape, dtype, gen, param_dtype=torch.float32):
    """x, anchors (norms ~1, like normalised queries), mu (~ the mean of K), proj."""
    b, h, n, d, m, nb = shape
    x = randn((b, h, n, d), gen, dtype)
    anchors = randn((h, m, d), gen, param_dtype, 1.0 / math.sqrt(d))
    mu = (0.3 + randn((h, m), gen, std=0.1)).to(param_dtype)
    proj = randn((h, nb, m), gen, param_dtype)
    return x, anchors, mu, proj


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_ksh_hash_fwd(dtype, shape, gen):
    args = _inputs(shape, dtype, gen)
    y = run(tri.ksh_hash_fwd, *args)
    assert y.dtype == torch.float32
    check(y, ref.ksh_hash_fwd(*f64(*args)), ref.ksh_hash_fwd(*args), "ksh_hash_fwd")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_ksh_hash_bwd(dtype, shape, gen):
    args = _inputs(shape, dtype, gen)
    grad = randn((*shape[:3], shape[5]), gen)
    gx = run(tri.ksh_hash_bwd, grad, *args)
    check(gx, ref.ksh_hash_bwd(*f64(grad, *args)), ref.ksh_hash_bwd(grad, *args), "ksh_hash_bwd")


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ksh_hash_param_dtypes(param_dtype, gen):
    """anchors / mu / proj of another float dtype are loaded and converted to float32."""
    shape = (2, 3, 37, 32, 25, 16)
    args = _inputs(shape, torch.float16, gen, param_dtype)
    grad = randn((*shape[:3], shape[5]), gen, torch.bfloat16)
    lowp_args = (args[0], *(t.float() for t in args[1:]))  # the torch primitive, float32 parameters
    check(run(tri.ksh_hash_fwd, *args), ref.ksh_hash_fwd(*f64(*args)), ref.ksh_hash_fwd(*lowp_args),
          "ksh_hash_fwd")
    check(run(tri.ksh_hash_bwd, grad, *args), ref.ksh_hash_bwd(*f64(grad, *args)),
          ref.ksh_hash_bwd(grad.float(), *lowp_args), "ksh_hash_bwd")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the float16 inf, interpreted
@pytest.mark.parametrize("dtype", FLOATS)
def test_ksh_hash_zero_row(dtype, gen):
    """A zero row of x stays zero after the norm guard (D = ||a||^2); its gradient is
    g_xn / eps (huge: inf in float16, as in the torch primitive)."""
    shape = (2, 2, 70, 17, 25, 16)
    x, anchors, mu, proj = _inputs(shape, dtype, gen)
    x[1, 0, 3] = 0
    x[0, 1, 69] = 0
    args = (x, anchors, mu, proj)
    check(run(tri.ksh_hash_fwd, *args), ref.ksh_hash_fwd(*f64(*args)), ref.ksh_hash_fwd(*args), "ksh_hash_fwd")
    grad = randn((*shape[:3], shape[5]), gen)
    gx = run(tri.ksh_hash_bwd, grad, *args)
    exact = ref.ksh_hash_bwd(*f64(grad, *args))
    lowp = ref.ksh_hash_bwd(grad, *args)
    zero = (x == 0).all(-1)
    check(gx[~zero], exact[~zero], lowp[~zero], "ksh_hash_bwd (other rows)")
    if dtype == torch.float16:
        assert torch.equal(gx[zero].isinf(), lowp[zero].isinf())
        fin = ~gx[zero].isinf()
        assert torch.equal(gx[zero][~fin], lowp[zero][~fin])
        assert bool(gx[zero][fin].isfinite().all())
    else:
        check(gx[zero], exact[zero], lowp[zero], "ksh_hash_bwd (zero rows)")


def test_ksh_hash_deterministic(gen):
    shape = (2, 3, 197, 32, 25, 64)
    args = _inputs(shape, torch.float32, gen)
    grad = randn((*shape[:3], shape[5]), gen)
    assert torch.equal(tri.ksh_hash_fwd(*args), tri.ksh_hash_fwd(*args))
    assert torch.equal(tri.ksh_hash_bwd(grad, *args), tri.ksh_hash_bwd(grad, *args))


@pytest.mark.parametrize("shape", [(2, 3, 0, 32, 25, 8), (2, 3, 5, 32, 0, 8), (2, 3, 5, 32, 25, 0)])
def test_ksh_hash_degenerate(shape, gen):
    """No tokens, no anchors or no bits: the torch primitive's result (empty, or zeros)."""
    args = _inputs(shape, torch.float32, gen)
    grad = randn((*shape[:3], shape[5]), gen)
    y = run(tri.ksh_hash_fwd, *args)
    assert y.shape == (*shape[:3], shape[5]) and y.dtype == torch.float32
    if shape[4] == 0:
        assert bool((y == 0).all())
    gx = run(tri.ksh_hash_bwd, grad, *args)
    assert gx.shape == args[0].shape
    assert torch.equal(gx, ref.ksh_hash_bwd(grad, *args))


def test_ksh_hash_imports_only_common():
    """Dependencies point ops -> triton -> common: the kernels import nothing else of effkern."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(tri))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("effkern")} <= {"effkern._common"}
    assert tri._NORM_EPS.value == ref.NORM_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ksh_hash_huge_and_tiny_rows(dtype, gen):
    """Rows whose squares overflow (|x| ~ 1e20, 1e37) or underflow float32, over several d
    chunks (d = 150: the running power-of-two scale grows chunk by chunk), against the torch
    kernel in float64."""
    shape = (1, 2, 70, 150, 25, 16)
    x, anchors, mu, proj = _inputs(shape, torch.float32, gen)
    x[0, 0, :5] *= 1e20
    x[0, 0, 6, 100:] *= 1e20  # only the last chunks are huge
    x[0, 1, 7] *= 1e37
    x[0, 1, 8] *= 1e-25
    x[0, 1, 9, :64] = 0  # a first chunk of zeros
    x = x.to(dtype)
    args = (x, anchors, mu, proj)
    y = run(tri.ksh_hash_fwd, *args)
    check(y, ref.ksh_hash_fwd(*f64(*args)), ref.ksh_hash_fwd(*args), "ksh_hash_fwd")
    grad = randn((*shape[:3], shape[5]), gen)
    gx = run(tri.ksh_hash_bwd, grad, *args)
    exact = ref.ksh_hash_bwd(*f64(grad, *args))
    lowp = ref.ksh_hash_bwd(grad, *args)
    # Gradients scale as 1 / ||x||: compare per row, where they are normal float32 numbers (the
    # 1e37 row's are subnormal, which hardware may flush); finite everywhere.
    assert bool(gx.isfinite().all())
    rows = exact.abs().amax(-1, keepdim=True)
    normal = (rows > 2**10 * torch.finfo(torch.float32).tiny)[..., 0]
    assert int((~normal).sum()) == 1
    check((gx.double() / rows)[normal].to(gx.dtype), (exact / rows)[normal], (lowp.double() / rows)[normal].to(lowp.dtype),
          "ksh_hash_bwd")


# b = 8 (one partial word), 32 (one full word), 33 (a word and one bit), 200 (several b chunks,
# a partial last word), 64 with m = 64 (the benchmark's BLOCK_M, 8 warps) and a partial token block
CODE_SHAPES = [(1, 1, 1, 32, 25, 8), (3, 3, 7, 17, 7, 32), (2, 1, 70, 64, 25, 33), (1, 2, 70, 80, 25, 200),
               (2, 2, 97, 64, 64, 64)]


@pytest.mark.parametrize("shape", CODE_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_ksh_hash_codes_is_hash_then_pack(dtype, shape, gen):
    """The fused kernel's int32 words are pack_codes of the hash kernel's y, bit for bit."""
    args = _inputs(shape, dtype, gen)
    codes = run(tri.ksh_hash_codes, *args)
    assert codes.dtype == torch.int32 and codes.shape == (*shape[:3], (shape[5] + 31) // 32)
    assert torch.equal(codes, ref.pack_codes(run(tri.ksh_hash_fwd, *args)))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the unused 2^k / eps branch, interpreted
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ksh_hash_codes_param_dtypes_and_zero_rows(param_dtype, gen):
    """Parameters of other float dtypes, zero rows of x and huge rows: still hash-then-pack."""
    shape = (2, 3, 37, 32, 25, 48)
    x, anchors, mu, proj = _inputs(shape, torch.bfloat16, gen, param_dtype)
    x[1, 0, 3] = 0
    x[0, 2, :4] *= 1e30
    args = (x, anchors, mu, proj)
    assert torch.equal(run(tri.ksh_hash_codes, *args), ref.pack_codes(run(tri.ksh_hash_fwd, *args)))


@pytest.mark.parametrize("shape", [(2, 3, 0, 32, 25, 8), (2, 3, 5, 32, 0, 40), (2, 3, 5, 32, 25, 0)])
def test_ksh_hash_codes_degenerate(shape, gen):
    """No tokens or no bits: empty; no anchors: y = 0, so every word is 0."""
    args = _inputs(shape, torch.float32, gen)
    codes = run(tri.ksh_hash_codes, *args)
    assert codes.shape == (*shape[:3], (shape[5] + 31) // 32) and codes.dtype == torch.int32
    assert torch.equal(codes, ref.pack_codes(ref.ksh_hash_fwd(*args)))


def _max_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double().cpu() - exact.cpu()).abs().max().item()


@pytest.mark.parametrize("dtype", FLOATS)
def test_ksh_split_tf32_as_accurate_as_ieee(dtype, gen):
    """The 3xTF32 tensor-core products against the same kernels with IEEE float32 products:
    the largest error against float64, of y and of grad_x, at most SPLIT_SLACK times the IEEE
    kernels' (measured on the same inputs; both also pass check() in the tests above)."""
    shape = (2, 2, 130, 64, 64, 64)  # the benchmark's d, m, b; a partial token block
    args = _inputs(shape, dtype, gen)
    grad = randn((*shape[:3], shape[5]), gen)
    y_exact = ref.ksh_hash_fwd(*f64(*args))
    e_split = _max_err(tri._hash(*args, codes=False), y_exact)
    e_ieee = _max_err(tri._hash(*args, codes=False, tensor_cores=False), y_exact)
    print(f"y: split {e_split:.3g} ieee {e_ieee:.3g}")
    assert e_split <= SPLIT_SLACK * e_ieee, f"y: 3xTF32 error {e_split:.3g} > {SPLIT_SLACK} x IEEE {e_ieee:.3g}"
    x, anchors, _mu, proj = args
    g_exact = ref.ksh_hash_bwd(*f64(grad, *args))
    e_split = _max_err(tri._hash_bwd(grad, x, anchors, proj), g_exact)
    e_ieee = _max_err(tri._hash_bwd(grad, x, anchors, proj, tensor_cores=False), g_exact)
    print(f"grad_x: split {e_split:.3g} ieee {e_ieee:.3g}")
    assert e_split <= SPLIT_SLACK * e_ieee, f"grad_x: 3xTF32 error {e_split:.3g} > {SPLIT_SLACK} x IEEE {e_ieee:.3g}"
