"""Triton backend of the KSH hash kernels of :mod:`effkern.ops.binary_hash` (section 1):
``ksh_hash_fwd`` and ``ksh_hash_bwd``, with the names and signatures of the torch kernels.

Inputs: contiguous, already validated x [B, H, N, d] (fp16 / bf16 / fp32), anchors [H, m, d],
mu [H, m], proj [H, b, m] (any float dtype, loaded and converted to float32); everything is
computed in float32. Offsets are formed in int64 at the (b, h) / token-block level. No kernel
uses atomics: the reductions over all tokens of a (b, h) (sigma = mean(D), and the backward's
sum(gK E D)) are written as per-token-block partial sums [B * H, token blocks] and summed by
torch in a fixed order, so results are deterministic.

Kernels (one program per (b, h, block of BLOCK_N tokens); d is walked in chunks of BLOCK_D, the
m anchors are one BLOCK_M tile, the b bits are walked in chunks of BLOCK_B):

* ``_ksh_dist_sum_kernel``: D[n, j] = ||xn||^2 + ||a_j||^2 - 2 (xn . a_j), clamped at 0 (the
  torch primitive's formula), summed over the block: sigma's partials. As in the torch
  primitive, each row of x is scaled by a power of two (exact) that follows its running
  maximum over the d chunks before anything is squared, so xn = x / max(||x||, eps) neither
  overflows (|x| near 1e20) nor underflows for any finite x.
* ``_ksh_hash_fwd_kernel``: recomputes D, K = exp(-D / (2 sigma)) - mu, y = K proj^T.
* ``_ksh_hash_bwd_sum_kernel``: gK = grad_y proj, partial sums of gK E D (E = exp(-D / 2 sigma)).
* ``_ksh_hash_bwd_kernel``: gD = -gK E / (2 sigma) + S / (2 sigma^2 N m) (S = sum gK E D),
  g_xn = 2 (sum_j gD) xn - 2 gD a, g_x = (g_xn - (g_xn . xn) xn) / ||x|| (g_xn / eps for a row
  of norm <= eps). (g_xn . xn) is formed from the x . a_j already at hand, so d is walked twice
  (dots, then the output chunks) and any d works.

The x . a dots are ``tl.dot`` in IEEE fp32 (shapes are small; tf32 would cost the precision the
distances need).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import NORM_EPS

# Tokens per program, the largest d chunk, the largest chunk of the b bits.
BLOCK_N = 64
MAX_BLOCK_D = 64
MAX_BLOCK_B = 64
NUM_WARPS = 4

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_NORM_EPS = tl.constexpr(NORM_EPS)


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


# --------------------------------------------------------------------------------------------
# Shared device helper
# --------------------------------------------------------------------------------------------


@triton.jit
def _exp2i(e):
    """2^e in float32 for int32 e in [-126, 127], exactly (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_exponent(a):
    """frexp's exponent k of a >= 0 (a * 2^-k in [0.5, 1)), clamped to [-126, 126] (zero and
    subnormal a give -126), so that 2^-k and 2^k are normal float32 numbers."""
    k = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    return tl.minimum(tl.maximum(k, -126), 126)


@triton.jit
def _ksh_block_dist(x_ptr, a_ptr, x_base, a_base, n0, N, M, Dd,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK_N of one (b, h): (valid mask [BLOCK_N, BLOCK_M], ||xn||^2
    [BLOCK_N], xscale [BLOCK_N], inv [BLOCK_N], big [BLOCK_N], xs . a [BLOCK_N, BLOCK_M],
    D [BLOCK_N, BLOCK_M], 0 where masked), where xs = x * xscale is x scaled by a power of two
    (exact) so that its squares neither overflow nor underflow, xn = xs * inv =
    x / max(||x||, eps) and big = ||x|| > eps (as effkern.ops.binary_hash.normalize_rows). The
    scale follows the row maximum over the d chunks, rescaling the partial sums when it grows.
    x_base / a_base are int64 element offsets of the (b, h) rows / the head's anchors; tile
    offsets are int32 from the block's first row."""
    nl = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    n_mask = n0 + nl < N
    j_mask = jj < M
    xrow = x_base + n0.to(tl.int64) * Dd
    kx = tl.full([BLOCK_N], -126, tl.int32)  # x is scaled by 2^-kx
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    a2 = tl.zeros([BLOCK_M], tl.float32)
    xa = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for d0 in range(0, Dd, BLOCK_D):
        d = d0 + dd
        d_mask = d < Dd
        x = tl.load(x_ptr + xrow + nl[:, None] * Dd + d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        # anchors transposed: [BLOCK_D, BLOCK_M]
        at = tl.load(a_ptr + a_base + jj[None, :] * Dd + d[:, None], mask=d_mask[:, None] & j_mask[None, :],
                     other=0.0).to(tl.float32)
        knew = tl.maximum(kx, _row_exponent(tl.max(tl.abs(x), axis=1)))
        rescale = _exp2i(tl.maximum(kx - knew, -126))  # <= 1: the partial sums so far, rescaled
        xs = x * _exp2i(-knew)[:, None]
        sumsq = sumsq * (rescale * rescale) + tl.sum(xs * xs, axis=1)
        a2 += tl.sum(at * at, axis=0)
        xa = xa * rescale[:, None] + tl.dot(xs, at, input_precision="ieee")
        kx = knew
    ns = tl.sqrt_rn(sumsq)
    big = ns * _exp2i(kx) > _NORM_EPS  # ||x|| > eps (||x|| may be inf: still big)
    inv = tl.where(big, 1.0 / tl.where(ns > 0, ns, 1.0), _exp2i(kx) / _NORM_EPS)
    xn2 = sumsq * inv * inv
    valid = n_mask[:, None] & j_mask[None, :]
    dist = xn2[:, None] + a2[None, :] - 2.0 * (xa * inv[:, None])
    dist = tl.where(valid, tl.maximum(dist, 0.0), 0.0)
    return valid, xn2, _exp2i(-kx), inv, big, xa, dist


@triton.jit
def _ksh_block_grad_k(gy_ptr, p_ptr, gy_base, p_base, n0, N, M, NB,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """gK = grad_y proj [BLOCK_N, BLOCK_M] for tokens n0 .. n0 + BLOCK_N (0 where masked)."""
    nl = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_B)
    n_mask = n0 + nl < N
    j_mask = jj < M
    gyrow = gy_base + n0.to(tl.int64) * NB
    gk = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, NB, BLOCK_B):
        k = k0 + kk
        k_mask = k < NB
        gy = tl.load(gy_ptr + gyrow + nl[:, None] * NB + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)
        p = tl.load(p_ptr + p_base + k[:, None] * M + jj[None, :], mask=k_mask[:, None] & j_mask[None, :],
                    other=0.0).to(tl.float32)
        gk += tl.dot(gy, p, input_precision="ieee")
    return gk


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _ksh_dist_sum_kernel(x_ptr, a_ptr, part_ptr, H, N, M, Dd, NBLK,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[bh, blk] = sum of D over the block's tokens and all anchors."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    h = bh % H
    n0 = blk * BLOCK_N
    _valid, _xn2, _xscale, _inv, _big, _xa, dist = _ksh_block_dist(x_ptr, a_ptr, bh * N * Dd, h * M * Dd, n0, N,
                                                                   M, Dd, BLOCK_N, BLOCK_M, BLOCK_D)
    tl.store(part_ptr + bh * NBLK + blk, tl.sum(tl.sum(dist, axis=1), axis=0))


@triton.jit
def _ksh_hash_fwd_kernel(x_ptr, a_ptr, mu_ptr, p_ptr, inv2s_ptr, y_ptr, H, N, M, Dd, NB,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """y[b, h, n0:n0+BLOCK_N, :] = (exp(-D * inv2s) - mu) proj^T, inv2s = 1 / (2 sigma)."""
    bh = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    h = bh % H
    valid, _xn2, _xscale, _inv, _big, _xa, dist = _ksh_block_dist(x_ptr, a_ptr, bh * N * Dd, h * M * Dd, n0, N, M,
                                                                  Dd, BLOCK_N, BLOCK_M, BLOCK_D)
    inv2s = tl.load(inv2s_ptr + bh)
    jj = tl.arange(0, BLOCK_M)
    j_mask = jj < M
    mu = tl.load(mu_ptr + h * M + jj, mask=j_mask, other=0.0).to(tl.float32)
    kmat = tl.where(valid, tl.exp(-dist * inv2s) - mu[None, :], 0.0)
    nl = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_B)
    n_mask = n0 + nl < N
    yrow = bh * N * NB + n0.to(tl.int64) * NB
    p_base = h * NB * M
    for k0 in range(0, NB, BLOCK_B):
        k = k0 + kk
        k_mask = k < NB
        # proj transposed: [BLOCK_M, BLOCK_B]
        pt = tl.load(p_ptr + p_base + k[None, :] * M + jj[:, None], mask=j_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)
        y = tl.dot(kmat, pt, input_precision="ieee")
        tl.store(y_ptr + yrow + nl[:, None] * NB + k[None, :], y, mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _ksh_hash_bwd_sum_kernel(gy_ptr, x_ptr, a_ptr, p_ptr, inv2s_ptr, part_ptr, H, N, M, Dd, NB, NBLK,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_B: tl.constexpr):
    """part[bh, blk] = sum over the block's tokens and all anchors of gK E D."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n0 = blk * BLOCK_N
    h = bh % H
    valid, _xn2, _xscale, _inv, _big, _xa, dist = _ksh_block_dist(x_ptr, a_ptr, bh * N * Dd, h * M * Dd, n0, N, M,
                                                                  Dd, BLOCK_N, BLOCK_M, BLOCK_D)
    inv2s = tl.load(inv2s_ptr + bh)
    gk = _ksh_block_grad_k(gy_ptr, p_ptr, bh * N * NB, h * NB * M, n0, N, M, NB, BLOCK_N, BLOCK_M, BLOCK_B)
    ged = tl.where(valid, gk * tl.exp(-dist * inv2s) * dist, 0.0)
    tl.store(part_ptr + bh * NBLK + blk, tl.sum(tl.sum(ged, axis=1), axis=0))


@triton.jit
def _ksh_hash_bwd_kernel(gy_ptr, x_ptr, a_ptr, p_ptr, inv2s_ptr, coef_ptr, gx_ptr, H, N, M, Dd, NB,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """grad_x for the block's tokens; coef = sum(gK E D) / (2 sigma^2 N m) per (b, h)."""
    bh = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    h = bh % H
    x_base = bh * N * Dd
    a_base = h * M * Dd
    valid, xn2, xscale, inv, big, xa, dist = _ksh_block_dist(x_ptr, a_ptr, x_base, a_base, n0, N, M, Dd,
                                                     BLOCK_N, BLOCK_M, BLOCK_D)
    inv2s = tl.load(inv2s_ptr + bh)
    coef = tl.load(coef_ptr + bh)
    gk = _ksh_block_grad_k(gy_ptr, p_ptr, bh * N * NB, h * NB * M, n0, N, M, NB, BLOCK_N, BLOCK_M, BLOCK_B)
    gd = tl.where(valid, coef - gk * tl.exp(-dist * inv2s) * inv2s, 0.0)
    rs = tl.sum(gd, axis=1)  # sum_j gD
    # g_xn . xn = 2 rs ||xn||^2 - 2 sum_j gD (xn . a_j), xn . a_j = inv (xs . a_j)
    gdot = 2.0 * rs * xn2 - 2.0 * inv * tl.sum(gd * xa, axis=1)
    nl = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    n_mask = n0 + nl < N
    j_mask = jj < M
    xrow = x_base + n0.to(tl.int64) * Dd
    for d0 in range(0, Dd, BLOCK_D):
        d = d0 + dd
        d_mask = d < Dd
        io_mask = n_mask[:, None] & d_mask[None, :]
        offs = xrow + nl[:, None] * Dd + d[None, :]
        xn = (tl.load(x_ptr + offs, mask=io_mask, other=0.0).to(tl.float32) * xscale[:, None]) * inv[:, None]
        a = tl.load(a_ptr + a_base + jj[:, None] * Dd + d[None, :], mask=j_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        gxn = 2.0 * rs[:, None] * xn - 2.0 * tl.dot(gd, a, input_precision="ieee")
        # 1 / ||x|| = inv * xscale where big
        gx = tl.where(big[:, None], ((gxn - gdot[:, None] * xn) * inv[:, None]) * xscale[:, None], gxn / _NORM_EPS)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------


def _blocks(x: Tensor, anchors: Tensor, proj: Tensor) -> dict:
    d, m, nb = x.shape[3], anchors.shape[1], proj.shape[1]
    return {"BLOCK_N": BLOCK_N, "BLOCK_M": _pow2(m), "BLOCK_D": min(_pow2(d), MAX_BLOCK_D),
            "BLOCK_B": min(_pow2(nb), MAX_BLOCK_B)}


def _sigma_parts(x: Tensor, anchors: Tensor, blocks: dict) -> tuple[Tensor, int]:
    """(sigma [B * H] float32, number of token blocks): the per-block sums of D, summed by torch."""
    bsz, h, n, d = x.shape
    m = anchors.shape[1]
    nblk = triton.cdiv(n, BLOCK_N)
    part = torch.empty((bsz * h, nblk), device=x.device, dtype=torch.float32)
    _ksh_dist_sum_kernel[(bsz * h, nblk)](x, anchors, part, h, n, m, d, nblk, BLOCK_N=blocks["BLOCK_N"],
                                          BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"],
                                          num_warps=NUM_WARPS)
    return part.sum(dim=1) / (n * m), nblk


def ksh_hash_fwd(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """y [B, H, N, b] float32 of the KSH hash of x [B, H, N, d] with anchors [H, m, d], mu [H, m],
    proj [H, b, m] (see :func:`effkern.ops.binary_hash.ksh_hash_fwd`)."""
    bsz, h, n, d = x.shape
    m, nb = anchors.shape[1], proj.shape[1]
    if bsz * h * n * nb == 0:
        return torch.empty((bsz, h, n, nb), device=x.device, dtype=torch.float32)
    if m == 0:  # K is empty: y = 0
        return torch.zeros((bsz, h, n, nb), device=x.device, dtype=torch.float32)
    blocks = _blocks(x, anchors, proj)
    sigma, nblk = _sigma_parts(x, anchors, blocks)
    inv2s = (0.5 / sigma).contiguous()
    y = torch.empty((bsz, h, n, nb), device=x.device, dtype=torch.float32)
    _ksh_hash_fwd_kernel[(bsz * h, nblk)](x, anchors, mu, proj, inv2s, y, h, n, m, d, nb, **blocks,
                                          num_warps=NUM_WARPS)
    return y


def ksh_hash_bwd(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """dL/dx [B, H, N, d] in x's dtype for :func:`ksh_hash_fwd` (sigma's dependence on x
    included; see :func:`effkern.ops.binary_hash.ksh_hash_bwd`). mu does not enter."""
    bsz, h, n, d = x.shape
    m, nb = anchors.shape[1], proj.shape[1]
    if bsz * h * n * d == 0:
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if m == 0 or nb == 0:  # no path from x to y
        return torch.zeros(x.shape, device=x.device, dtype=x.dtype)
    blocks = _blocks(x, anchors, proj)
    sigma, nblk = _sigma_parts(x, anchors, blocks)
    inv2s = (0.5 / sigma).contiguous()
    part = torch.empty((bsz * h, nblk), device=x.device, dtype=torch.float32)
    grid = (bsz * h, nblk)
    _ksh_hash_bwd_sum_kernel[grid](grad_y, x, anchors, proj, inv2s, part, h, n, m, d, nb, nblk, **blocks,
                                   num_warps=NUM_WARPS)
    coef = (part.sum(dim=1) / (2 * sigma * sigma * (n * m))).contiguous()
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _ksh_hash_bwd_kernel[grid](grad_y, x, anchors, proj, inv2s, coef, gx, h, n, m, d, nb, **blocks,
                               num_warps=NUM_WARPS)
    return gx
