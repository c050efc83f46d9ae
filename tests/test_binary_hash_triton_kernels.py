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
    nothing of effkern but effkern._common (dependencies point ops -> triton -> common)."""
    import ast
    import inspect

    assert tri._SHIFTADD_EPS.value == ref.SHIFTADD_EPS
    tree = ast.parse(inspect.getsource(tri))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("effkern")} <= {"effkern._common"}
