"""Binary-hash additive attention (ShiftAddViT, EcoFormer): KSH hashing of queries and keys to
binary codes, packed codes, and linear attention computed from them with additions.

Layout of this module:

1. *Kernels of the torch backend* (``ksh_hash_fwd``, ``pack_codes``, ``binary_attention_fwd``,
   ...), written for clarity; float64 where the tests need it. The Triton backend
   (:mod:`effkern.triton.binary_hash_ksh`, :mod:`effkern.triton.binary_hash`) implements the same
   functions with the same signatures on contiguous, validated inputs; the CUDA backend
   (``csrc/binary_hash``) the attention forward, through an adapter.
2. *Argument checks*, one per op, run by the op and by its fake (see :mod:`effkern._registry`).
3. *Ops*, one declaration each (kernels, check, implementation, fake, autograd, test cases),
   then the typed public function. The training path's backward runs the backward kernels
   (fused), not autograd over torch code.

Definitions (the published models' semantics), per batch element and head:

* KSH hash: x [N, d] L2-normalised over d; D[n, j] = ||x_n - anchor_j||^2 for m anchors;
  sigma = mean(D) (over n and j, not detached); K = exp(-D / (2 sigma)) - mu; y = K proj^T,
  [N, b]. Codes: EcoFormer h = sign(y) in {-1, +1} (y <= 0 -> -1); ShiftAddViT h = 1[y > 0].
  Straight-through gradient: dL/dy = dL/dh where |y| < 1 ({-1, +1}) or 0 < y < 1 ({0, 1}).
  The normalisation x / max(||x||, NORM_EPS) scales each row by a power of two (exact) before
  squaring, so it neither overflows nor underflows for any finite x (|x| near 1e20 is a unit
  vector, not the origin).
* Packed codes: int32 [..., ceil(b / 32)]; bit j of a code is bit j % 32 of word j // 32
  (least significant first); bits beyond b are zero.
* Attention with codes h_q, h_k [N, b] and values v [N, d], KV = sum_j h_k[j] v_j^T [b, d],
  ksum = sum_j h_k[j] [b], c = b + 1:
  - "ecoformer" ({-1, +1} codes): out_n = (h_q[n] . KV + c v_n) / (h_q[n] . ksum + N c);
    the denominator is >= N (|h_q . ksum| <= N b), never zero.
  - "shiftadd" ({0, 1} codes): t_n = v_n / 2 + (h_q[n] . KV) / pi; out_n = t_n / max(||t_n||,
    SHIFTADD_EPS).
  Both use the token's own v_n, as the published code does. Accumulation in float32 (float64
  for float64).

Every op returns freshly allocated, contiguous outputs (row-major strides, whatever the input
layout), and so does its fake.
"""

from __future__ import annotations

# The public API (effkern.ops re-exports it).
__all__ = [
    "KSHParams", "RandomProjection", "binary_attention", "binary_hash_attention", "ksh_codes", "ksh_hash",
    "pack_bits", "unpack_bits",
]

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from effkern._common import (FLOAT_DTYPES, NORM_EPS, TORCH_FLOAT_DTYPES, acc_dtype, check_choice, check_int,
                             check_same_device, check_tensor, num_words, resolve_validate, row_major)
from effkern._registry import Invalid, Sample, cuda_kernel, define_op, torch_kernel, triton_kernel

FAMILY = "binary_hash"
FORMS = ("ecoformer", "shiftadd")
SIGNED = {"ecoformer": True, "shiftadd": False}  # code values {-1, +1} or {0, 1}
SHIFTADD_EPS = 1e-12  # t / max(||t||, eps) in the shiftadd form
MAX_NBITS = 1024
CUDA_HEAD_DIMS = (32, 64, 128)  # the CUDA kernels are specialised on d
# What pack_bits takes on the torch backend (anything compared with > 0).
PACK_DTYPES = TORCH_FLOAT_DTYPES + (torch.int8, torch.int32, torch.int64, torch.bool)


# ============================================================================================
# 1. Kernels of the torch backend
# ============================================================================================


def normalize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / max(||x||, NORM_EPS), ||x||) over the last dim, in x's dtype, for any finite x.

    Each row is scaled by 2^-k, k = frexp(max |x|) clamped to the dtype's normal exponents
    (exact), before squaring: the sum of squares then neither overflows (|x| near 1e20 in
    float32) nor underflows. ||x|| itself is inf when it exceeds the dtype's range, which only
    makes the normalisation's Jacobian (1 / ||x||) zero.
    """
    amax = x.abs().amax(dim=-1, keepdim=True)
    lim = int(math.log2(torch.finfo(x.dtype).max)) - 1  # 126 for float32, 1022 for float64
    k = torch.frexp(amax).exponent.clamp(-lim, lim)
    one = torch.ones_like(amax)
    xs = x * torch.ldexp(one, -k)
    ns = xs.norm(dim=-1, keepdim=True)
    nrm = ns * torch.ldexp(one, k)
    xn = torch.where(nrm > NORM_EPS, xs / torch.where(ns > 0, ns, one), x / NORM_EPS)
    return xn, nrm


def _ksh_dist(x: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(xn, ||x||, anchors, D) in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    xn, nrm = normalize_rows(x.to(acc))
    a = anchors.to(acc)
    # ||x - a||^2 = ||x||^2 + ||a||^2 - 2 x.a, clamped at 0 against rounding
    dist = (xn.pow(2).sum(-1, keepdim=True) + a.pow(2).sum(-1)[None, :, None, :]
            - 2 * torch.einsum("bhnd,hmd->bhnm", xn, a)).clamp_min(0)
    return xn, nrm, a, dist


def ksh_hash_fwd(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """y [B, H, N, b] (float32; float64 for float64) of the KSH hash of x [B, H, N, d] with
    anchors [H, m, d], mu [H, m], proj [H, b, m]."""
    acc = acc_dtype(x.dtype)
    _, _, _, dist = _ksh_dist(x, anchors)
    sigma = dist.mean(dim=(-1, -2), keepdim=True)
    k = torch.exp(-dist / (2 * sigma)) - mu.to(acc)[None, :, None, :]
    return row_major(torch.einsum("bhnm,hkm->bhnk", k, proj.to(acc)))


def ksh_hash_bwd(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """dL/dx for :func:`ksh_hash_fwd` (sigma's dependence on x included), in x's dtype.

    With E = exp(-D / (2 sigma)) and gK = grad_y proj: gD = -gK E / (2 sigma) + sum(gK E D) /
    (2 sigma^2 N m) (the second term through sigma = mean(D)); g_xn = 2 (sum_j gD) xn - 2 gD a;
    g_x = (g_xn - (g_xn . xn) xn) / ||x|| (the normalisation's Jacobian)."""
    acc = acc_dtype(x.dtype)
    xn, nrm, a, dist = _ksh_dist(x, anchors)
    n, m = dist.shape[-2], dist.shape[-1]
    sigma = dist.mean(dim=(-1, -2), keepdim=True)
    e = torch.exp(-dist / (2 * sigma))
    g_k = torch.einsum("bhnk,hkm->bhnm", grad_y.to(acc), proj.to(acc))
    g_e = g_k * e
    g_dist = -g_e / (2 * sigma) + (g_e * dist).sum(dim=(-1, -2), keepdim=True) / (2 * sigma**2 * n * m)
    g_xn = 2 * g_dist.sum(-1, keepdim=True) * xn - 2 * torch.einsum("bhnm,hmd->bhnd", g_dist, a)
    projected = (g_xn - (g_xn * xn).sum(-1, keepdim=True) * xn) / nrm.clamp_min(NORM_EPS)
    g_x = torch.where(nrm > NORM_EPS, projected, g_xn / NORM_EPS)
    return row_major(g_x.to(x.dtype))


def ksh_hash_codes(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """The packed codes int32 [B, H, N, ceil(b / 32)] of the KSH hash: pack_codes of
    :func:`ksh_hash_fwd` (bit k is 1[y_k > 0]). Backends fuse the two (y is never written)."""
    return pack_codes(ksh_hash_fwd(x, anchors, mu, proj))


def pack_codes(h: Tensor) -> Tensor:
    """int32 [..., ceil(b / 32)]: bit j of word j // 32 is 1[h[..., j] > 0]."""
    b = h.shape[-1]
    w = num_words(b)
    bits = torch.nn.functional.pad((h > 0).to(torch.int64), (0, 32 * w - b))
    words = (bits.reshape(*h.shape[:-1], w, 32) << torch.arange(32, device=h.device)).sum(-1)
    return row_major(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))  # two's complement


def unpack_codes(codes: Tensor, nbits: int, signed: bool, dtype: torch.dtype) -> Tensor:
    """[..., nbits] of {0, 1} ({-1, +1} when signed) from packed int32 codes."""
    shifts = torch.arange(32, device=codes.device, dtype=torch.int64)
    bits = (codes.to(torch.int64)[..., None] >> shifts) & 1
    bits = bits.reshape(*codes.shape[:-1], 32 * codes.shape[-1])[..., :nbits]
    return (2 * bits - 1 if signed else bits).to(dtype)


def _attention_parts(hq: Tensor, hk: Tensor, v: Tensor, form: str):
    """KV [B, H, b, d], ksum [B, H, b] and out [B, H, N, d] (accumulation dtype) from unpacked
    code values (float) and v."""
    acc = acc_dtype(v.dtype)
    vf = v.to(acc)
    kv = torch.einsum("bhnk,bhnd->bhkd", hk, vf)
    ksum = hk.sum(2)
    num = torch.einsum("bhnk,bhkd->bhnd", hq, kv)
    if form == "ecoformer":
        c = hq.shape[-1] + 1
        n = v.shape[2]
        den = torch.einsum("bhnk,bhk->bhn", hq, ksum)[..., None] + n * c
        out = (num + c * vf) / den
    else:
        t = vf / 2 + num / math.pi
        out = t / t.norm(dim=-1, keepdim=True).clamp_min(SHIFTADD_EPS)
    return kv, ksum, out


def binary_attention_fwd(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> Tensor:
    """out [B, H, N, d] in v's dtype from packed codes [B, H, N, W] and v [B, H, N, d]."""
    acc = acc_dtype(v.dtype)
    signed = SIGNED[form]
    hq, hk = (unpack_codes(c, nbits, signed, acc) for c in (q_codes, k_codes))
    return row_major(_attention_parts(hq, hk, v, form)[2].to(v.dtype))


def binary_attention_bwd(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                         form: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d h_q [B, H, N, b], d h_k [B, H, N, b] in the accumulation dtype, d v in v's dtype): the
    gradients with respect to the code values and v, recomputing KV and ksum.

    ecoformer, with den_n = h_q[n] . ksum + N c: g_num = g / den, g_den = -(g . out) / den;
    d h_q = g_num KV^T + g_den ksum; dKV = sum_n h_q[n] g_num[n]^T, dksum = sum_n h_q[n] g_den[n];
    d h_k = v dKV^T + dksum; dv = h_k dKV + c g_num. shiftadd, with t and out = t / ||t||:
    g_t = (g - (g . out) out) / ||t||; d h_q = g_t KV^T / pi; dKV = sum_n h_q[n] g_t[n]^T / pi;
    d h_k = v dKV^T; dv = h_k dKV + g_t / 2."""
    acc = acc_dtype(v.dtype)
    signed = SIGNED[form]
    hq, hk = (unpack_codes(c, nbits, signed, acc) for c in (q_codes, k_codes))
    vf, g = v.to(acc), grad_out.to(acc)
    kv, ksum, out = _attention_parts(hq, hk, v, form)
    if form == "ecoformer":
        c = nbits + 1
        den = torch.einsum("bhnk,bhk->bhn", hq, ksum) + v.shape[2] * c
        g_num = g / den[..., None]
        g_den = -(g * out).sum(-1) / den
        d_hq = torch.einsum("bhnd,bhkd->bhnk", g_num, kv) + g_den[..., None] * ksum[:, :, None, :]
        d_kv = torch.einsum("bhnk,bhnd->bhkd", hq, g_num)
        d_ksum = torch.einsum("bhnk,bhn->bhk", hq, g_den)
        d_hk = torch.einsum("bhnd,bhkd->bhnk", vf, d_kv) + d_ksum[:, :, None, :]
        dv = torch.einsum("bhnk,bhkd->bhnd", hk, d_kv) + c * g_num
    else:
        t = vf / 2 + torch.einsum("bhnk,bhkd->bhnd", hq, kv) / math.pi
        nt = t.norm(dim=-1, keepdim=True)
        g_t = torch.where(nt > SHIFTADD_EPS, (g - (g * out).sum(-1, keepdim=True) * out) / nt.clamp_min(SHIFTADD_EPS),
                          g / SHIFTADD_EPS)
        d_hq = torch.einsum("bhnd,bhkd->bhnk", g_t, kv) / math.pi
        d_kv = torch.einsum("bhnk,bhnd->bhkd", hq, g_t) / math.pi
        d_hk = torch.einsum("bhnd,bhkd->bhnk", vf, d_kv)
        dv = torch.einsum("bhnk,bhkd->bhnd", hk, d_kv) + g_t / 2
    return row_major(d_hq), row_major(d_hk), row_major(dv.to(v.dtype))


def hashed_attention_fwd(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> Tensor:
    """binary_attention_fwd of the packed codes of the hashes y_q, y_k [B, H, N, b]."""
    return binary_attention_fwd(pack_codes(y_q), pack_codes(y_k), v, y_q.shape[-1], form)


# ============================================================================================
# 2. Argument checks (one per op; the op and its fake run it)
# ============================================================================================


def _check_float(op: str, name: str, t, dims: int, dtypes=TORCH_FLOAT_DTYPES) -> None:
    check_tensor(op, name, t, dims=(dims,), dtypes=dtypes)


def _check_nbits(op: str, nbits: int) -> None:
    if isinstance(nbits, torch.SymInt) and 1 <= nbits <= MAX_NBITS:
        return  # traced with dynamic shapes (the backward's nbits is the hashes' width)
    check_int(op, "nbits", nbits, 1, MAX_NBITS)


def _check_finite(op: str, **tensors: Tensor) -> None:
    """One host read for all the tensors: raise if any holds inf or NaN."""
    names = [n for n, t in tensors.items() if t.numel()]
    if not names:
        return
    flags = torch.stack([~torch.isfinite(tensors[n]).all() for n in names]).tolist()
    bad = [n for n, f in zip(names, flags) if f]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} must be finite, found inf or NaN")


def _check_code_padding(op: str, nbits: int, **codes: Tensor) -> None:
    """Bits beyond nbits must be zero (else the codes were packed for more bits): one host read."""
    if nbits % 32 == 0 or not any(c.numel() for c in codes.values()):
        return
    mask = -(1 << (nbits % 32))  # the unused high bits of the last word, as an int32 pattern
    flags = torch.stack([(c[..., -1] & mask).ne(0).any() for c in codes.values()]).tolist()
    bad = [n for n, f in zip(codes, flags) if f]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} have bits set beyond nbits = {nbits}: packed for "
                         f"more bits than nbits says?")


def _check_hash_params(op: str, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> None:
    _check_float(op, "x", x, 4)
    _check_float(op, "anchors", anchors, 3)
    _check_float(op, "mu", mu, 2)
    _check_float(op, "proj", proj, 3)
    for name, t in (("anchors", anchors), ("mu", mu), ("proj", proj)):
        check_same_device(op, name, t, "x", x)
    h, d = x.shape[1], x.shape[3]
    m = anchors.shape[1]
    if anchors.shape != (h, m, d) or m == 0:
        raise ValueError(f"{op}: anchors must be [H, m, d] = [{h}, m, {d}] with m >= 1, got {tuple(anchors.shape)}")
    if mu.shape != (h, m):
        raise ValueError(f"{op}: mu must be [H, m] = {(h, m)}, got {tuple(mu.shape)}")
    if proj.shape[0] != h or proj.shape[2] != m or not 1 <= proj.shape[1] <= MAX_NBITS:
        raise ValueError(f"{op}: proj must be [H, b, m] = [{h}, b, {m}] with 1 <= b <= {MAX_NBITS}, "
                         f"got {tuple(proj.shape)}")
    if x.shape[2] == 0 or d == 0:
        raise ValueError(f"{op}: x must have N >= 1 tokens and d >= 1 channels, got {tuple(x.shape)}")


def _check_ksh_hash(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, validate: bool | None) -> None:
    _check_hash_params("ksh_hash", x, anchors, mu, proj)


def _check_ksh_codes(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, validate: bool | None) -> None:
    _check_hash_params("ksh_codes", x, anchors, mu, proj)


def _check_ksh_hash_backward(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> None:
    op = "ksh_hash_backward"
    _check_hash_params(op, x, anchors, mu, proj)
    _check_float(op, "grad_y", grad_y, 4)
    check_same_device(op, "grad_y", grad_y, "x", x)
    if grad_y.shape != x.shape[:3] + (proj.shape[1],):
        raise ValueError(f"{op}: grad_y must be [B, H, N, b] = {tuple(x.shape[:3]) + (proj.shape[1],)}, "
                         f"got {tuple(grad_y.shape)}")


def _check_pack_bits(h: Tensor) -> None:
    check_tensor("pack_bits", "h", h, dtypes=PACK_DTYPES)
    if h.dim() == 0 or not 1 <= h.shape[-1] <= MAX_NBITS:
        raise ValueError(f"pack_bits: h must be [..., b] with 1 <= b <= {MAX_NBITS}, got {tuple(h.shape)}")


def _check_codes(op: str, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> None:
    _check_float(op, "v", v, 4)
    _check_nbits(op, nbits)
    check_choice(op, "form", form, FORMS)
    w = num_words(nbits)
    for name, c in (("q_codes", q_codes), ("k_codes", k_codes)):
        _check_float(op, name, c, 4, (torch.int32,))
        check_same_device(op, name, c, "v", v)
        if c.shape != v.shape[:3] + (w,):
            raise ValueError(f"{op}: {name} must be [B, H, N, ceil(nbits / 32)] = "
                             f"{tuple(v.shape[:3]) + (w,)} for v of shape {tuple(v.shape)} and "
                             f"nbits = {nbits}, got {tuple(c.shape)}")


def _check_binary_attention(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str,
                            validate: bool | None) -> None:
    _check_codes("binary_attention", q_codes, k_codes, v, nbits, form)


def _check_binary_attention_backward(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                                     form: str) -> None:
    op = "binary_attention_backward"
    _check_codes(op, q_codes, k_codes, v, nbits, form)
    _check_float(op, "grad_out", grad_out, 4)
    check_same_device(op, "grad_out", grad_out, "v", v)
    if grad_out.shape != v.shape:
        raise ValueError(f"{op}: grad_out must have v's shape {tuple(v.shape)}, got {tuple(grad_out.shape)}")


def _check_hashed_attention(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> None:
    op = "hashed_attention"
    check_choice(op, "form", form, FORMS)
    _check_float(op, "v", v, 4)
    for name, y in (("y_q", y_q), ("y_k", y_k)):
        _check_float(op, name, y, 4)
        check_same_device(op, name, y, "v", v)
    if y_q.shape != y_k.shape or y_q.shape[:3] != v.shape[:3] or not 1 <= y_q.shape[-1] <= MAX_NBITS:
        raise ValueError(f"{op}: the query and key hashes y_q, y_k must both be [B, H, N, b] with "
                         f"1 <= b <= {MAX_NBITS} and v [B, H, N, d], got {tuple(y_q.shape)}, "
                         f"{tuple(y_k.shape)} and {tuple(v.shape)}")


# ============================================================================================
# 3. Ops
# ============================================================================================

# Test-case builders (see effkern._registry.Cases): inputs drawn from a CPU generator, moved to
# the device.


def _randn(gen, *shape, dtype=torch.float32, device="cpu", std=1.0) -> Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)


def _timm_views(gen, b, n, h, d, parts, dtype=torch.float32, device="cpu", std=1.0) -> tuple[Tensor, ...]:
    """``parts`` [B, H, N, d] views of one [B, N, parts * H * d] tensor, taken apart as timm's
    Attention takes q, k, v: ``reshape(B, N, parts, H, d).permute(2, 0, 3, 1, 4).unbind(0)``."""
    t = _randn(gen, b, n, parts * h * d, dtype=dtype, device=device, std=std)
    return t.reshape(b, n, parts, h, d).permute(2, 0, 3, 1, 4).unbind(0)


def _ksh_buffers(gen, h, m, d, nbits, device="cpu", dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """anchors [H, m, d] of unit norm (like normalised queries), mu [H, m], proj [H, b, m]."""
    anchors = torch.randn(h, m, d, generator=gen, dtype=torch.float64)
    anchors = anchors / anchors.norm(dim=-1, keepdim=True)
    mu = 0.3 * torch.rand(h, m, generator=gen, dtype=torch.float64)
    proj = torch.randn(h, nbits, m, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (anchors, mu, proj))


def _codes(gen, shape, nbits, device="cpu") -> Tensor:
    return pack_codes(torch.randn(*shape, nbits, generator=gen)).to(device)


def _draw(gen, lo: int, hi: int) -> int:
    """An integer in [lo, hi] from gen."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _pick(gen, options):
    return options[_draw(gen, 0, len(options) - 1)]


# ---- ksh_hash ------------------------------------------------------------------------------

KSH_HASH_BACKWARD = define_op(
    "ksh_hash_backward", family=FAMILY, doc="gradient of ksh_hash", public=False,
    check=_check_ksh_hash_backward, dispatch_on="x",
    kernels=[
        torch_kernel(ksh_hash_bwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash_ksh:ksh_hash_bwd", dtypes=FLOAT_DTYPES),
    ],
)


@KSH_HASH_BACKWARD.impl
def _ksh_hash_backward_op(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    return KSH_HASH_BACKWARD.kernels(grad_y=grad_y.contiguous(), x=x.contiguous(), anchors=anchors.contiguous(),
                                     mu=mu.contiguous(), proj=proj.contiguous())


@KSH_HASH_BACKWARD.fake
def _(grad_y, x, anchors, mu, proj):
    return x.new_empty(x.shape)


KSH_HASH = define_op(
    "ksh_hash", family=FAMILY, doc="fused KSH hash: normalise, RBF to anchors, centre, project",
    check=_check_ksh_hash, dispatch_on="x",
    kernels=[
        torch_kernel(ksh_hash_fwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash_ksh:ksh_hash_fwd", dtypes=FLOAT_DTYPES),
    ],
)


@KSH_HASH.impl
def _ksh_hash_op(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, validate: bool | None) -> Tensor:
    if resolve_validate(validate, x):
        _check_finite("ksh_hash", x=x, anchors=anchors, mu=mu, proj=proj)
    return KSH_HASH.kernels(x=x.contiguous(), anchors=anchors.contiguous(), mu=mu.contiguous(),
                            proj=proj.contiguous())


@KSH_HASH.fake
def _(x, anchors, mu, proj, validate):
    return x.new_empty(tuple(x.shape[:3]) + (proj.shape[1],), dtype=acc_dtype(x.dtype))


def _ksh_hash_setup(ctx, inputs, output):
    x, anchors, mu, proj, _ = inputs
    ctx.save_for_backward(x, anchors, mu, proj)


def _ksh_hash_backward(ctx, grad_y):
    x, anchors, mu, proj = ctx.saved_tensors
    return torch.ops.effkern.ksh_hash_backward(grad_y, x, anchors, mu, proj), None, None, None, None


KSH_HASH.autograd(_ksh_hash_backward, _ksh_hash_setup)


def _ksh_hash_samples(gen, device):
    def call(x, h, m, d, nbits):
        return (x, *_ksh_buffers(gen, h, m, d, nbits, device), True)

    extreme = _randn(gen, 2, 2, 9, 16, device=device)
    extreme[0, 0, 0] *= 1e20  # squares overflow float32
    extreme[0, 0, 1] *= 1e37  # near the float32 range (and 1 / ||x|| near its bottom)
    extreme[0, 1, 2] *= 1e-30  # squares underflow; ||x|| < NORM_EPS
    extreme[1, 1, 3] = 0  # hashes like the origin
    q = _timm_views(gen, 2, 197, 3, 32, 3, device=device)[0]
    return [
        Sample(call(_randn(gen, 1, 1, 1, 32, device=device), 1, 25, 32, 16), "one token"),
        Sample(call(q, 3, 25, 32, 64), "timm-permuted q, N = 197"),
        Sample(call(_randn(gen, 3, 2, 17, 7, dtype=torch.bfloat16, device=device).transpose(-1, -2), 2, 7, 17, 8),
               "bfloat16, odd sizes, transposed x"),
        Sample(call(_timm_views(gen, 1, 3, 2, 8, 2, torch.float16, device)[1], 2, 3, 8, 100), "float16 k view, b = 100"),
        Sample(call(extreme, 2, 5, 16, 16), "|x| near 1e20 and 1e37, tiny and zero rows"),
    ]


def _ksh_hash_random(gen, device):
    b, h, n, d = _draw(gen, 1, 2), _draw(gen, 1, 3), _draw(gen, 1, 64), _draw(gen, 2, 32)
    m, nbits = _draw(gen, 1, 25), _draw(gen, 1, 64)
    dtype = _pick(gen, FLOAT_DTYPES)
    std = 10.0 ** _draw(gen, -3, 2)
    if _draw(gen, 0, 1):
        x = _timm_views(gen, b, n, h, d, 3, dtype, device, std)[_draw(gen, 0, 2)]
    else:
        x = _randn(gen, b, h, n, d, dtype=dtype, device=device, std=std)
    return Sample((x, *_ksh_buffers(gen, h, m, d, nbits, device), True), f"{dtype} x {tuple(x.shape)} m={m} b={nbits}")


def _ksh_hash_invalid(gen, device, op="ksh_hash"):
    x = _randn(gen, 2, 3, 5, 8, device=device)
    a, mu, p = _ksh_buffers(gen, 3, 4, 8, 16, device)
    bad = x.clone()
    bad[1, 2, 3, 4] = math.inf
    return [
        Invalid((x, a[:, :, :4], mu, p, True), ValueError, rf"{op}: anchors must be \[H, m, d\]"),
        Invalid((x, a, mu[:, :3], p, True), ValueError, rf"{op}: mu must be \[H, m\]"),
        Invalid((x, a, mu, p[:, :, :3], True), ValueError, rf"{op}: proj must be \[H, b, m\]"),
        Invalid((x, a, mu, torch.zeros(3, MAX_NBITS + 1, 4, device=device), True), ValueError,
                rf"{op}: proj must be .* 1 <= b <= 1024"),
        Invalid((x[0], a, mu, p, True), ValueError, f"{op}: x must be 4-D"),
        Invalid((x.to(torch.int32), a, mu, p, True), TypeError, f"{op}: x must have dtype"),
        Invalid((x, a.to("meta"), mu, p, True), ValueError, f"{op}: anchors is on meta"),
        Invalid((x[:, :, :0], a, mu, p, True), ValueError, f"{op}: x must have N >= 1 tokens"),
        Invalid((bad, a, mu, p, True), ValueError, f"{op}: x must be finite"),
    ]


KSH_HASH.cases(samples=_ksh_hash_samples, random=_ksh_hash_random, invalid=_ksh_hash_invalid, grad_args=(0,))


def ksh_hash(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, *, validate: bool | None = None) -> Tensor:
    """KSH hash projections y of queries or keys (before the sign), fused.

    Args:
        x: ``[B, H, N, d]`` queries or keys (float16/bfloat16/float32; float64 on the torch
            backend), any layout (timm's permuted q/k views included).
        anchors: ``[H, m, d]``; mu: ``[H, m]``; proj: ``[H, b, m]`` (buffers, not trained).
        validate: check that every input is finite (one device sync on a GPU). None (default):
            on CPU tensors, off on a GPU unless ``effkern.validation()`` / ``EFFKERN_VALIDATE=1``.

    Returns ``y [B, H, N, b]`` in float32 (float64 for float64 x), contiguous: x normalised
    over d (overflow-free for any finite x), D = ||x - anchor||^2, sigma = mean(D) per sample
    and head, K = exp(-D / (2 sigma)) - mu, y = K proj^T. Differentiable in x (through sigma too).
    """
    return torch.ops.effkern.ksh_hash(x, anchors, mu, proj, validate)


# ---- ksh_codes: the hash and pack_bits fused (inference) -------------------------------------

KSH_CODES = define_op(
    "ksh_codes", family=FAMILY, doc="fused KSH hash and pack_bits: packed int32 codes, y never written",
    check=_check_ksh_codes, dispatch_on="x",
    kernels=[
        torch_kernel(ksh_hash_codes, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash_ksh:ksh_hash_codes", dtypes=FLOAT_DTYPES),
    ],
)


@KSH_CODES.impl
def _ksh_codes_op(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, validate: bool | None) -> Tensor:
    if resolve_validate(validate, x):
        _check_finite("ksh_codes", x=x, anchors=anchors, mu=mu, proj=proj)
    return KSH_CODES.kernels(x=x.contiguous(), anchors=anchors.contiguous(), mu=mu.contiguous(),
                             proj=proj.contiguous())


@KSH_CODES.fake
def _(x, anchors, mu, proj, validate):
    return x.new_empty(tuple(x.shape[:3]) + (num_words(proj.shape[1]),), dtype=torch.int32)


# Codes are compared bit for bit across backends, and backends round y differently: a hash
# within rounding of zero could flip a bit. The test calls keep every hash at least
# CODE_MARGIN max|y| (float64) away from zero, redrawing the rows of proj that come nearer
# (y[..., k] of head h depends on proj[h, k] alone).
CODE_MARGIN = 1e-5


def _tie_free(gen, sample: Sample) -> Sample:
    x, anchors, mu, proj, validate = sample.args
    x64, a64, mu64 = (t.double().cpu() for t in (x, anchors, mu))
    p = proj.double().cpu()
    for _ in range(100):
        y = ksh_hash_fwd(x64, a64, mu64, p)
        if y.numel() == 0:
            break
        near = (y.abs() < CODE_MARGIN * y.abs().max()).any(dim=2).any(dim=0)  # [H, b]
        if not near.any():
            break
        p[near] = torch.randn(int(near.sum()), p.shape[2], generator=gen, dtype=torch.float64)
    return Sample((x, anchors, mu, p.to(proj.dtype).to(proj.device), validate), sample.note)


KSH_CODES.cases(samples=lambda gen, device: [_tie_free(gen, s) for s in _ksh_hash_samples(gen, device)],
                random=lambda gen, device: _tie_free(gen, _ksh_hash_random(gen, device)),
                invalid=lambda gen, device: _ksh_hash_invalid(gen, device, "ksh_codes"), exact=True)


def ksh_codes(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, *, validate: bool | None = None) -> Tensor:
    """The packed binary codes of the KSH hash, ``pack_bits(ksh_hash(x, anchors, mu, proj))``,
    fused for inference: y is never written.

    Args: as :func:`ksh_hash`. Returns int32 ``[B, H, N, ceil(b / 32)]``, contiguous: bit k of
    a token's code (bit k % 32 of word k // 32) is 1 where y_k > 0, the bits pack_bits makes of
    the same backend's y. Not differentiable (train with :func:`ksh_hash`).
    """
    return torch.ops.effkern.ksh_codes(x, anchors, mu, proj, validate)


# ---- pack_bits / unpack_bits ---------------------------------------------------------------

PACK_BITS = define_op(
    "pack_bits", family=FAMILY, doc="binary codes -> packed int32 words",
    check=_check_pack_bits, dispatch_on="h",
    kernels=[
        torch_kernel(pack_codes, dtypes=PACK_DTYPES),
        triton_kernel("binary_hash:pack_codes", dtypes=FLOAT_DTYPES),
    ],
)


@PACK_BITS.impl
def _pack_bits_op(h: Tensor) -> Tensor:
    return PACK_BITS.kernels(h=h.contiguous())


@PACK_BITS.fake
def _(h):
    return h.new_empty(tuple(h.shape[:-1]) + (num_words(h.shape[-1]),), dtype=torch.int32)


def _with_zeros(h: Tensor) -> Tensor:
    """h with exact zeros and negative zeros (both count as 0)."""
    h = h.clone()
    h[..., ::7] = 0.0
    h[..., 3::11] = -0.0
    return h


def _pack_bits_samples(gen, device):
    y = _timm_views(gen, 2, 197, 3, 64, 1, torch.float16, device)[0]  # [B, H, N, b], permuted
    return [
        Sample((_randn(gen, 3, 5, 1, device=device),), "b = 1"),
        Sample((_with_zeros(y),), "timm-permuted float16 hashes, b = 64, zeros"),
        Sample((_with_zeros(_randn(gen, 4, 100, dtype=torch.bfloat16, device=device)),), "bfloat16, b = 100"),
        Sample((_randn(gen, 3, MAX_NBITS, device=device)[:, None],), "b = 1024"),
        Sample((_randn(gen, 0, 16, device=device),), "empty batch"),
    ]


def _pack_bits_random(gen, device):
    shape = [_draw(gen, 1, 5) for _ in range(_draw(gen, 0, 3))] + [_draw(gen, 1, 64)]
    h = _randn(gen, *shape, dtype=_pick(gen, FLOAT_DTYPES), device=device)
    return Sample((_with_zeros(h) if _draw(gen, 0, 1) else h.transpose(0, -1).contiguous().transpose(0, -1),),
                  f"{h.dtype} {tuple(h.shape)}")


def _pack_bits_invalid(gen, device):
    h = _randn(gen, 3, 40, device=device)
    return [
        Invalid((h[0, 0],), ValueError, r"pack_bits: h must be \[\.\.\., b\] with 1 <= b <= 1024"),
        Invalid((h[:, :0],), ValueError, r"pack_bits: h must be \[\.\.\., b\]"),
        Invalid((torch.ones(2, MAX_NBITS + 1, device=device),), ValueError, r"pack_bits: h must be \[\.\.\., b\]"),
        Invalid((h.to(torch.int16),), TypeError, "pack_bits: h must have dtype"),
    ]


PACK_BITS.cases(samples=_pack_bits_samples, random=_pack_bits_random, invalid=_pack_bits_invalid, exact=True)


def pack_bits(h: Tensor) -> Tensor:
    """Pack binary codes ``h [..., b]`` (an element counts as 1 when > 0) into int32 words
    ``[..., ceil(b / 32)]``: bit j of the code is bit j % 32 of word j // 32, least significant
    first; unused high bits are 0. Not differentiable."""
    return torch.ops.effkern.pack_bits(h)


def unpack_bits(codes: Tensor, b: int, *, signed: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., b]`` of {0, 1} (``signed``: {-1, +1}) in ``dtype``."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int32 or codes.dim() == 0:
        raise TypeError("unpack_bits: codes must be an int32 tensor [..., ceil(b / 32)]")
    check_int("unpack_bits", "b", b, 1, MAX_NBITS)
    if codes.shape[-1] != num_words(b):
        raise ValueError(f"unpack_bits: codes hold {codes.shape[-1]} words but b = {b} needs {num_words(b)}")
    return unpack_codes(codes, b, signed, dtype)


# ---- binary_attention (inference, packed codes) --------------------------------------------


def _cuda_head_dim(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> list[str]:
    return [] if v.shape[-1] in CUDA_HEAD_DIMS else [f"head dim d = {v.shape[-1]} is not one of {CUDA_HEAD_DIMS}"]


def _cuda_binary_attention(op, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> Tensor:
    """cuda_binary_attention(v, q_codes, k_codes, nbits, form index) (csrc/binary_hash)."""
    return op(v, q_codes, k_codes, nbits, FORMS.index(form))


BINARY_ATTENTION_BACKWARD = define_op(
    "binary_attention_backward", family=FAMILY, doc="gradient of binary_attention (codes and v)", public=False,
    check=_check_binary_attention_backward, dispatch_on="v",
    kernels=[
        torch_kernel(binary_attention_bwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash:binary_attention_bwd", dtypes=FLOAT_DTYPES),
    ],
)


@BINARY_ATTENTION_BACKWARD.impl
def _binary_attention_backward_op(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                                  form: str) -> tuple[Tensor, Tensor, Tensor]:
    return BINARY_ATTENTION_BACKWARD.kernels(grad_out=grad_out.contiguous(), q_codes=q_codes.contiguous(),
                                             k_codes=k_codes.contiguous(), v=v.contiguous(), nbits=nbits, form=form)


@BINARY_ATTENTION_BACKWARD.fake
def _(grad_out, q_codes, k_codes, v, nbits, form):
    code_shape = tuple(v.shape[:3]) + (nbits,)
    acc = acc_dtype(v.dtype)
    # Every output is allocated contiguous (v's layout, a timm-permuted view say, is not copied).
    return v.new_empty(code_shape, dtype=acc), v.new_empty(code_shape, dtype=acc), v.new_empty(v.shape)


BINARY_ATTENTION = define_op(
    "binary_attention", family=FAMILY, doc="linear attention from packed binary codes",
    check=_check_binary_attention, dispatch_on="v",
    kernels=[
        torch_kernel(binary_attention_fwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash:binary_attention_fwd", dtypes=FLOAT_DTYPES),
        cuda_kernel("cuda_binary_attention", dtypes=FLOAT_DTYPES, check=_cuda_head_dim, adapter=_cuda_binary_attention),
    ],
)


@BINARY_ATTENTION.impl
def _binary_attention_op(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str,
                         validate: bool | None) -> Tensor:
    if resolve_validate(validate, v):
        _check_finite("binary_attention", v=v)
        _check_code_padding("binary_attention", nbits, q_codes=q_codes, k_codes=k_codes)
    return BINARY_ATTENTION.kernels(q_codes=q_codes.contiguous(), k_codes=k_codes.contiguous(), v=v.contiguous(),
                                    nbits=nbits, form=form)


@BINARY_ATTENTION.fake
def _(q_codes, k_codes, v, nbits, form, validate):
    return v.new_empty(v.shape)


def _binary_attention_setup(ctx, inputs, output):
    q_codes, k_codes, v, nbits, form, _ = inputs
    ctx.save_for_backward(q_codes, k_codes, v)
    ctx.nbits, ctx.form = nbits, form


def _binary_attention_backward(ctx, grad_out):
    q_codes, k_codes, v = ctx.saved_tensors
    _, _, dv = torch.ops.effkern.binary_attention_backward(grad_out, q_codes, k_codes, v, ctx.nbits, ctx.form)
    return None, None, dv, None, None, None


BINARY_ATTENTION.autograd(_binary_attention_backward, _binary_attention_setup)


def _timm_codes(gen, b, n, h, nbits, device) -> Tensor:
    """Packed codes [B, H, N, W] as a permuted view of [B, N, H, W]."""
    return _codes(gen, (b, n, h), nbits, device).transpose(1, 2)


def _binary_attention_samples(gen, device):
    v = _timm_views(gen, 2, 197, 3, 32, 3, device=device)[2]
    zero = _randn(gen, 1, 2, 9, 32, device=device)
    zero[0, 1, 4] = 0
    qz = _codes(gen, (1, 2, 9), 32, device)
    qz[0, 1, 4] = 0  # h_q = 0 and v = 0: t = 0 (shiftadd)
    return [
        Sample((_codes(gen, (1, 1, 1), 16, device), _codes(gen, (1, 1, 1), 16, device),
                _randn(gen, 1, 1, 1, 32, device=device), 16, "ecoformer", True), "one token"),
        Sample((_codes(gen, (2, 3, 197), 64, device), _codes(gen, (2, 3, 197), 64, device), v, 64, "shiftadd", True),
               "timm-permuted v, N = 197"),
        Sample((_codes(gen, (3, 1, 7), 100, device), _codes(gen, (3, 1, 7), 100, device),
                _randn(gen, 3, 1, 64, 7, dtype=torch.bfloat16, device=device).transpose(-1, -2), 100, "ecoformer", True),
               "bfloat16, odd sizes, nbits = 100, transposed v"),
        Sample((_timm_codes(gen, 1, 33, 3, 5, device), _timm_codes(gen, 1, 33, 3, 5, device),
                _timm_views(gen, 1, 33, 3, 32, 3, torch.float16, device)[2], 5, "shiftadd", True),
               "float16, permuted codes and v, nbits = 5"),
        Sample((qz, _codes(gen, (1, 2, 9), 32, device), zero, 32, "shiftadd", True), "shiftadd t = 0 row"),
        Sample((_codes(gen, (0, 2, 5), 16, device), _codes(gen, (0, 2, 5), 16, device),
                _randn(gen, 0, 2, 5, 32, device=device), 16, "ecoformer", True), "empty batch"),
    ]


def _binary_attention_random(gen, device):
    b, h, n, nbits = _draw(gen, 1, 2), _draw(gen, 1, 3), _draw(gen, 1, 64), _draw(gen, 1, 64)
    # The CUDA kernels take d in CUDA_HEAD_DIMS only (they decline the rest).
    d = _draw(gen, 1, 32) if device == "cpu" else 32
    dtype, form = _pick(gen, FLOAT_DTYPES), _pick(gen, FORMS)
    if _draw(gen, 0, 1):
        v = _timm_views(gen, b, n, h, d, 3, dtype, device)[2]
        qc, kc = _timm_codes(gen, b, n, h, nbits, device), _timm_codes(gen, b, n, h, nbits, device)
    else:
        v = _randn(gen, b, h, n, d, dtype=dtype, device=device)
        qc, kc = _codes(gen, (b, h, n), nbits, device), _codes(gen, (b, h, n), nbits, device)
    return Sample((qc, kc, v, nbits, form, True), f"{dtype} v {tuple(v.shape)} nbits={nbits} {form}")


def _binary_attention_invalid(gen, device):
    v = _randn(gen, 2, 3, 7, 8, device=device)
    qc = _codes(gen, (2, 3, 7), 16, device)
    nan = v.clone()
    nan[0, 0, 0, 0] = math.nan
    return [
        Invalid((qc, qc, v, 40, "ecoformer", True), ValueError,
                r"binary_attention: q_codes must be \[B, H, N, ceil\(nbits / 32\)\] = \(2, 3, 7, 2\)"),
        Invalid((qc, qc, v, 8, "ecoformer", True), ValueError, "binary_attention: .*bits set beyond nbits = 8"),
        Invalid((qc, qc, v, 16, "softmax", True), ValueError, "binary_attention: form must be"),
        Invalid((qc, qc[:, :, :5], v, 16, "shiftadd", True), ValueError, "binary_attention: k_codes must be"),
        Invalid((qc.long(), qc, v, 16, "shiftadd", True), TypeError, "binary_attention: q_codes must have dtype int32"),
        Invalid((qc, qc, v.to(torch.int32), 16, "shiftadd", True), TypeError, "binary_attention: v must have dtype"),
        Invalid((qc, qc, v, 0, "shiftadd", True), ValueError, r"binary_attention: nbits must be an integer in \[1, 1024\]"),
        Invalid((qc.to("meta"), qc, v, 16, "shiftadd", True), ValueError, "binary_attention: q_codes is on meta"),
        Invalid((qc, qc, nan, 16, "shiftadd", True), ValueError, "binary_attention: v must be finite"),
    ]


BINARY_ATTENTION.cases(samples=_binary_attention_samples, random=_binary_attention_random,
                       invalid=_binary_attention_invalid, grad_args=(2,))


def binary_attention(q_codes: Tensor, k_codes: Tensor, v: Tensor, *, nbits: int, form: str,
                     validate: bool | None = None) -> Tensor:
    """Linear attention from packed binary query/key codes (inference; not differentiable in
    the codes: use :func:`binary_hash_attention` to train).

    Args:
        q_codes, k_codes: int32 ``[B, H, N, ceil(nbits / 32)]`` from :func:`pack_bits`.
        v: ``[B, H, N, d]`` values, float16/bfloat16/float32 (float64 on the torch backend),
            any layout (timm's permuted v view included).
        nbits: code length b; form: ``"ecoformer"`` ({-1, +1} codes) or ``"shiftadd"`` ({0, 1}).
        validate: check v is finite and no code bit beyond nbits is set (one device sync on a
            GPU). None (default): as :func:`ksh_hash`.

    Returns ``[B, H, N, d]`` in v's dtype, contiguous, accumulated in float32; see the module
    docstring for the two forms. Differentiable in v.
    """
    return torch.ops.effkern.binary_attention(q_codes, k_codes, v, nbits, form, validate)


# ---- the training path: hashes -> codes -> attention, straight-through -------------------


def _pack_for_cuda(h: Tensor) -> Tensor:
    """The codes of h for the CUDA attention kernel (which does not pack): packed by the
    Triton kernel where it runs, else by the torch one."""
    triton_pack = PACK_BITS.kernels.impls["triton"]
    return (pack_codes if triton_pack.reasons(h, (h,)) else triton_pack.fn)(h)


def _cuda_hashed_head_dim(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> list[str]:
    return _cuda_head_dim(y_q, y_k, v, y_q.shape[-1], form)


def _cuda_hashed_attention(op, y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> Tensor:
    return op(v, _pack_for_cuda(y_q), _pack_for_cuda(y_k), y_q.shape[-1], FORMS.index(form))


HASHED_ATTENTION = define_op(
    "hashed_attention", family=FAMILY, doc="binary attention from the hashes y_q, y_k (codes packed inside)",
    check=_check_hashed_attention, dispatch_on="v",
    kernels=[
        torch_kernel(hashed_attention_fwd, dtypes=TORCH_FLOAT_DTYPES),
        triton_kernel("binary_hash:hashed_attention_fwd", dtypes=FLOAT_DTYPES),
        cuda_kernel("cuda_binary_attention", dtypes=FLOAT_DTYPES, check=_cuda_hashed_head_dim,
                    adapter=_cuda_hashed_attention),
    ],
)


@HASHED_ATTENTION.impl
def _hashed_attention_op(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> Tensor:
    return HASHED_ATTENTION.kernels(y_q=y_q.contiguous(), y_k=y_k.contiguous(), v=v.contiguous(), form=form)


@HASHED_ATTENTION.fake
def _(y_q, y_k, v, form):
    return v.new_empty(v.shape)


def _ste_mask(y: Tensor, form: str) -> Tensor:
    """Where the straight-through estimator passes the gradient of the code to y."""
    return (y.abs() < 1) if SIGNED[form] else ((y > 0) & (y < 1))


def _hashed_attention_setup(ctx, inputs, output):
    y_q, y_k, v, form = inputs
    ctx.save_for_backward(y_q, y_k, v)
    ctx.form = form


def _hashed_attention_backward(ctx, grad_out):
    y_q, y_k, v = ctx.saved_tensors
    nbits = y_q.shape[-1]
    q_codes, k_codes = torch.ops.effkern.pack_bits(y_q), torch.ops.effkern.pack_bits(y_k)
    d_hq, d_hk, dv = torch.ops.effkern.binary_attention_backward(grad_out, q_codes, k_codes, v, nbits, ctx.form)
    d_yq = d_hq * _ste_mask(y_q, ctx.form)
    d_yk = d_hk * _ste_mask(y_k, ctx.form)
    return d_yq.to(y_q.dtype), d_yk.to(y_k.dtype), dv, None


HASHED_ATTENTION.autograd(_hashed_attention_backward, _hashed_attention_setup)


def _hashed_attention_samples(gen, device):
    y_q, y_k = _timm_views(gen, 2, 197, 3, 16, 2, device=device)
    v = _timm_views(gen, 2, 197, 3, 32, 3, device=device)[2]
    return [
        Sample((*_timm_views(gen, 1, 1, 1, 8, 2, device=device), _randn(gen, 1, 1, 1, 32, device=device), "ecoformer"),
               "one token"),
        Sample((y_q, y_k, v, "shiftadd"), "timm-permuted y_q, y_k, v, N = 197"),
        Sample((y_q, y_k, v, "ecoformer"), "timm-permuted y_q, y_k, v, N = 197"),
        Sample((_randn(gen, 3, 1, 7, 5, device=device), _randn(gen, 3, 1, 7, 5, device=device),
                _randn(gen, 3, 1, 64, 7, dtype=torch.bfloat16, device=device).transpose(-1, -2), "shiftadd"),
               "bfloat16 v, odd sizes, b = 5"),
        Sample((*_timm_views(gen, 1, 33, 2, 100, 2, torch.float16, device),
                _timm_views(gen, 1, 33, 2, 32, 3, torch.float16, device)[2], "ecoformer"), "float16, b = 100"),
    ]


def _hashed_attention_random(gen, device):
    b, h, n, nbits = _draw(gen, 1, 2), _draw(gen, 1, 3), _draw(gen, 1, 64), _draw(gen, 1, 64)
    d = _draw(gen, 1, 32) if device == "cpu" else 32  # the CUDA kernels decline other d
    dtype, form = _pick(gen, FLOAT_DTYPES), _pick(gen, FORMS)
    if _draw(gen, 0, 1):
        y_q, y_k = _timm_views(gen, b, n, h, nbits, 2, dtype, device)
        v = _timm_views(gen, b, n, h, d, 3, dtype, device)[2]
    else:
        y_q, y_k = (_randn(gen, b, h, n, nbits, dtype=dtype, device=device) for _ in range(2))
        v = _randn(gen, b, h, n, d, dtype=dtype, device=device)
    return Sample((y_q, y_k, v, form), f"{dtype} v {tuple(v.shape)} b={nbits} {form}")


def _hashed_attention_invalid(gen, device):
    y = _randn(gen, 2, 3, 7, 16, device=device)
    v = _randn(gen, 2, 3, 7, 8, device=device)
    return [
        Invalid((y, y[:, :, :5], v, "ecoformer"), ValueError, r"hashed_attention: the query and key hashes"),
        Invalid((y, y, v[:, :2], "ecoformer"), ValueError, r"hashed_attention: the query and key hashes"),
        Invalid((y[..., :0], y[..., :0], v, "ecoformer"), ValueError, r"hashed_attention: .* 1 <= b <= 1024"),
        Invalid((y, y, v, "softmax"), ValueError, "hashed_attention: form must be"),
        Invalid((y, y, v[0], "shiftadd"), ValueError, "hashed_attention: v must be 4-D"),
        Invalid((y.to(torch.int32), y, v, "shiftadd"), TypeError, "hashed_attention: y_q must have dtype"),
        Invalid((y, y.to("meta"), v, "shiftadd"), ValueError, "hashed_attention: y_k is on meta"),
    ]


HASHED_ATTENTION.cases(samples=_hashed_attention_samples, random=_hashed_attention_random,
                       invalid=_hashed_attention_invalid, grad_args=(0, 1, 2))


@dataclass(frozen=True)
class KSHParams:
    """The buffers of a KSH hash: anchors [H, m, d], mu [H, m], proj [H, b, m]."""

    anchors: Tensor
    mu: Tensor
    proj: Tensor

    @property
    def nbits(self) -> int:
        return self.proj.shape[1]

    def __call__(self, x: Tensor, *, validate: bool | None = None) -> Tensor:
        return ksh_hash(x, self.anchors, self.mu, self.proj, validate=validate)

    def codes(self, x: Tensor, *, validate: bool | None = None) -> Tensor:
        """The packed codes of x's hash, fused (:func:`ksh_codes`)."""
        return ksh_codes(x, self.anchors, self.mu, self.proj, validate=validate)


@dataclass(frozen=True)
class RandomProjection:
    """The random-projection hash: y = x R with a fixed Gaussian R [H, d, b] (no normalisation).
    A plain batched matmul, so it runs as one (cuBLAS) einsum."""

    weight: Tensor

    @property
    def nbits(self) -> int:
        return self.weight.shape[2]

    def __call__(self, x: Tensor, *, validate: bool | None = None) -> Tensor:
        if x.dim() != 4 or self.weight.dim() != 3 or self.weight.shape[:2] != (x.shape[1], x.shape[3]):
            raise ValueError(f"RandomProjection: x must be [B, H, N, d] and the projection [H, d, b], "
                             f"got {tuple(x.shape)} and {tuple(self.weight.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"RandomProjection: x is on {x.device} but the projection on {self.weight.device}")
        acc = acc_dtype(x.dtype)
        return torch.einsum("bhnd,hdk->bhnk", x.to(acc), self.weight.to(acc))

    def codes(self, x: Tensor, *, validate: bool | None = None) -> Tensor:
        """The packed codes of x's hash (:func:`pack_bits` of the projection)."""
        return pack_bits(self(x, validate=validate))


def binary_hash_attention(q: Tensor, k: Tensor, v: Tensor, hash: KSHParams | RandomProjection, form: str,
                          *, validate: bool | None = None) -> Tensor:
    """The trainable path: hash q and k, binarise, attend; gradients to v and, through the
    straight-through estimator, to q and k.

    Args:
        q, k, v: ``[B, H, N, d]`` (float16/bfloat16/float32; float64 on the torch backend), any
            layout (timm's ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``
            views included; works under ``torch.compile``, inductor included).
        hash: :class:`KSHParams` (KSH, both papers) or :class:`RandomProjection`.
        form: ``"ecoformer"`` (codes sign(y)) or ``"shiftadd"`` (codes 1[y > 0]).
        validate: check q, k, v are finite (one device sync on a GPU). None (default): as
            :func:`ksh_hash`.

    Returns ``[B, H, N, d]`` in v's dtype. The backward is fused kernels (the attention's
    backward and the hash's), with dL/dy = dL/dh where |y| < 1 ({-1, +1} codes) or 0 < y < 1
    ({0, 1} codes).
    """
    op = "binary_hash_attention"
    check_choice(op, "form", form, FORMS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(op, name, t, 4)
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"{op}: q and k must be [B, H, N, d] and v [B, H, N, d_v] with the "
                         f"same B, H, N, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if resolve_validate(validate, v):
        _check_finite(op, q=q, k=k, v=v)
    y_q, y_k = hash(q, validate=False), hash(k, validate=False)
    return torch.ops.effkern.hashed_attention(y_q, y_k, v, form)
