"""Binary-hash additive attention ops (effkern.ops.binary_hash): the fused KSH hash, packed codes,
the two attention forms and the straight-through training path, against plain float64
transcriptions; the torch.library contract; input validation."""

from __future__ import annotations

import math

import pytest
import torch

import effkern
from effkern.ops import binary_hash as bh
from tests.conftest import DEVICE, backend_reasons, require_backend

from effkern._dispatch import BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def ksh_params(gen, h, m, d, b, dtype=torch.float64):
    anchors = torch.randn(h, m, d, generator=gen, dtype=torch.float64)
    anchors = anchors / anchors.norm(dim=-1, keepdim=True)
    mu = 0.3 * torch.rand(h, m, generator=gen, dtype=torch.float64)
    proj = torch.randn(h, b, m, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(DEVICE) for t in (anchors, mu, proj))


# --------------------------------------------------------------------------------------------
# transcriptions (float64, unpacked, written out as the definitions read)
# --------------------------------------------------------------------------------------------


def ref_ksh(x, anchors, mu, proj):
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    diff = x[:, :, :, None, :] - anchors.double()[None, :, None, :, :]  # [B, H, N, m, d]
    dist = (diff * diff).sum(-1)
    sigma = dist.mean(dim=(2, 3), keepdim=True)
    k = torch.exp(-dist / (2 * sigma)) - mu.double()[None, :, None, :]
    return torch.einsum("bhnm,hkm->bhnk", k, proj.double())


def ref_attention(hq, hk, v, form):
    """hq, hk: unpacked code values [B, H, N, b]; computed in hq's dtype (float64 normally)."""
    v = v.to(hq.dtype)
    n, b = v.shape[2], hq.shape[-1]
    kv = torch.einsum("bhjk,bhjd->bhkd", hk, v)
    num = torch.einsum("bhnk,bhkd->bhnd", hq, kv)
    if form == "ecoformer":
        den = torch.einsum("bhnk,bhk->bhn", hq, hk.sum(2))[..., None] + n * (b + 1)
        return (num + (b + 1) * v) / den
    t = v / 2 + num / math.pi
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def ste_codes(y, form):
    """Codes with the straight-through gradient: forward the hard codes, backward the mask."""
    if form == "ecoformer":
        hard = torch.where(y > 0, 1.0, -1.0).to(y.dtype)
        soft = y.clamp(-1, 1)
    else:
        hard = (y > 0).to(y.dtype)
        soft = y.clamp(0, 1)
    return soft + (hard - soft).detach()


def random_codes(gen, shape, nbits):
    return bh.pack_bits(torch.randn(*shape, nbits, generator=gen)).to(DEVICE)


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 8, 16, 31, 32, 33, 64, 100])
def test_pack_unpack_round_trip(gen, b):
    h = randn(gen, 3, 5, b)
    codes = bh.pack_bits(h)
    assert codes.dtype == torch.int32 and codes.shape == (3, 5, (b + 31) // 32)
    assert torch.equal(bh.unpack_bits(codes, b), (h > 0).float())
    assert torch.equal(bh.unpack_bits(codes, b, signed=True), torch.where(h > 0, 1.0, -1.0))
    # bit j is bit j % 32 of word j // 32, least significant first
    expected = torch.zeros(3, 5, (b + 31) // 32, dtype=torch.int64, device=DEVICE)
    for j in range(b):
        expected[..., j // 32] += (h[..., j] > 0).long() << (j % 32)
    assert torch.equal(codes.long() & 0xFFFFFFFF, expected)


def test_pack_accepts_ints_and_bools(gen):
    h = torch.randint(-1, 2, (4, 40), generator=gen).to(DEVICE)
    assert torch.equal(bh.pack_bits(h), bh.pack_bits(h.float()))
    assert torch.equal(bh.pack_bits(h > 0), bh.pack_bits(h.float()))


# --------------------------------------------------------------------------------------------
# ksh_hash
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,n,d,m,nbits", [(1, 1, 1, 32, 25, 16), (3, 2, 7, 17, 7, 8), (2, 3, 197, 64, 25, 64)])
def test_ksh_hash_matches_transcription(gen, backend, dtype, b, h, n, d, m, nbits):
    require_backend("ksh_hash", backend)
    x = randn(gen, b, h, n, d, dtype=dtype)
    anchors, mu, proj = ksh_params(gen, h, m, d, nbits, torch.float32)
    with effkern.backend(backend):
        y = bh.ksh_hash(x, anchors, mu, proj)
    assert y.dtype == torch.float32 and y.shape == (b, h, n, nbits)
    torch.testing.assert_close(y.double(), ref_ksh(x, anchors, mu, proj), rtol=1e-4, atol=1e-4)


def test_ksh_hash_gradcheck_and_zero_row(gen):
    x = randn(gen, 2, 3, 5, 8, dtype=torch.float64).requires_grad_(True)
    anchors, mu, proj = ksh_params(gen, 3, 4, 8, 6)
    torch.autograd.gradcheck(lambda x: bh.ksh_hash(x, anchors, mu, proj), (x,))
    z = x.detach().clone()
    z[0, 0, 2] = 0  # a zero query hashes like the origin, no NaN
    y = bh.ksh_hash(z, anchors, mu, proj)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref_ksh(z, anchors, mu, proj))


# --------------------------------------------------------------------------------------------
# binary_attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", bh.FORMS)
@pytest.mark.parametrize("nbits", [8, 16, 32, 64])
@pytest.mark.parametrize("b,h,n,d", [(1, 1, 1, 32), (3, 1, 7, 64), (1, 3, 197, 32), (1, 1, 785, 128), (1, 1, 3136, 64)])
def test_binary_attention_matches_transcription(gen, backend, form, nbits, b, h, n, d):
    require_backend("binary_attention", backend)
    qc, kc = random_codes(gen, (b, h, n), nbits), random_codes(gen, (b, h, n), nbits)
    v = randn(gen, b, h, n, d)
    with effkern.backend(backend):
        out = bh.binary_attention(qc, kc, v, nbits=nbits, form=form)
    signed = form == "ecoformer"
    expected = ref_attention(bh.unpack_bits(qc, nbits, signed=signed, dtype=torch.float64),
                             bh.unpack_bits(kc, nbits, signed=signed, dtype=torch.float64), v, form)
    assert out.dtype == v.dtype and out.shape == v.shape
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", bh.FORMS)
def test_binary_attention_low_precision(gen, backend, dtype, form):
    """bf16/fp16: the error against float64 is at most twice that of torch's own
    low-precision evaluation of the same formula, plus one ulp of the output."""
    require_backend("binary_attention", backend)
    nbits = 16
    qc, kc = random_codes(gen, (2, 3, 197), nbits), random_codes(gen, (2, 3, 197), nbits)
    v = randn(gen, 2, 3, 197, 64, dtype=dtype)
    with effkern.backend(backend):
        out = bh.binary_attention(qc, kc, v, nbits=nbits, form=form)
    signed = form == "ecoformer"
    hq, hk = (bh.unpack_bits(c, nbits, signed=signed, dtype=torch.float64) for c in (qc, kc))
    exact = ref_attention(hq, hk, v, form)
    lowp = ref_attention(hq.to(dtype), hk.to(dtype), v, form).to(dtype)  # rounded like a bf16 output
    ulp = torch.finfo(dtype).eps * exact.abs().max()
    assert (out.double() - exact).abs().max() <= 2 * (lowp.double() - exact).abs().max() + ulp


def test_binary_attention_gradcheck_in_v(gen):
    qc, kc = random_codes(gen, (2, 3, 9), 16), random_codes(gen, (2, 3, 9), 16)
    v = randn(gen, 2, 3, 9, 4, dtype=torch.float64).requires_grad_(True)
    for form in bh.FORMS:
        torch.autograd.gradcheck(lambda v: bh.binary_attention(qc, kc, v, nbits=16, form=form), (v,))


# --------------------------------------------------------------------------------------------
# the training path (straight-through)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", bh.FORMS)
@pytest.mark.parametrize("hash_kind", ["ksh", "random"])
def test_training_path_gradients_match_ste_transcription(gen, form, hash_kind):
    b, h, n, d, nbits = 2, 3, 11, 8, 16
    q, k, v = (randn(gen, b, h, n, d, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    if hash_kind == "ksh":
        anchors, mu, proj = ksh_params(gen, h, 5, d, nbits)
        hash_fn = bh.KSHParams(anchors, mu, proj)
        ref_hash = lambda x: ref_ksh(x, anchors, mu, proj)  # noqa: E731
    else:
        weight = randn(gen, h, d, nbits, dtype=torch.float64) * 0.3  # |y| < 1 often: the mask matters
        hash_fn = bh.RandomProjection(weight)
        ref_hash = lambda x: torch.einsum("bhnd,hdk->bhnk", x, weight)  # noqa: E731
    out = bh.binary_hash_attention(q, k, v, hash_fn, form)
    expected = ref_attention(ste_codes(ref_hash(q), form), ste_codes(ref_hash(k), form), v, form)
    torch.testing.assert_close(out, expected)
    grad = randn(gen, b, h, n, d, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, e in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, e)


def test_attention_backward_gradcheck_in_code_values(gen):
    """The backward primitive's code gradients against autograd of the reference (float64),
    and the hashed attention core's gradients by gradcheck (inside the mask the STE gradient is
    the gradient of the relaxed codes)."""
    for form in bh.FORMS:
        qc, kc = random_codes(gen, (2, 2, 6), 8), random_codes(gen, (2, 2, 6), 8)
        v = randn(gen, 2, 2, 6, 4, dtype=torch.float64)
        signed = form == "ecoformer"
        hq, hk = (bh.unpack_bits(c, 8, signed=signed, dtype=torch.float64).requires_grad_(True) for c in (qc, kc))
        vd = v.clone().requires_grad_(True)
        grad = randn(gen, 2, 2, 6, 4, dtype=torch.float64)
        want = torch.autograd.grad(ref_attention(hq, hk, vd, form), (hq, hk, vd), grad)
        got = torch.ops.effkern.binary_attention_backward(grad, qc, kc, v, 8, form)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------------------------
# torch.library contract and validation
# --------------------------------------------------------------------------------------------


def test_opcheck_and_compile(gen):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float32, generator=g, requires_grad=True)
    anchors, mu, proj = (t.float().cpu() for t in ksh_params(g, 3, 4, 8, 16))
    qc, kc = bh.pack_bits(torch.randn(2, 3, 5, 16, generator=g)), bh.pack_bits(torch.randn(2, 3, 5, 16, generator=g))
    v = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    y = torch.randn(2, 3, 5, 16, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.effkern.ksh_hash, (x, anchors, mu, proj, True))
    torch.library.opcheck(torch.ops.effkern.pack_bits, (torch.randn(4, 40, generator=g),))
    for form in bh.FORMS:
        torch.library.opcheck(torch.ops.effkern.binary_attention, (qc, kc, v, 16, form, True))
        torch.library.opcheck(torch.ops.effkern.hashed_attention, (y, y.detach().flip(2).requires_grad_(True), v, form))
    hash_fn = bh.KSHParams(anchors, mu, proj)

    def step(q, k, v):
        return bh.binary_hash_attention(q, k, v, hash_fn, "ecoformer", validate=False)

    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v), step(q, k, v))


def test_bad_inputs(gen):
    v = randn(gen, 2, 3, 7, 8)
    qc = random_codes(gen, (2, 3, 7), 16)
    with pytest.raises(ValueError, match=r"q_codes must be \[B, H, N, ceil\(nbits / 32\)\] = \(2, 3, 7, 2\)"):
        bh.binary_attention(qc, qc, v, nbits=40, form="ecoformer")
    with pytest.raises(ValueError, match="bits set beyond nbits = 8"):
        bh.binary_attention(qc, qc, v, nbits=8, form="ecoformer", validate=True)
    with pytest.raises(ValueError, match="form must be"):
        bh.binary_attention(qc, qc, v, nbits=16, form="softmax")
    with pytest.raises(ValueError, match="k_codes must be"):
        bh.binary_attention(qc, qc[:, :, :5], v, nbits=16, form="shiftadd")
    with pytest.raises(TypeError, match="q_codes must have dtype int32"):
        bh.binary_attention(qc.long(), qc, v, nbits=16, form="shiftadd")
    bad_v = v.clone()
    bad_v[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="v must be finite"):
        bh.binary_attention(qc, qc, bad_v, nbits=16, form="shiftadd", validate=True)
    anchors, mu, proj = ksh_params(gen, 3, 5, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"anchors must be \[H, m, d\]"):
        bh.ksh_hash(v, anchors[:, :, :4], mu, proj)
    with pytest.raises(ValueError, match=r"proj must be \[H, b, m\]"):
        bh.ksh_hash(v, anchors, mu, proj[:, :, :4])
    with pytest.raises(ValueError, match="x must be finite"):
        bh.ksh_hash(bad_v, anchors, mu, proj, validate=True)
    with pytest.raises(ValueError, match="q must be finite"):
        bh.binary_hash_attention(bad_v, v, v, bh.KSHParams(anchors, mu, proj), "ecoformer", validate=True)
    with pytest.raises(ValueError, match="same B, H, N"):
        bh.binary_hash_attention(v, v[:, :, :5], v, bh.KSHParams(anchors, mu, proj), "ecoformer")
    with pytest.raises(ValueError, match="codes hold 1 words but b = 40 needs 2"):
        bh.unpack_bits(bh.pack_bits(randn(gen, 3, 16)), 40)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("form", bh.FORMS)
def test_training_path_on_other_backends_matches_torch(gen, backend, form):
    """Forward and every gradient of the fused training path (hash, codes, attention) on the
    Triton/CUDA kernels (where the backend has them) against the torch backend, float32."""
    require_backend("binary_attention", backend)
    anchors, mu, proj = ksh_params(gen, 3, 25, 32, 16, torch.float32)
    hash_fn = bh.KSHParams(anchors, mu, proj)
    q, k, v = (randn(gen, 2, 3, 37, 32) for _ in range(3))
    grad = randn(gen, 2, 3, 37, 32)

    def run():
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = bh.binary_hash_attention(*inputs, hash_fn, form)
        return (out, *torch.autograd.grad(out, inputs, grad))

    expected = run()
    with effkern.backend(backend, "torch"):
        got = run()
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_per_backend(backend):
    require_backend("binary_attention", backend, "cpu")
    g = torch.Generator().manual_seed(1)
    anchors, mu, proj = (t.float().cpu() for t in ksh_params(g, 2, 5, 16, 16))
    x = torch.randn(2, 2, 7, 16, generator=g, requires_grad=True)
    y_q, y_k = (torch.randn(2, 2, 7, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 7, 16, generator=g, requires_grad=True)
    with effkern.backend(backend, "torch"):
        torch.library.opcheck(torch.ops.effkern.ksh_hash, (x, anchors, mu, proj, False))
        for form in bh.FORMS:
            torch.library.opcheck(torch.ops.effkern.hashed_attention, (y_q, y_k, v, form))


# --------------------------------------------------------------------------------------------
# Defects found by fuzzing (issue 8): extreme inputs, fake strides, inductor on timm's views
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ksh_hash_huge_and_tiny_rows(gen, backend, dtype):
    """Rows with |x| near 1e20 (their squares overflow float32) hash as their direction, like
    any other row, on every backend; so do rows near 1e37 and rows whose squares underflow;
    the gradient is the float64 one (tiny, not 0 or NaN)."""
    require_backend("ksh_hash", backend)
    b, h, n, d, m, nbits = 2, 2, 9, 40, 7, 16
    base = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    scale = torch.ones(b, h, n, 1, dtype=torch.float64)
    scale[0, 0, :3] = 1e20
    scale[1, 1, 4] = 1e37
    scale[0, 1, 5] = 1e-25  # squares underflow; ||x|| < 1e-12: x / eps
    x = (base * scale).to(dtype).to(DEVICE)
    anchors, mu, proj = ksh_params(gen, h, m, d, nbits, torch.float32)
    with effkern.backend(backend):
        y = bh.ksh_hash(x.clone().requires_grad_(True), anchors, mu, proj)
    assert bool(torch.isfinite(y).all())
    expected = ref_ksh(x, anchors, mu, proj)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    grad = randn(gen, b, h, n, nbits)
    xg = x.clone().requires_grad_(True)
    with effkern.backend(backend):
        (gx,) = torch.autograd.grad(bh.ksh_hash(xg, anchors, mu, proj), xg, grad)
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_ksh(x64, anchors, mu, proj), x64, grad.double())
    assert bool(torch.isfinite(gx).all())
    # Per row, the gradient scales as 1 / max(||x||, eps): compare rows relative to their own
    # size, where it is a normal float32 number (the 1e37 row's is subnormal: hardware-dependent).
    row_scale = want.abs().amax(-1, keepdim=True)
    normal = (row_scale > 2**10 * torch.finfo(torch.float32).tiny)[..., 0]
    assert normal.sum() == b * h * n - 1
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # bfloat16: the rounding of gx itself
    torch.testing.assert_close((gx.double() / row_scale)[normal], (want / row_scale)[normal], rtol=tol, atol=tol)


def _family_op_calls(gen, form):
    """One call per op of the family, on permuted (timm-layout) inputs: (op name, args)."""
    b, n, h, d, nbits = 2, 7, 3, 32, 16

    def views(parts, width, dtype=torch.float32):
        t = torch.randn(b, n, parts * h * width, generator=gen).to(dtype).to(DEVICE)
        return t.reshape(b, n, parts, h, width).permute(2, 0, 3, 1, 4).unbind(0)

    q, k, v = views(3, d)
    y_q, y_k = views(2, nbits)
    anchors, mu, proj = ksh_params(gen, h, 5, d, nbits, torch.float32)
    qc, kc = bh.pack_bits(y_q), bh.pack_bits(y_k)
    g = views(1, d)[0]
    return [
        ("ksh_hash", (q, anchors, mu, proj, True)),
        ("ksh_hash_backward", (y_q, q, anchors, mu, proj)),
        ("ksh_codes", (q, anchors, mu, proj, True)),
        ("pack_bits", (y_q,)),
        ("binary_attention", (qc, kc, v, nbits, form, True)),
        ("binary_attention_backward", (g, qc, kc, v, nbits, form)),
        ("hashed_attention", (y_q, y_k, v, form)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", bh.FORMS)
def test_fake_strides_are_the_real_strides(gen, backend, form):
    """Every op of the family (the backward ops included) returns, on every backend, exactly
    the shapes, dtypes and strides its fake promises, on timm's permuted q/k/v views."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from effkern._registry import OPS

    calls = _family_op_calls(gen, form)
    assert sorted(name for name, _ in calls) == sorted(n for n, o in OPS.items() if o.family == "binary_hash")
    checked = 0
    for name, args in calls:
        reasons = backend_reasons(name, backend)
        if reasons is None or reasons:
            continue  # the op has no such backend, or it cannot run here
        op = getattr(torch.ops.effkern, name)
        with effkern.backend(backend):
            real = op(*args)
        mode = FakeTensorMode()
        with mode, effkern.backend(backend):
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), (
                f"{name}[{backend}] output {i}: fake {tuple(f.shape)} {f.dtype} {f.stride()} != real "
                f"{tuple(r.shape)} {r.dtype} {r.stride()}")
        checked += 1
    if not checked:
        pytest.skip(f"no op of the family runs on {backend} here")


@pytest.mark.parametrize("form", bh.FORMS)
def test_inductor_training_on_timm_views(gen, form):
    """torch.compile(backend="inductor") of a training step through binary_hash_attention on
    timm's permuted q/k/v views: the forward and every gradient match eager."""
    torch._dynamo.reset()
    b, n, h, d, nbits = 2, 7, 3, 8, 16
    anchors, mu, proj = (t.float().cpu() for t in ksh_params(gen, h, 4, d, nbits))
    hash_fn = bh.KSHParams(anchors, mu, proj)
    qkv = torch.randn(b, n, 3 * h * d, generator=gen)

    def step(qkv):
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = bh.binary_hash_attention(q, k, v, hash_fn, form, validate=False)
        return out.transpose(1, 2).reshape(b, n, h * d)

    weight = torch.randn(b, n, h * d, generator=gen)
    eager_in, comp_in = qkv.clone().requires_grad_(True), qkv.clone().requires_grad_(True)
    expected = step(eager_in)
    (expected * weight).sum().backward()
    # No compiled-graph caches: a graph compiled against an older fake must not be reused.
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(step, backend="inductor", fullgraph=True)(comp_in)
        (got * weight).sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(comp_in.grad, eager_in.grad)
    assert comp_in.grad.abs().sum() > 0
