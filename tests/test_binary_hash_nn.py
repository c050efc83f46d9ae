"""effkern.nn.binary_hash.BinaryHashAttention: timm-compatible weights, the forward against a
plain torch transcription (float64), train == eval paths, gradients, and EcoFormer's KSH fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effkern.nn.binary_hash import (
    BinaryHashAttention,
    fit_ksh_head,
    ksh_code_loss,
    ksh_similarity_targets,
)
from effkern.nn.layers import Attention

DIM, HEADS = 32, 4  # head_dim 8


def _make(seed=0, **kw):
    torch.manual_seed(seed)
    return BinaryHashAttention(DIM, num_heads=HEADS, qkv_bias=True, **kw)


def _x(b=2, n=24, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g).to(dtype)


# ---- plain torch transcription ------------------------------------------------------------


def _reference(m: BinaryHashAttention, x: torch.Tensor) -> torch.Tensor:
    """The forward written out: qkv, per-head hash (explicit formulas), unpacked codes, the
    linear attention of the form, + depthwise conv of v over tokens, proj."""
    b, n, c = x.shape
    h, d = m.num_heads, m.head_dim
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k = m.q_norm(q), m.k_norm(k)

    def hash_(t):
        if m.hash_kind == "random":
            return torch.einsum("bhnd,hdk->bhnk", t, m.hash_weight.to(t.dtype))
        tn = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = m.hash_anchors.to(t.dtype)
        dist = ((tn[:, :, :, None, :] - a[None, :, None, :, :]) ** 2).sum(-1)  # [B, H, N, m]
        sigma = dist.mean(dim=(-1, -2), keepdim=True)
        kern = torch.exp(-dist / (2 * sigma)) - m.hash_mu.to(t.dtype)[None, :, None, :]
        return torch.einsum("bhnm,hkm->bhnk", kern, m.hash_proj.to(t.dtype))

    yq, yk = hash_(q), hash_(k)
    if m.form == "ecoformer":
        hq, hk = torch.where(yq > 0, 1.0, -1.0).to(v.dtype), torch.where(yk > 0, 1.0, -1.0).to(v.dtype)
    else:
        hq, hk = (yq > 0).to(v.dtype), (yk > 0).to(v.dtype)
    out = torch.empty_like(v)
    nb = m.nbits
    for bi in range(b):
        for hi in range(h):
            sim = hq[bi, hi] @ hk[bi, hi].T  # [N, N]: h_q[n] . h_k[j]
            num = sim @ v[bi, hi]
            if m.form == "ecoformer":
                cc = nb + 1
                den = sim.sum(-1, keepdim=True) + n * cc
                out[bi, hi] = (num + cc * v[bi, hi]) / den
            else:
                t = v[bi, hi] / 2 + num / math.pi
                out[bi, hi] = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if m.dwconv is not None:
        w = m.dwconv.weight.reshape(h, d, -1)  # channel c = head * d + j
        ks = w.shape[-1]
        vp = F.pad(v, (0, 0, ks // 2, ks // 2))
        conv = torch.zeros_like(v)
        for tap in range(ks):
            conv = conv + vp[:, :, tap:tap + n, :] * w[None, :, :, tap][:, :, None, :]
        out = out + conv
    o = out.transpose(1, 2).reshape(b, n, c)
    return o @ m.proj.weight.T + m.proj.bias


# ---- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
def test_strict_load_both_ways(qk_norm):
    torch.manual_seed(3)
    ref = Attention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    m = BinaryHashAttention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm)
    assert set(m.state_dict()) == set(ref.state_dict())  # hash buffers are non-persistent
    m.load_state_dict(ref.state_dict(), strict=True)
    for key, val in ref.state_dict().items():
        assert torch.equal(m.state_dict()[key], val)
    back = Attention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm)
    back.load_state_dict(m.state_dict(), strict=True)
    for key, val in m.state_dict().items():
        assert torch.equal(back.state_dict()[key], val)


def test_strict_load_with_dwconv_and_hash_state():
    ref = Attention(DIM, num_heads=HEADS, qkv_bias=True)
    m = _make(form="shiftadd")  # dwconv on by default
    assert m.dwconv is not None and "dwconv.weight" in m.state_dict()
    w0 = m.dwconv.weight.detach().clone()
    m.load_state_dict(ref.state_dict(), strict=True)  # no dwconv keys: conv left as it was
    assert torch.equal(m.dwconv.weight, w0)
    # its own state dict round-trips (dwconv included)
    m2 = _make(seed=5, form="shiftadd")
    m2.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(m2.dwconv.weight, w0)
    # the hash is saved separately
    m2.load_hash_state_dict(m.hash_state_dict())
    for name, t in m.hash_state_dict().items():
        assert torch.equal(getattr(m2, name), t)
    with pytest.raises(KeyError):
        m2.load_hash_state_dict({"hash_mu": m.hash_mu})


@pytest.mark.parametrize("qk_norm", [False, True])
def test_from_attention(qk_norm):
    torch.manual_seed(4)
    ref = Attention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    m = BinaryHashAttention.from_attention(ref, form="shiftadd", nbits=12, num_anchors=7, hash="ksh")
    assert (m.form, m.nbits, m.num_anchors, m.num_heads) == ("shiftadd", 12, 7, HEADS)
    assert m.dwconv is not None and m.hash_proj.shape == (HEADS, 12, 7)
    for name in ("qkv", "proj"):
        assert torch.equal(getattr(m, name).weight, getattr(ref, name).weight)
        assert torch.equal(getattr(m, name).bias, getattr(ref, name).bias)
        assert getattr(m, name).weight.data_ptr() != getattr(ref, name).weight.data_ptr()
    x = _x()
    q, k, v = m.qkv_heads(x)
    q0, k0, v0 = ref.qkv_heads(x)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    assert type(m.q_norm) is type(ref.q_norm)


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["ecoformer", "shiftadd"])
@pytest.mark.parametrize("hash_", ["ksh", "random"])
@pytest.mark.parametrize("dwconv", [False, True])
def test_forward_matches_transcription_float64(form, hash_, dwconv):
    m = _make(form=form, hash=hash_, dwconv=dwconv, nbits=40, num_anchors=9).double()  # nbits > 32: two words
    x = _x(dtype=torch.float64)
    want = _reference(m, x)
    m.train()
    got_train = m(x)
    m.eval()
    got_eval = m(x)
    torch.testing.assert_close(got_train, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_eval, got_train, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["ecoformer", "shiftadd"])
def test_eval_path_equals_train_path_float32(form):
    m = _make(form=form)
    x = _x()
    m.train()
    a = m(x)
    m.eval()
    with torch.no_grad():
        b = m(x)
    torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


def test_dwconv_on_off():
    x = _x(dtype=torch.float64)
    on = _make(form="ecoformer", dwconv=True).double().eval()
    off = _make(form="ecoformer", dwconv=False).double().eval()
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("dwconv.")}, strict=True)
    off.load_hash_state_dict(on.hash_state_dict())
    assert off.dwconv is None and _make(form="ecoformer").dwconv is None and _make(form="shiftadd").dwconv is not None
    assert not torch.allclose(on(x), off(x))
    with torch.no_grad():
        on.dwconv.weight.zero_()
    torch.testing.assert_close(on(x), off(x), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["ecoformer", "shiftadd"])
@pytest.mark.parametrize("hash_", ["ksh", "random"])
def test_gradients_reach_qkv_and_proj(form, hash_):
    m = _make(form=form, hash=hash_).train()
    if hash_ == "random":
        with torch.no_grad():
            m.hash_weight.mul_(0.05)  # |y| < 1 for most entries: the straight-through window
    x = _x().requires_grad_(True)
    m(x).square().sum().backward()
    g = m.qkv.weight.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[:DIM].abs().sum() > 0, "no gradient to the query rows (straight-through)"
    assert g[DIM:2 * DIM].abs().sum() > 0, "no gradient to the key rows (straight-through)"
    assert g[2 * DIM:].abs().sum() > 0
    assert m.proj.weight.grad.abs().sum() > 0 and m.proj.bias.grad.abs().sum() > 0
    if m.dwconv is not None:
        assert m.dwconv.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_attn_mask_rejected():
    m = _make()
    x = _x()
    with pytest.raises(NotImplementedError, match="attn_mask"):
        m(x, attn_mask=torch.zeros(x.shape[1], x.shape[1], dtype=torch.bool))
    m(x, attn_mask=None, some_timm_kwarg=1)  # other keyword arguments are accepted and ignored


def test_bad_arguments():
    with pytest.raises(ValueError, match="form"):
        _make(form="softmax")
    with pytest.raises(ValueError, match="hash"):
        _make(hash="lsh")
    with pytest.raises(ValueError, match="only the KSH"):
        _make(hash="random").fit_hash(_x())


@pytest.mark.parametrize("form", ["ecoformer", "shiftadd"])
def test_bf16_smoke(form):
    m = _make(form=form).to(torch.bfloat16)
    x = _x(dtype=torch.bfloat16)
    m.train()
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert torch.isfinite(m.qkv.weight.grad.float()).all()
    m.eval()
    with torch.no_grad():
        z = m(x)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()


# ---- the KSH fit ----------------------------------------------------------------------------


def _clustered(n=96, d=8, clusters=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    return centres.repeat(n // clusters, 1) + 0.4 * torch.randn(n, d, generator=g)


def test_similarity_targets():
    x = _clustered()
    s0 = ksh_similarity_targets(x, topk=10)
    assert s0.shape == (96, 96)
    assert ((s0 == 1).sum(1) == 10).all() and ((s0 == -1).sum(1) == 10).all()
    assert (s0.diagonal() == 0).all()
    cos = F.normalize(x.double(), dim=-1) @ F.normalize(x.double(), dim=-1).T
    assert (cos[s0 == 1].min() >= cos[s0 == -1].max())


def _fit_loss(x, nbits, m, **kw):
    anchors, mu, proj = fit_ksh_head(x, nbits, m, generator=torch.Generator().manual_seed(7), **kw)
    xn = F.normalize(x.double(), dim=-1)
    dist = torch.cdist(xn, anchors) ** 2
    kern = torch.exp(-dist / (2 * dist.mean())) - mu
    codes = torch.where(kern @ proj.T > 0, 1.0, -1.0)
    return ksh_code_loss(codes, ksh_similarity_targets(x)).item(), (anchors, mu, proj)


def test_fit_ksh_head_beats_random_projection():
    x = _clustered()
    random_loss, (a0, mu0, _) = _fit_loss(x, 8, 10, iterations=0)  # 0 steps: the random initial proj
    fitted_loss, (a1, mu1, _) = _fit_loss(x, 8, 10, iterations=40, lr=10.0)
    assert torch.equal(a0, a1) and torch.equal(mu0, mu1)  # same anchors / mu, only proj fitted
    assert fitted_loss < random_loss - 0.1
    # anchors are calibration tokens (normalised); mu is the mean kernel value
    xn = F.normalize(x.double(), dim=-1)
    assert all(((xn - a).abs().sum(-1) < 1e-12).any() for a in a1)
    dist = torch.cdist(xn, a1) ** 2
    torch.testing.assert_close(mu1, torch.exp(-dist / (2 * dist.mean())).mean(0))


def test_fit_hash_module_shapes_determinism_and_codes():
    m = _make(nbits=8, num_anchors=10).eval()
    calib = _x(b=2, n=24, seed=11)
    before = m.hash_state_dict()
    kw = {"iterations": 30, "lr": 10.0}
    m.fit_hash(calib, generator=torch.Generator().manual_seed(0), **kw)
    fitted = m.hash_state_dict()
    assert fitted["hash_anchors"].shape == (HEADS, 10, DIM // HEADS)
    assert fitted["hash_mu"].shape == (HEADS, 10)
    assert fitted["hash_proj"].shape == (HEADS, 8, 10)
    assert all(t.dtype == torch.float32 for t in fitted.values())
    assert not torch.equal(before["hash_proj"], fitted["hash_proj"])
    # deterministic with a seed, different with another
    m.fit_hash(calib, generator=torch.Generator().manual_seed(0), **kw)
    for name, t in m.hash_state_dict().items():
        assert torch.equal(t, fitted[name])
    m.fit_hash(calib, generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.equal(m.hash_state_dict()["hash_anchors"], fitted["hash_anchors"])
    # the module's own codes (ksh_hash, per-sample sigma) agree better with S0 than the same
    # anchors with a random proj
    m.load_hash_state_dict(fitted)
    with torch.no_grad():
        q, k, _ = m.qkv_heads(calib)
        hsh = m.hash_params()
        codes = torch.where(torch.cat([hsh(q), hsh(k)], 2) > 0, 1.0, -1.0)  # [B, H, 2N, b]
        feats = torch.cat([q, k], 2)
        rand = m.hash_params().__class__(m.hash_anchors, m.hash_mu,
                                         torch.randn(m.hash_proj.shape, generator=torch.Generator().manual_seed(3)))
        rcodes = torch.where(torch.cat([rand(q), rand(k)], 2) > 0, 1.0, -1.0)
    fit_l, rnd_l = 0.0, 0.0
    for bi in range(calib.shape[0]):
        for hi in range(HEADS):
            s0 = ksh_similarity_targets(feats[bi, hi])
            fit_l += ksh_code_loss(codes[bi, hi], s0).item()
            rnd_l += ksh_code_loss(rcodes[bi, hi], s0).item()
    assert fit_l < rnd_l
    # the fitted module still runs both paths identically
    m.train()
    a = m(calib)
    m.eval()
    torch.testing.assert_close(a.detach(), m(calib).detach(), rtol=1e-6, atol=1e-6)
