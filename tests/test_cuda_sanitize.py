"""Every CUDA kernel of the op registry on a few small cases: the tests scripts/gpu_check.sh runs
under compute-sanitizer (memcheck, then racecheck with EFFKERN_SANITIZE_SMALL=1).

The kernels come from ``effkern._dispatch.OPS`` (each dispatcher with a cuda implementation),
never from a hand list: each is called through its cuda implementation with the canonical
kernel arguments (the torch reference's signature) and compared with the torch reference (bit
for bit, on the same GPU tensors; binary attention: against float64 on the CPU). A new CUDA kernel without cases here fails ``test_every_cuda_kernel_has_cases`` on
CPU, so the sanitizer step can never silently skip it. Cases cover every kernel instantiation:
the integer kernels' register and looped row paths, every vector width of the token kernels
with out-of-range and repeated indices, every head dim, form and dtype of binary attention.
"""

import inspect
import os

import pytest
import torch

from effkern.ops.binary_hash import pack_codes
from effkern.ops.tokens import scatter_plan
from tests.cuda_lib_helpers import case_id, cuda_kernels, require_cuda
from tests.test_binary_hash_cuda import check_close
from tests.test_binary_hash_cuda import make_inputs as make_binary_inputs
from tests.test_tokens_cuda import assert_bits_equal, make_idx, make_x

SMALL = os.environ.get("EFFKERN_SANITIZE_SMALL", "") not in ("", "0")
INT_RANGE = {torch.int8: (-128, 127), torch.int16: (-(2**15), 2**15 - 1), torch.int32: (-(2**31), 2**31 - 1)}


def _exact(got, ref, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    if got.is_floating_point():
        assert_bits_equal(got, ref, what)
    else:
        assert torch.equal(got, ref), what


# --------------------------------------------------------------------------------------------
# cases: kernel name -> builder(gen) yielding (kernel arguments by name, on the CPU; compare;
# label); compare(got, kw, ref_fn, label) checks the cuda result got of the arguments kw (on the
# GPU). By name: the kernel signature's order is the torch reference's, whatever it is.
# --------------------------------------------------------------------------------------------


def _against_reference(got, kw, ref_fn, what):
    _exact(got, ref_fn(**kw), what)


def _int_rows(gen, dtypes):
    shapes = [(3, 197), (2, 785), (2, 4099)] if SMALL else [(1, 1), (3, 197), (5, 785), (2, 1000), (3, 4099),
                                                           (2, 16385), (1, 65537)]
    for rows, c in shapes:  # register paths (<= 1024, <= 4096) and the looped path
        for dt in dtypes:
            lo, hi = INT_RANGE[dt]
            yield torch.randint(lo, hi + 1, (rows, c), generator=gen).to(dt), f"{case_id(dt)} {rows}x{c}"


def int_softmax_cases(gen):
    for x, tag in _int_rows(gen, (torch.int8, torch.int16, torch.int32)):
        for x0, n, out_bits in ((-10, 15, 8), (-3, 15, 16)):
            yield dict(x=x, x0=x0, n=n, out_bits=out_bits), _against_reference, f"{tag} x0={x0} n={n} out_bits={out_bits}"


def int_gelu_cases(gen):
    for x, tag in _int_rows(gen, (torch.int8, torch.int16)):
        for x0, n, out_bits in ((-6, 23, 8), (-1, 23, 16)):
            yield dict(x=x, x0=x0, n=n, out_bits=out_bits), _against_reference, f"{tag} x0={x0} n={n} out_bits={out_bits}"


def int_layernorm_cases(gen):
    for x, tag in _int_rows(gen, (torch.int8, torch.int16)):
        bias = torch.randint(-(2**30), 2**30 + 1, (x.shape[1],), generator=gen).to(torch.int32)
        yield dict(x=x, bias_int=bias, iters=10), _against_reference, tag


def _token_shapes():
    return ((2, 197), (1, 785)) if SMALL else ((1, 1), (2, 197), (3, 785), (64, 197))


# rows of 1024 / 384 / 67 / 3 elements: 16-, 8-, 4- (or 2-) byte vectors in every dtype
TOKEN_CS = (1024, 384, 67, 3)
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def token_gather_cases(gen):
    for b, n in _token_shapes():
        for c in TOKEN_CS:
            for dt in FLOATS:
                x = make_x(gen, (b, n, c), dt)
                for idx_dt in (torch.int64, torch.int32):  # out-of-range and repeated indices
                    idx = make_idx(gen, b, n, max(1, int(0.7 * n)), "repeats_oob", idx_dt)
                    yield dict(x=x, idx=idx), _against_reference, f"{case_id(dt)} {b}x{n}x{c} idx {case_id(idx_dt)}"


def token_scatter_cases(gen):
    for b, n in _token_shapes():
        for c in TOKEN_CS:
            for dt in FLOATS:
                x = make_x(gen, (b, n, c), dt)
                k = max(1, int(0.7 * n))
                y = make_x(gen, (b, k, c), dt)
                tag = f"{case_id(dt)} {b}x{n}x{c}"
                idx = make_idx(gen, b, n, k, "repeats_oob", torch.int64)
                order, starts = scatter_plan(idx, n)
                yield (dict(x=x, y=y, idx=idx, order=order, starts=starts, add=False), _against_reference,
                       f"replace {tag}")
                # unique targets for "add": x + y rounded once, the same in any summation order
                uniq = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
                order, starts = scatter_plan(uniq, n)
                yield (dict(x=x, y=y, idx=uniq, order=order, starts=starts, add=True), _against_reference,
                       f"add {tag}")


def _binary_shapes():
    b, h, n = (1, 2, 197) if SMALL else (2, 3, 197)
    for form in ("ecoformer", "shiftadd"):
        for d in (32, 64, 128):
            for i, dt in enumerate(FLOATS):
                nbits = (16, 33, 64)[i]  # one, two (a padded one) and two full code words
                yield b, h, n, d, nbits, dt, form, f"{form} d={d} nbits={nbits} {case_id(dt)}"
    # N = 785 > 256 tokens: several token splits, so the partials buffer and the pass that sums
    # them in order run under the sanitizer too (N = 197 is a single split).
    for form in ("ecoformer", "shiftadd"):
        yield 1, 2, 785, 64, 16, FLOATS[0], form, f"{form} n=785 (token splits) {case_id(FLOATS[0])}"


def binary_attention_cases(gen):
    def compare(got, kw, ref_fn, what):
        check_close(got, kw["v"], kw["q_codes"], kw["k_codes"], kw["nbits"], kw["form"], what)

    for b, h, n, d, nbits, dt, form, tag in _binary_shapes():
        v, q, k = make_binary_inputs(gen, b, h, n, d, nbits, dt)
        yield dict(q_codes=q, k_codes=k, v=v, nbits=nbits, form=form), compare, tag


def hashed_attention_cases(gen):
    def compare(got, kw, ref_fn, what):
        y_q, y_k = kw["y_q"].cpu(), kw["y_k"].cpu()
        check_close(got, kw["v"], pack_codes(y_q), pack_codes(y_k), y_q.shape[-1], kw["form"], what)

    for b, h, n, d, nbits, dt, form, tag in _binary_shapes():
        v = make_x(gen, (b, h, n, d), dt)
        y_q, y_k = (torch.randn((b, h, n, nbits), generator=gen).to(dt) for _ in range(2))
        yield dict(y_q=y_q, y_k=y_k, v=v, form=form), compare, tag


def _shift_weight(gen, n, k, bits, base_lo, base_hi):
    from tests.test_shift_cuda import random_weight
    return random_weight(gen, n, k, bits, base_lo, base_hi)


def shift_linear_cases(gen):
    def compare(got, kw, ref_fn, what):  # float32 sums in another order: one rounding of the dtype apart
        ref = ref_fn(**kw)
        ulp = 2.0**-7 if ref.dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(got.float(), ref.float(), rtol=ulp, atol=1e-3, msg=what)

    # (M, N, K): split-K at one 16-row tile, 64-row tiles with N tails and K not a multiple of 64
    shapes = [(1, 136, 128), (70, 200, 208)] if SMALL else [(1, 136, 128), (16, 384, 1536), (70, 200, 208),
                                                          (130, 264, 336)]
    for (m, n, k), bits, dt in ((s, b, d) for s in shapes for b in (4, 5) for d in (torch.bfloat16, torch.float16)):
        w = _shift_weight(gen, n, k, bits, -10, 2)
        x = make_x(gen, (m, k), dt)
        for bias in (make_x(gen, (n,), dt), None):
            yield (dict(x=x, codes=w.codes, base=w.base, bias=bias, in_features=k, bits=bits), compare,
                   f"{m}x{n}x{k} bits={bits} {case_id(dt)}{' bias' if bias is not None else ''}")


def deepshift_linear_cases(gen):
    for (m, n, k), bits in ((s, b) for s in [(3, 70, 100), (33, 65, 333)] for b in (4, 5)):
        w = _shift_weight(gen, n, k, bits, -40, 1 - (2 ** (bits - 1) - 1))
        x = torch.randint(-(2**31), 2**31, (m, k), generator=gen, dtype=torch.int64).to(torch.int32)
        bias = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
        yield (dict(x=x, codes=w.codes, base=w.base, bias=bias, in_features=k, bits=bits), _against_reference,
               f"{m}x{n}x{k} bits={bits}")


def sparse24_int8_linear_cases(gen):
    from effkern.ops.sparse24 import Sparse24Weight

    def compare(got, kw, ref_fn, what):  # erff of two compilations under GELU: a last ulp apart
        ref = ref_fn(**kw)
        if kw["activation"] == "gelu":
            torch.testing.assert_close(got, ref, rtol=3e-7, atol=1e-6, msg=what)
        else:
            _exact(got, ref, what)

    # (M, N, K): split-K at one 16-token tile, 64-token tiles with N and M tails
    shapes = [(1, 136, 128), (70, 200, 192)] if SMALL else [(1, 136, 128), (16, 384, 1536), (70, 200, 192),
                                                          (130, 264, 320)]
    outs = [(torch.int32, None), (torch.int8, None), (torch.bfloat16, "gelu"), (torch.float16, "relu")]
    for (m, n, k), (dt, act) in ((s, o) for s in shapes for o in outs):
        w = Sparse24Weight.from_float(torch.randn(n, k, generator=gen))
        x = torch.randint(-128, 128, (m, k), generator=gen).to(torch.int8)
        bias = (torch.randint(-(2**20), 2**20, (n,), generator=gen).to(torch.int32) if dt == torch.int32
                else torch.randn(n, generator=gen))
        inv = torch.rand(n, generator=gen) * 40 + 10 if dt == torch.int8 else None
        yield (dict(x=x, values=w.values, meta=w.meta, scale=w.scale, bias=bias,
                    x_scale=torch.rand(m, generator=gen) * 1e-2 + 1e-3, inv_out=inv, in_features=k, out_dtype=dt,
                    activation=act), compare, f"{m}x{n}x{k} {case_id(dt)} {act}")


CASES = {
    "int_softmax": int_softmax_cases,
    "int_gelu": int_gelu_cases,
    "int_layernorm": int_layernorm_cases,
    "token_gather": token_gather_cases,
    "token_scatter": token_scatter_cases,
    "binary_attention": binary_attention_cases,
    "hashed_attention": hashed_attention_cases,
    "shift_linear": shift_linear_cases,
    "deepshift_linear": deepshift_linear_cases,
    "sparse24_int8_linear": sparse24_int8_linear_cases,
}


def test_every_cuda_kernel_has_cases():
    """Every CUDA kernel of the registry has sanitizer cases."""
    missing = sorted(set(cuda_kernels()) - set(CASES))
    assert not missing, f"CUDA kernels without sanitizer cases in tests/test_cuda_sanitize.py: {missing}"


def _bind(fn, kw):
    """kw as positional arguments in fn's order."""
    return inspect.signature(fn).bind(**kw).args


def _poison(args):
    """Leave a block of garbage as large as the largest argument in the caching allocator, so an
    output allocated after it starts as garbage rather than zeros."""
    nbytes = max([a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)] + [1])
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0x5B)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", sorted(cuda_kernels()))
def test_cuda_sanitizer_smoke(kernel, gen):
    require_cuda()
    from effkern import _dispatch

    assert kernel in CASES, f"{kernel}: no sanitizer cases (add a builder to tests/test_cuda_sanitize.py)"
    impls = _dispatch.OPS[kernel].impls
    ran = 0
    for kw, compare, what in CASES[kernel](gen):
        on_gpu = {k: a.cuda() if isinstance(a, torch.Tensor) else a for k, a in kw.items()}
        args = _bind(impls["torch"].fn, on_gpu)  # the canonical kernel signature
        _poison(args)
        got = impls["cuda"].fn(*args)
        torch.cuda.synchronize()
        compare(got, on_gpu, impls["torch"].fn, f"{kernel} {what}")
        ran += 1
    assert ran, kernel
