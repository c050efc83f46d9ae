"""Binary-hash additive attention (ShiftAddViT, EcoFormer): KSH hashing of queries and keys to
binary codes, packed codes, and linear attention computed from them with additions.

Layout of this module:

1. *Backend primitives* (``ksh_hash_fwd``, ``pack_codes``, ``binary_attention_fwd``, ...): the
   torch backend, written for clarity; float64 where the tests need it. The Triton backend
   (:mod:`effkern.triton.binary_hash`) and the CUDA backend (the two attention passes,
   ``csrc/binary_hash``) implement the same functions with the same signatures on contiguous,
   validated inputs.
2. *Public ops*: typed functions over ``torch.library`` custom ops with fake impls; the
   training path's backward runs the backward primitives (fused kernels), not autograd over
   torch code.

Definitions (the published models' semantics), per batch element and head:

* KSH hash: x [N, d] L2-normalised over d; D[n, j] = ||x_n - anchor_j||^2 for m anchors;
  sigma = mean(D) (over n and j, not detached); K = exp(-D / (2 sigma)) - mu; y = K proj^T,
  [N, b]. Codes: EcoFormer h = sign(y) in {-1, +1} (y <= 0 -> -1); ShiftAddViT h = 1[y > 0].
  Straight-through gradient: dL/dy = dL/dh where |y| < 1 ({-1, +1}) or 0 < y < 1 ({0, 1}).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from effkern._dispatch import op_dispatcher, triton_impl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)
FORMS = ("ecoformer", "shiftadd")
SIGNED = {"ecoformer": True, "shiftadd": False}  # code values {-1, +1} or {0, 1}
NORM_EPS = 1e-12  # x / max(||x||, eps) in the hash (a zero query stays zero)
SHIFTADD_EPS = 1e-12  # t / max(||t||, eps) in the shiftadd form
MAX_NBITS = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_words(nbits: int) -> int:
    """int32 words per packed code of ``nbits`` bits."""
    return (nbits + 31) // 32


# ============================================================================================
# 1. Backend primitives (torch backend)
# ============================================================================================


def ksh_hash_fwd(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """y [B, H, N, b] (float32; float64 for float64) of the KSH hash of x [B, H, N, d] with
    anchors [H, m, d], mu [H, m], proj [H, b, m]."""
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    a = anchors.to(acc)
    # ||x - a||^2 = ||x||^2 + ||a||^2 - 2 x.a, clamped at 0 against rounding
    dist = (xn.pow(2).sum(-1, keepdim=True) + a.pow(2).sum(-1)[None, :, None, :]
            - 2 * torch.einsum("bhnd,hmd->bhnm", xn, a)).clamp_min(0)
    sigma = dist.mean(dim=(-1, -2), keepdim=True)
    k = torch.exp(-dist / (2 * sigma)) - mu.to(acc)[None, :, None, :]
    return torch.einsum("bhnm,hkm->bhnk", k, proj.to(acc)).contiguous()


def ksh_hash_bwd(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """dL/dx for :func:`ksh_hash_fwd` (sigma's dependence on x included), in x's dtype.

    With E = exp(-D / (2 sigma)) and gK = grad_y proj: gD = -gK E / (2 sigma) + sum(gK E D) /
    (2 sigma^2 N m) (the second term through sigma = mean(D)); g_xn = 2 (sum_j gD) xn - 2 gD a;
    g_x = (g_xn - (g_xn . xn) xn) / ||x|| (the normalisation's Jacobian)."""
    acc = _acc_dtype(x.dtype)
    xf, a = x.to(acc), anchors.to(acc)
    nrm = xf.norm(dim=-1, keepdim=True)
    xn = xf / nrm.clamp_min(NORM_EPS)
    dist = (xn.pow(2).sum(-1, keepdim=True) + a.pow(2).sum(-1)[None, :, None, :]
            - 2 * torch.einsum("bhnd,hmd->bhnm", xn, a)).clamp_min(0)
    n, m = dist.shape[-2], dist.shape[-1]
    sigma = dist.mean(dim=(-1, -2), keepdim=True)
    e = torch.exp(-dist / (2 * sigma))
    g_k = torch.einsum("bhnk,hkm->bhnm", grad_y.to(acc), proj.to(acc))
    g_e = g_k * e
    g_dist = -g_e / (2 * sigma) + (g_e * dist).sum(dim=(-1, -2), keepdim=True) / (2 * sigma**2 * n * m)
    g_xn = 2 * g_dist.sum(-1, keepdim=True) * xn - 2 * torch.einsum("bhnm,hmd->bhnd", g_dist, a)
    projected = (g_xn - (g_xn * xn).sum(-1, keepdim=True) * xn) / nrm.clamp_min(NORM_EPS)
    g_x = torch.where(nrm > NORM_EPS, projected, g_xn / NORM_EPS)
    return g_x.to(x.dtype).contiguous()


def pack_codes(h: Tensor) -> Tensor:
    """int32 [..., ceil(b / 32)]: bit j of word j // 32 is 1[h[..., j] > 0]."""
    b = h.shape[-1]
    w = num_words(b)
    bits = torch.nn.functional.pad((h > 0).to(torch.int64), (0, 32 * w - b))
    words = (bits.reshape(*h.shape[:-1], w, 32) << torch.arange(32, device=h.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_codes(codes: Tensor, nbits: int, signed: bool, dtype: torch.dtype) -> Tensor:
    """[..., nbits] of {0, 1} ({-1, +1} when signed) from packed int32 codes."""
    shifts = torch.arange(32, device=codes.device, dtype=torch.int64)
    bits = (codes.to(torch.int64)[..., None] >> shifts) & 1
    bits = bits.reshape(*codes.shape[:-1], 32 * codes.shape[-1])[..., :nbits]
    return (2 * bits - 1 if signed else bits).to(dtype)


def _attention_parts(hq: Tensor, hk: Tensor, v: Tensor, form: str):
    """KV [B, H, b, d], ksum [B, H, b] and out [B, H, N, d] (accumulation dtype) from unpacked
    code values (float) and v."""
    acc = _acc_dtype(v.dtype)
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


def binary_attention_fwd(v: Tensor, q_codes: Tensor, k_codes: Tensor, nbits: int, form: str) -> Tensor:
    """out [B, H, N, d] in v's dtype from v [B, H, N, d] and packed codes [B, H, N, W] (v comes
    first: its dtype and device choose the backend)."""
    acc = _acc_dtype(v.dtype)
    signed = SIGNED[form]
    hq, hk = (unpack_codes(c, nbits, signed, acc) for c in (q_codes, k_codes))
    return _attention_parts(hq, hk, v, form)[2].to(v.dtype).contiguous()


def binary_attention_bwd(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                         form: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d h_q [B, H, N, b], d h_k [B, H, N, b] in the accumulation dtype, d v in v's dtype): the
    gradients with respect to the code values and v, recomputing KV and ksum.

    ecoformer, with den_n = h_q[n] . ksum + N c: g_num = g / den, g_den = -(g . out) / den;
    d h_q = g_num KV^T + g_den ksum; dKV = sum_n h_q[n] g_num[n]^T, dksum = sum_n h_q[n] g_den[n];
    d h_k = v dKV^T + dksum; dv = h_k dKV + c g_num. shiftadd, with t and out = t / ||t||:
    g_t = (g - (g . out) out) / ||t||; d h_q = g_t KV^T / pi; dKV = sum_n h_q[n] g_t[n]^T / pi;
    d h_k = v dKV^T; dv = h_k dKV + g_t / 2."""
    acc = _acc_dtype(v.dtype)
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
    return d_hq.contiguous(), d_hk.contiguous(), dv.to(v.dtype).contiguous()


# ============================================================================================
# 2. Argument checks
# ============================================================================================


def _check_float(op: str, name: str, t, dims: int, dtypes=TORCH_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}")


def _check_device(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}")


def _check_form(op: str, form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"{op}: form must be 'ecoformer' or 'shiftadd', got {form!r}")


def _check_nbits(op: str, nbits: int) -> None:
    if isinstance(nbits, bool) or not isinstance(nbits, int) or not 1 <= nbits <= MAX_NBITS:
        raise ValueError(f"{op}: nbits must be an integer in [1, {MAX_NBITS}], got {nbits!r}")


def _check_finite(op: str, **tensors: Tensor) -> None:
    """One host read for all the tensors: raise if any holds inf or NaN."""
    names = [n for n, t in tensors.items() if t.numel()]
    if not names:
        return
    flags = torch.stack([~torch.isfinite(tensors[n]).all() for n in names]).tolist()
    bad = [n for n, f in zip(names, flags) if f]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} must be finite, found inf or NaN")


def _check_hash_params(op: str, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> None:
    _check_float(op, "x", x, 4)
    _check_float(op, "anchors", anchors, 3)
    _check_float(op, "mu", mu, 2)
    _check_float(op, "proj", proj, 3)
    for name, t in (("anchors", anchors), ("mu", mu), ("proj", proj)):
        _check_device(op, name, t, x)
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


def _check_attention(op: str, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> None:
    _check_float(op, "v", v, 4)
    _check_nbits(op, nbits)
    _check_form(op, form)
    w = num_words(nbits)
    for name, c in (("q_codes", q_codes), ("k_codes", k_codes)):
        _check_float(op, name, c, 4, (torch.int32,))
        _check_device(op, name, c, v)
        if c.shape != v.shape[:3] + (w,):
            raise ValueError(f"{op}: {name} must be [B, H, N, ceil(nbits / 32)] = "
                             f"{tuple(v.shape[:3]) + (w,)} for v of shape {tuple(v.shape)} and "
                             f"nbits = {nbits}, got {tuple(c.shape)}")


def _check_code_padding(op: str, nbits: int, **codes: Tensor) -> None:
    """Bits beyond nbits must be zero (else the codes were packed for more bits): one host read."""
    if nbits % 32 == 0:
        return
    mask = -(1 << (nbits % 32))  # the unused high bits of the last word, as an int32 pattern
    flags = torch.stack([(c[..., -1] & mask).ne(0).any() for c in codes.values()]).tolist()
    bad = [n for n, f in zip(codes, flags) if f]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} have bits set beyond nbits = {nbits}: packed for "
                         f"more bits than nbits says?")


# ============================================================================================
# 3. Public ops
# ============================================================================================

# ---- ksh_hash ------------------------------------------------------------------------------

_hash_dispatch = op_dispatcher("ksh_hash", "fused KSH hash: normalise, RBF to anchors, centre, project")
_hash_dispatch.register("torch", ksh_hash_fwd, dtypes=TORCH_DTYPES)
_hash_dispatch.register("triton", triton_impl("ksh_hash", "ksh_hash_fwd"), dtypes=FLOAT_DTYPES)
_hash_bwd_dispatch = op_dispatcher("ksh_hash_backward", "gradient of ksh_hash")
_hash_bwd_dispatch.register("torch", ksh_hash_bwd, dtypes=TORCH_DTYPES)
_hash_bwd_dispatch.register("triton", triton_impl("ksh_hash", "ksh_hash_bwd"), dtypes=FLOAT_DTYPES)


@torch.library.custom_op("effkern::ksh_hash", mutates_args=())
def _ksh_hash_op(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, validate: bool) -> Tensor:
    _check_hash_params("ksh_hash", x, anchors, mu, proj)
    if validate:
        _check_finite("ksh_hash", x=x, anchors=anchors, mu=mu, proj=proj)
    return _hash_dispatch(x.contiguous(), anchors.contiguous(), mu.contiguous(), proj.contiguous())


@_ksh_hash_op.register_fake
def _(x, anchors, mu, proj, validate):
    _check_hash_params("ksh_hash", x, anchors, mu, proj)
    return x.new_empty(tuple(x.shape[:3]) + (proj.shape[1],), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("effkern::ksh_hash_backward", mutates_args=())
def _ksh_hash_backward_op(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    return _hash_bwd_dispatch(grad_y.contiguous(), x.contiguous(), anchors.contiguous(), mu.contiguous(),
                              proj.contiguous())


@_ksh_hash_backward_op.register_fake
def _(grad_y, x, anchors, mu, proj):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ksh_hash_setup(ctx, inputs, output):
    x, anchors, mu, proj, _ = inputs
    ctx.save_for_backward(x, anchors, mu, proj)


def _ksh_hash_backward(ctx, grad_y):
    x, anchors, mu, proj = ctx.saved_tensors
    return torch.ops.effkern.ksh_hash_backward(grad_y, x, anchors, mu, proj), None, None, None, None


_ksh_hash_op.register_autograd(_ksh_hash_backward, setup_context=_ksh_hash_setup)


def ksh_hash(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, *, validate: bool = True) -> Tensor:
    """KSH hash projections y of queries or keys (before the sign), fused.

    Args:
        x: ``[B, H, N, d]`` queries or keys (float16/bfloat16/float32; float64 on the torch
            backend).
        anchors: ``[H, m, d]``; mu: ``[H, m]``; proj: ``[H, b, m]`` (buffers, not trained).
        validate: check that every input is finite (one device sync).

    Returns ``y [B, H, N, b]`` in float32 (float64 for float64 x): x normalised over d,
    D = ||x - anchor||^2, sigma = mean(D) per sample and head, K = exp(-D / (2 sigma)) - mu,
    y = K proj^T. Differentiable in x (through sigma too).
    """
    return torch.ops.effkern.ksh_hash(x, anchors, mu, proj, validate)


# ---- pack_bits / unpack_bits ---------------------------------------------------------------

_pack_dispatch = op_dispatcher("pack_bits", "binary codes -> packed int32 words")
_pack_dispatch.register("torch", pack_codes, dtypes=TORCH_DTYPES + (torch.int8, torch.int32, torch.int64, torch.bool))
_pack_dispatch.register("triton", triton_impl("binary_hash", "pack_codes"), dtypes=FLOAT_DTYPES)


def _check_pack(h: Tensor) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"pack_bits: h must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() == 0 or not 1 <= h.shape[-1] <= MAX_NBITS:
        raise ValueError(f"pack_bits: h must be [..., b] with 1 <= b <= {MAX_NBITS}, got {tuple(h.shape)}")


@torch.library.custom_op("effkern::pack_bits", mutates_args=())
def _pack_bits_op(h: Tensor) -> Tensor:
    _check_pack(h)
    return _pack_dispatch(h.contiguous())


@_pack_bits_op.register_fake
def _(h):
    _check_pack(h)
    return h.new_empty(tuple(h.shape[:-1]) + (num_words(h.shape[-1]),), dtype=torch.int32)


def pack_bits(h: Tensor) -> Tensor:
    """Pack binary codes ``h [..., b]`` (an element counts as 1 when > 0) into int32 words
    ``[..., ceil(b / 32)]``: bit j of the code is bit j % 32 of word j // 32, least significant
    first; unused high bits are 0. Not differentiable."""
    return torch.ops.effkern.pack_bits(h)


def unpack_bits(codes: Tensor, b: int, *, signed: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., b]`` of {0, 1} (``signed``: {-1, +1}) in ``dtype``."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int32 or codes.dim() == 0:
        raise TypeError("unpack_bits: codes must be an int32 tensor [..., ceil(b / 32)]")
    _check_nbits("unpack_bits", b)
    if codes.shape[-1] != num_words(b):
        raise ValueError(f"unpack_bits: codes hold {codes.shape[-1]} words but b = {b} needs {num_words(b)}")
    return unpack_codes(codes, b, signed, dtype)


# ---- binary_attention (inference, packed codes) --------------------------------------------

_attn_dispatch = op_dispatcher("binary_attention", "linear attention from packed binary codes")
_attn_dispatch.register("torch", binary_attention_fwd, dtypes=TORCH_DTYPES)
_attn_dispatch.register("triton", triton_impl("binary_hash", "binary_attention_fwd"), dtypes=FLOAT_DTYPES)
CUDA_HEAD_DIMS = (32, 64, 128)  # the CUDA kernels are specialised on d


def _cuda_head_dim(v: Tensor, q_codes: Tensor, k_codes: Tensor, nbits: int, form: str) -> list[str]:
    return [] if v.shape[-1] in CUDA_HEAD_DIMS else [f"head dim d = {v.shape[-1]} is not one of {CUDA_HEAD_DIMS}"]


def _cuda_binary_attention(v, q_codes, k_codes, nbits, form):
    return torch.ops.effkern.cuda_binary_attention(v, q_codes, k_codes, nbits, FORMS.index(form))


_cuda_binary_attention.__name__ = "torch.ops.effkern.cuda_binary_attention"
_attn_dispatch.register("cuda", _cuda_binary_attention, dtypes=FLOAT_DTYPES, check=_cuda_head_dim)
_attn_bwd_dispatch = op_dispatcher("binary_attention_backward", "gradient of binary_attention")
_attn_bwd_dispatch.register("torch", binary_attention_bwd, dtypes=TORCH_DTYPES)
_attn_bwd_dispatch.register("triton", triton_impl("binary_hash", "binary_attention_bwd"), dtypes=FLOAT_DTYPES)


@torch.library.custom_op("effkern::binary_attention", mutates_args=())
def _binary_attention_op(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str,
                         validate: bool) -> Tensor:
    _check_attention("binary_attention", q_codes, k_codes, v, nbits, form)
    if validate:
        _check_finite("binary_attention", v=v)
        _check_code_padding("binary_attention", nbits, q_codes=q_codes, k_codes=k_codes)
    return _attn_dispatch(v.contiguous(), q_codes.contiguous(), k_codes.contiguous(), nbits, form)


@_binary_attention_op.register_fake
def _(q_codes, k_codes, v, nbits, form, validate):
    _check_attention("binary_attention", q_codes, k_codes, v, nbits, form)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _binary_attention_setup(ctx, inputs, output):
    q_codes, k_codes, v, nbits, form, _ = inputs
    ctx.save_for_backward(q_codes, k_codes, v)
    ctx.nbits, ctx.form = nbits, form


def _binary_attention_backward(ctx, grad_out):
    q_codes, k_codes, v = ctx.saved_tensors
    _, _, dv = torch.ops.effkern.binary_attention_backward(grad_out, q_codes, k_codes, v, ctx.nbits, ctx.form)
    return None, None, dv, None, None, None


def binary_attention(q_codes: Tensor, k_codes: Tensor, v: Tensor, *, nbits: int, form: str,
                     validate: bool = True) -> Tensor:
    """Linear attention from packed binary query/key codes (inference; not differentiable in
    the codes: use :func:`binary_hash_attention` to train).

    Args:
        q_codes, k_codes: int32 ``[B, H, N, ceil(nbits / 32)]`` from :func:`pack_bits`.
        v: ``[B, H, N, d]`` values, float16/bfloat16/float32 (float64 on the torch backend).
        nbits: code length b; form: ``"ecoformer"`` ({-1, +1} codes) or ``"shiftadd"`` ({0, 1}).
        validate: check v is finite and no code bit beyond nbits is set (one device sync).

    Returns ``[B, H, N, d]`` in v's dtype, accumulated in float32; see the module docstring for
    the two forms. Differentiable in v.
    """
    return torch.ops.effkern.binary_attention(q_codes, k_codes, v, nbits, form, validate)


# ---- the training path: hashes -> codes -> attention, straight-through -------------------

@torch.library.custom_op("effkern::binary_attention_backward", mutates_args=())
def _binary_attention_backward_op(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                                  form: str) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_bwd_dispatch(grad_out.contiguous(), q_codes.contiguous(), k_codes.contiguous(), v.contiguous(),
                              nbits, form)


@_binary_attention_backward_op.register_fake
def _(grad_out, q_codes, k_codes, v, nbits, form):
    code_shape = tuple(v.shape[:3]) + (nbits,)
    acc = _acc_dtype(v.dtype)
    return v.new_empty(code_shape, dtype=acc), v.new_empty(code_shape, dtype=acc), torch.empty_like(v)


_binary_attention_op.register_autograd(_binary_attention_backward, setup_context=_binary_attention_setup)


def _ste_mask(y: Tensor, form: str) -> Tensor:
    """Where the straight-through estimator passes the gradient of the code to y."""
    return (y.abs() < 1) if SIGNED[form] else ((y > 0) & (y < 1))


def _check_hashed_attention(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> None:
    op = "binary_hash_attention"
    _check_form(op, form)
    _check_float(op, "v", v, 4)
    for name, y in (("the query hashes", y_q), ("the key hashes", y_k)):
        _check_float(op, name, y, 4)
        _check_device(op, name, y, v)
    if y_q.shape != y_k.shape or y_q.shape[:3] != v.shape[:3] or not 1 <= y_q.shape[-1] <= MAX_NBITS:
        raise ValueError(f"{op}: the query and key hashes must both be [B, H, N, b] with 1 <= b <= {MAX_NBITS} and "
                         f"v [B, H, N, d], got {tuple(y_q.shape)}, {tuple(y_k.shape)} and {tuple(v.shape)}")


@torch.library.custom_op("effkern::hashed_attention", mutates_args=())
def _hashed_attention_op(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> Tensor:
    _check_hashed_attention(y_q, y_k, v, form)
    q_codes, k_codes = _pack_dispatch(y_q.contiguous()), _pack_dispatch(y_k.contiguous())
    return _attn_dispatch(v.contiguous(), q_codes, k_codes, y_q.shape[-1], form)


@_hashed_attention_op.register_fake
def _(y_q, y_k, v, form):
    _check_hashed_attention(y_q, y_k, v, form)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


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


_hashed_attention_op.register_autograd(_hashed_attention_backward, setup_context=_hashed_attention_setup)


@dataclass(frozen=True)
class KSHParams:
    """The buffers of a KSH hash: anchors [H, m, d], mu [H, m], proj [H, b, m]."""

    anchors: Tensor
    mu: Tensor
    proj: Tensor

    @property
    def nbits(self) -> int:
        return self.proj.shape[1]

    def __call__(self, x: Tensor, *, validate: bool = True) -> Tensor:
        return ksh_hash(x, self.anchors, self.mu, self.proj, validate=validate)


@dataclass(frozen=True)
class RandomProjection:
    """The random-projection hash: y = x R with a fixed Gaussian R [H, d, b] (no normalisation).
    A plain batched matmul, so it runs as one (cuBLAS) einsum."""

    weight: Tensor

    @property
    def nbits(self) -> int:
        return self.weight.shape[2]

    def __call__(self, x: Tensor, *, validate: bool = True) -> Tensor:
        if x.dim() != 4 or self.weight.dim() != 3 or self.weight.shape[:2] != (x.shape[1], x.shape[3]):
            raise ValueError(f"RandomProjection: x must be [B, H, N, d] and the projection [H, d, b], "
                             f"got {tuple(x.shape)} and {tuple(self.weight.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"RandomProjection: x is on {x.device} but the projection on {self.weight.device}")
        acc = _acc_dtype(x.dtype)
        return torch.einsum("bhnd,hdk->bhnk", x.to(acc), self.weight.to(acc))


def binary_hash_attention(q: Tensor, k: Tensor, v: Tensor, hash: KSHParams | RandomProjection, form: str,
                          *, validate: bool = True) -> Tensor:
    """The trainable path: hash q and k, binarise, attend; gradients to v and, through the
    straight-through estimator, to q and k.

    Args:
        q, k, v: ``[B, H, N, d]`` (float16/bfloat16/float32; float64 on the torch backend).
        hash: :class:`KSHParams` (KSH, both papers) or :class:`RandomProjection`.
        form: ``"ecoformer"`` (codes sign(y)) or ``"shiftadd"`` (codes 1[y > 0]).
        validate: check q, k, v are finite (one device sync).

    Returns ``[B, H, N, d]`` in v's dtype. The backward is fused kernels (the attention's
    backward primitive and the hash's), with dL/dy = dL/dh where |y| < 1 ({-1, +1} codes) or
    0 < y < 1 ({0, 1} codes).
    """
    _check_form("binary_hash_attention", form)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float("binary_hash_attention", name, t, 4)
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"binary_hash_attention: q and k must be [B, H, N, d] and v [B, H, N, d_v] with the "
                         f"same B, H, N, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if validate:
        _check_finite("binary_hash_attention", q=q, k=k, v=v)
    y_q, y_k = hash(q, validate=False), hash(k, validate=False)
    return torch.ops.effkern.hashed_attention(y_q, y_k, v, form)
