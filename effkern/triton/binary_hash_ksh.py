"""Triton backend of the KSH hash kernels of :mod:`effkern.ops.binary_hash` (section 1):
``ksh_hash_fwd``, ``ksh_hash_codes`` (the hash and pack_codes fused: the signs of y packed into
int32 words, y never written) and ``ksh_hash_bwd``, with the names and signatures of the torch
kernels.

Inputs: contiguous, already validated x [B, H, N, d] (fp16 / bf16 / fp32), anchors [H, m, d],
mu [H, m], proj [H, b, m] (any float dtype, loaded and converted to float32); everything is
computed in float32. Offsets are formed in int64 at the (b, h) / token-block level. No kernel
uses atomics: the reductions over all tokens of a (b, h) (sigma's sum of D, the backward's
sum(gK E D)) are written as per-token-block partial sums [B * H, token blocks], and each program
that needs the total sums its (b, h)'s partials itself, in a fixed order (deterministic, and no
torch launches between the kernels).

Kernels (one program per (b, h, block of BLOCK_N tokens); d is walked in chunks of BLOCK_D, the
m anchors are one BLOCK_M tile, the b bits are walked in chunks of BLOCK_B):

* ``_ksh_sigma_part_kernel``: per token block, the sum of D without forming D: sum_n sum_j D[n, j] =
  m sum_n ||xn||^2 + n sum_j ||a_j||^2 - 2 sum_n xn . (sum_j a_j) (the clamp of D at 0 only
  removes rounding, far below sigma's own rounding). One pass over x, no anchor distances.
  As in the torch primitive, each row of x is scaled by a power of two (exact) that follows its
  running maximum over the d chunks before anything is squared, so xn = x / max(||x||, eps)
  neither overflows (|x| near 1e20) nor underflows for any finite x.
* ``_ksh_hash_fwd_kernel``: D[n, j] = ||xn||^2 + ||a_j||^2 - 2 (xn . a_j), clamped at 0, once
  per tile; K = exp(-D / (2 sigma)) - mu, y = K proj^T; stores y, or (CODES) the packed sign
  bits of y, exactly the words pack_codes makes of the y the same kernel would store.
* ``_ksh_hash_bwd_sum_kernel``: gK = grad_y proj, partial sums of gK E D (E = exp(-D / 2 sigma)).
* ``_ksh_hash_bwd_kernel``: gD = -gK E / (2 sigma) + S / (2 sigma^2 N m) (S = sum gK E D),
  g_xn = 2 (sum_j gD) xn - 2 gD a, g_x = (g_xn - (g_xn . xn) xn) / ||x|| (g_xn / eps for a row
  of norm <= eps). (g_xn . xn) is formed from the x . a_j already at hand, so d is walked twice
  (dots, then the output chunks) and any d works.

Matrix products run on tensor cores in TF32 with the 3xTF32 split (:func:`_dot3`): each float32
operand is split into a TF32 head and a TF32 tail, and head*head + head*tail + tail*head is
accumulated in float32, about as accurate as a float32 product (plain TF32 is not: 11 bits). An
operand loaded from float16 / bfloat16 is exact in TF32 and not split. The splitting rounds in
software, so the interpreter computes the numbers a GPU does (up to summation order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import NORM_EPS, num_words

# Tokens per program, the largest d chunk, the largest chunk of the b bits (at least one
# 32-bit code word), the partial sums read per step when a program sums its (b, h)'s.
BLOCK_N = 64
MAX_BLOCK_D = 64
MAX_BLOCK_B = 64
SUM_CHUNK = 128
SIGMA_BLOCKS = 4  # token blocks per program of the sigma pass

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_NORM_EPS = tl.constexpr(NORM_EPS)
_SUM_CHUNK = tl.constexpr(SUM_CHUNK)


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


# --------------------------------------------------------------------------------------------
# Shared device helpers
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
def _tf32(v):
    """float32 v rounded to nearest-even TF32 (10 mantissa bits), as a float32."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + (((bits >> 13) & 1) + 0xFFF)) & -8192  # -8192 = 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot3(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, TC: tl.constexpr):
    """acc + a @ b (float32) on tensor cores, 3xTF32: a = ah + al, b = bh + bl with TF32 heads
    (rounded to nearest: |al| <= 2^-12 |a|) and TF32 tails (a - ah is exact in float32; its TF32
    rounding costs 2^-24 |a|); the al bl term (<= 2^-24 of the product) is dropped. An operand that is exact in TF32 (A_EXACT / B_EXACT:
    loaded from a 16-bit float) is not split. TC = False: one IEEE float32 dot (the kernels'
    former arithmetic, kept to measure the split against)."""
    if not TC:
        return tl.dot(a, b, acc, input_precision="ieee")
    if A_EXACT:
        ah = a
    else:
        ah = _tf32(a)
        acc = tl.dot(_tf32(a - ah), _tf32(b), acc, input_precision="tf32")
    if B_EXACT:
        bh = b
    else:
        bh = _tf32(b)
        acc = tl.dot(ah, _tf32(b - bh), acc, input_precision="tf32")
    return tl.dot(ah, bh, acc, input_precision="tf32")


@triton.jit
def _scale_rows(x, kx, sumsq):
    """One d chunk x [BLOCK_N, BLOCK_D] (float32) of rows scaled so far by 2^-kx with sums of
    squares sumsq: (xs = x * 2^-knew, knew, rescale = 2^(kx - knew) <= 1 for the partial sums so
    far, sumsq updated). knew follows the row maximum, so the squares neither overflow nor
    underflow."""
    knew = tl.maximum(kx, _row_exponent(tl.max(tl.abs(x), axis=1)))
    rescale = _exp2i(tl.maximum(kx - knew, -126))
    xs = x * _exp2i(-knew)[:, None]
    sumsq = sumsq * (rescale * rescale) + tl.sum(xs * xs, axis=1)
    return xs, knew, rescale, sumsq


@triton.jit
def _row_norms(sumsq, kx):
    """(||xn||^2, inv, big) of rows scaled by 2^-kx with sums of squares sumsq: xn = xs * inv =
    x / max(||x||, eps), big = ||x|| > eps (as effkern.ops.binary_hash.normalize_rows)."""
    ns = tl.sqrt_rn(sumsq)
    big = ns * _exp2i(kx) > _NORM_EPS  # ||x|| > eps (||x|| may be inf: still big)
    inv = tl.where(big, 1.0 / tl.where(ns > 0, ns, 1.0), _exp2i(kx) / _NORM_EPS)
    return sumsq * inv * inv, inv, big


@triton.jit
def _sum_parts(part_ptr, row, NBLK):
    """The sum of the NBLK partial sums of row ``row`` (int64), in a fixed order."""
    pp = tl.arange(0, _SUM_CHUNK)
    acc = tl.zeros([_SUM_CHUNK], tl.float32)
    for p0 in range(0, NBLK, _SUM_CHUNK):
        acc += tl.load(part_ptr + row * NBLK + p0 + pp, mask=p0 + pp < NBLK, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _sigma(part_ptr, bh, N, M, NBLK):
    """sigma = mean(D) of (b, h) ``bh`` from _ksh_sigma_part_kernel's partial sums (>= 0)."""
    return tl.maximum(_sum_parts(part_ptr, bh, NBLK), 0.0) / (N.to(tl.float32) * M.to(tl.float32))


@triton.jit
def _ksh_block_dist(x_ptr, a_ptr, x_base, a_base, n0, N, M, Dd,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, X_EXACT: tl.constexpr,
                    A_EXACT: tl.constexpr, TC: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK_N of one (b, h): (valid mask [BLOCK_N, BLOCK_M], ||xn||^2
    [BLOCK_N], xscale [BLOCK_N], inv [BLOCK_N], big [BLOCK_N], xs . a [BLOCK_N, BLOCK_M],
    D [BLOCK_N, BLOCK_M], 0 where masked), where xs = x * xscale is x scaled by a power of two
    (exact, following the row maximum over the d chunks; _scale_rows), xn = xs * inv.
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
        xs, kx_new, rescale, sumsq = _scale_rows(x, kx, sumsq)
        kx = kx_new
        a2 += tl.sum(at * at, axis=0)
        # a 16-bit x scaled by a power of two is still exact in TF32
        xa = _dot3(xs, at, xa * rescale[:, None], X_EXACT, A_EXACT, TC)
    xn2, inv, big = _row_norms(sumsq, kx)
    valid = n_mask[:, None] & j_mask[None, :]
    dist = xn2[:, None] + a2[None, :] - 2.0 * (xa * inv[:, None])
    dist = tl.where(valid, tl.maximum(dist, 0.0), 0.0)
    return valid, xn2, _exp2i(-kx), inv, big, xa, dist


@triton.jit
def _ksh_block_grad_k(gy_ptr, p_ptr, gy_base, p_base, n0, N, M, NB,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, G_EXACT: tl.constexpr,
                      P_EXACT: tl.constexpr, TC: tl.constexpr):
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
        gk = _dot3(gy, p, gk, G_EXACT, P_EXACT, TC)
    return gk


@triton.jit
def _ksh_sigma_part(x_ptr, a_ptr, part_ptr, bh, blk, H, N, M, Dd, NBLK,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[bh, blk] = the sum of D over token block blk of (b, h) bh and all anchors, in
    closed form (see _ksh_sigma_part_kernel)."""
    h = bh % H
    n0 = blk * BLOCK_N
    nl = tl.arange(0, BLOCK_N)
    jj = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    n_mask = n0 + nl < N
    j_mask = jj < M
    xrow = bh * N * Dd + n0.to(tl.int64) * Dd
    a_base = h * M * Dd
    kx = tl.full([BLOCK_N], -126, tl.int32)
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    xs_a = tl.zeros([BLOCK_N], tl.float32)  # xs . sum_j a_j
    a2 = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, Dd, BLOCK_D):
        d = d0 + dd
        d_mask = d < Dd
        x = tl.load(x_ptr + xrow + nl[:, None] * Dd + d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + a_base + jj[:, None] * Dd + d[None, :], mask=j_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        xs, kx_new, rescale, sumsq = _scale_rows(x, kx, sumsq)
        kx = kx_new
        a2 += tl.sum(a * a, axis=0)
        xs_a = xs_a * rescale + tl.sum(xs * tl.sum(a, axis=0)[None, :], axis=1)
    xn2, inv, _big = _row_norms(sumsq, kx)
    xn2 = tl.where(n_mask, xn2, 0.0)
    cross = tl.where(n_mask, xs_a * inv, 0.0)
    n_blk = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
    part = M.to(tl.float32) * tl.sum(xn2, axis=0) + n_blk * tl.sum(a2, axis=0) - 2.0 * tl.sum(cross, axis=0)
    tl.store(part_ptr + bh * NBLK + blk, part)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _ksh_sigma_part_kernel(x_ptr, a_ptr, part_ptr, H, N, M, Dd, NBLK,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCKS: tl.constexpr):
    """part[bh, blk] = sum of D over the block's tokens and all anchors, in closed form, for
    BLOCKS consecutive token blocks (the anchors, re-read per block, then come from L1)."""
    bh = tl.program_id(0).to(tl.int64)
    for sub in range(BLOCKS):
        blk = tl.program_id(1) * BLOCKS + sub
        if blk < NBLK:
            _ksh_sigma_part(x_ptr, a_ptr, part_ptr, bh, blk, H, N, M, Dd, NBLK, BLOCK_N, BLOCK_M, BLOCK_D)


@triton.jit
def _ksh_hash_fwd_kernel(x_ptr, a_ptr, mu_ptr, p_ptr, sig_ptr, out_ptr, H, N, M, Dd, NB, NBLK,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_B: tl.constexpr, X_EXACT: tl.constexpr, A_EXACT: tl.constexpr,
                         P_EXACT: tl.constexpr, CODES: tl.constexpr, TC: tl.constexpr):
    """y[b, h, n0:n0+BLOCK_N, :] = (exp(-D / (2 sigma)) - mu) proj^T, or (CODES) its packed
    sign bits codes[b, h, n0:n0+BLOCK_N, :] (bit k of word k // 32 is 1[y_k > 0])."""
    bh = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    h = bh % H
    inv2s = 0.5 / _sigma(sig_ptr, bh, N, M, NBLK)
    valid, _xn2, _xscale, _inv, _big, _xa, dist = _ksh_block_dist(x_ptr, a_ptr, bh * N * Dd, h * M * Dd, n0, N, M,
                                                                  Dd, BLOCK_N, BLOCK_M, BLOCK_D, X_EXACT, A_EXACT, TC)
    jj = tl.arange(0, BLOCK_M)
    j_mask = jj < M
    mu = tl.load(mu_ptr + h * M + jj, mask=j_mask, other=0.0).to(tl.float32)
    kmat = tl.where(valid, tl.exp(-dist * inv2s) - mu[None, :], 0.0)
    nl = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_B)
    n_mask = n0 + nl < N
    p_base = h * NB * M
    for k0 in range(0, NB, BLOCK_B):
        k = k0 + kk
        k_mask = k < NB
        # proj transposed: [BLOCK_M, BLOCK_B]
        pt = tl.load(p_ptr + p_base + k[None, :] * M + jj[:, None], mask=j_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)
        y = _dot3(kmat, pt, tl.zeros([BLOCK_N, BLOCK_B], tl.float32), False, P_EXACT, TC)
        if CODES:
            # BLOCK_B is a multiple of 32: the chunk's bits fill whole words; a sum of distinct
            # powers of two (bit 31 included, as int32) is their bitwise or.
            bits = tl.where((y > 0) & k_mask[None, :], 1, 0) << (kk % 32)[None, :]
            words = tl.sum(tl.reshape(bits, [BLOCK_N, BLOCK_B // 32, 32]), axis=2)
            nw = (NB + 31) // 32
            w = k0 // 32 + tl.arange(0, BLOCK_B // 32)
            tl.store(out_ptr + bh * N * nw + (n0 + nl[:, None]).to(tl.int64) * nw + w[None, :], words,
                     mask=n_mask[:, None] & (w < nw)[None, :])
        else:
            yrow = bh * N * NB + n0.to(tl.int64) * NB
            tl.store(out_ptr + yrow + nl[:, None] * NB + k[None, :], y, mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _ksh_hash_bwd_sum_kernel(gy_ptr, x_ptr, a_ptr, p_ptr, sig_ptr, part_ptr, H, N, M, Dd, NB, NBLK,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_B: tl.constexpr, X_EXACT: tl.constexpr, A_EXACT: tl.constexpr,
                             G_EXACT: tl.constexpr, P_EXACT: tl.constexpr, TC: tl.constexpr):
    """part[bh, blk] = sum over the block's tokens and all anchors of gK E D."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n0 = blk * BLOCK_N
    h = bh % H
    inv2s = 0.5 / _sigma(sig_ptr, bh, N, M, NBLK)
    valid, _xn2, _xscale, _inv, _big, _xa, dist = _ksh_block_dist(x_ptr, a_ptr, bh * N * Dd, h * M * Dd, n0, N, M,
                                                                  Dd, BLOCK_N, BLOCK_M, BLOCK_D, X_EXACT, A_EXACT, TC)
    gk = _ksh_block_grad_k(gy_ptr, p_ptr, bh * N * NB, h * NB * M, n0, N, M, NB, BLOCK_N, BLOCK_M, BLOCK_B, G_EXACT, P_EXACT,
                           TC)
    ged = tl.where(valid, gk * tl.exp(-dist * inv2s) * dist, 0.0)
    tl.store(part_ptr + bh * NBLK + blk, tl.sum(tl.sum(ged, axis=1), axis=0))


@triton.jit
def _ksh_hash_bwd_kernel(gy_ptr, x_ptr, a_ptr, p_ptr, sig_ptr, s_ptr, gx_ptr, H, N, M, Dd, NB, NBLK,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_B: tl.constexpr, X_EXACT: tl.constexpr, A_EXACT: tl.constexpr,
                         G_EXACT: tl.constexpr, P_EXACT: tl.constexpr, TC: tl.constexpr):
    """grad_x for the block's tokens; coef = S / (2 sigma^2 N m), S = sum(gK E D) from the
    partial sums s of _ksh_hash_bwd_sum_kernel."""
    bh = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    h = bh % H
    x_base = bh * N * Dd
    a_base = h * M * Dd
    sigma = _sigma(sig_ptr, bh, N, M, NBLK)
    inv2s = 0.5 / sigma
    coef = _sum_parts(s_ptr, bh, NBLK) / (2.0 * sigma * sigma * (N.to(tl.float32) * M.to(tl.float32)))
    valid, xn2, xscale, inv, big, xa, dist = _ksh_block_dist(x_ptr, a_ptr, x_base, a_base, n0, N, M, Dd,
                                                             BLOCK_N, BLOCK_M, BLOCK_D, X_EXACT, A_EXACT, TC)
    gk = _ksh_block_grad_k(gy_ptr, p_ptr, bh * N * NB, h * NB * M, n0, N, M, NB, BLOCK_N, BLOCK_M, BLOCK_B, G_EXACT, P_EXACT,
                           TC)
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
        ga = _dot3(gd, a, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), False, A_EXACT, TC)
        gxn = 2.0 * rs[:, None] * xn - 2.0 * ga
        # 1 / ||x|| = inv * xscale where big
        gx = tl.where(big[:, None], ((gxn - gdot[:, None] * xn) * inv[:, None]) * xscale[:, None], gxn / _NORM_EPS)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------


def _tf32_exact(t: Tensor) -> bool:
    """A 16-bit float (11 significant bits at most) is exact in TF32: _dot3 need not split it."""
    return t.dtype in (torch.float16, torch.bfloat16)


def _config(x: Tensor, anchors: Tensor, proj: Tensor) -> tuple[dict, int]:
    """(block sizes, exactness flags and launch options, number of token blocks)."""
    d, m, nb = x.shape[3], anchors.shape[1], proj.shape[1]
    block_m = _pow2(m)
    return ({"BLOCK_N": BLOCK_N, "BLOCK_M": block_m, "BLOCK_D": min(_pow2(d), MAX_BLOCK_D),
             "BLOCK_B": min(_pow2(nb, 32), MAX_BLOCK_B), "X_EXACT": _tf32_exact(x), "A_EXACT": _tf32_exact(anchors),
             "P_EXACT": _tf32_exact(proj), "num_warps": 8 if block_m >= 64 else 4},
            triton.cdiv(x.shape[2], BLOCK_N))


def _sigma_parts(x: Tensor, anchors: Tensor, cfg: dict, nblk: int) -> Tensor:
    """Per-token-block sums of D [B * H, token blocks] (the kernels sum them into sigma)."""
    bsz, h, n, d = x.shape
    part = torch.empty((bsz * h, nblk), device=x.device, dtype=torch.float32)
    grid = (bsz * h, triton.cdiv(nblk, SIGMA_BLOCKS))
    _ksh_sigma_part_kernel[grid](x, anchors, part, h, n, anchors.shape[1], d, nblk, BLOCK_N=cfg["BLOCK_N"],
                                 BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCKS=SIGMA_BLOCKS, num_warps=4)
    return part


def _hash(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor, codes: bool, tensor_cores: bool = True) -> Tensor:
    """y [B, H, N, b] float32, or (codes) its packed sign bits int32 [B, H, N, ceil(b / 32)]."""
    bsz, h, n, d = x.shape
    m, nb = anchors.shape[1], proj.shape[1]
    shape = (bsz, h, n, num_words(nb) if codes else nb)
    dtype = torch.int32 if codes else torch.float32
    if bsz * h * n * nb == 0:
        return torch.empty(shape, device=x.device, dtype=dtype)
    if m == 0:  # K is empty: y = 0 (and its codes 0)
        return torch.zeros(shape, device=x.device, dtype=dtype)
    cfg, nblk = _config(x, anchors, proj)
    part = _sigma_parts(x, anchors, cfg, nblk)
    out = torch.empty(shape, device=x.device, dtype=dtype)
    _ksh_hash_fwd_kernel[(bsz * h, nblk)](x, anchors, mu, proj, part, out, h, n, m, d, nb, nblk, **cfg,
                                          CODES=codes, TC=tensor_cores)
    return out


def ksh_hash_fwd(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """y [B, H, N, b] float32 of the KSH hash of x [B, H, N, d] with anchors [H, m, d], mu [H, m],
    proj [H, b, m] (see :func:`effkern.ops.binary_hash.ksh_hash_fwd`)."""
    return _hash(x, anchors, mu, proj, codes=False)


def ksh_hash_codes(x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """pack_codes(ksh_hash_fwd(...)) bit for bit, int32 [B, H, N, ceil(b / 32)], without
    writing y (see :func:`effkern.ops.binary_hash.ksh_hash_codes`)."""
    return _hash(x, anchors, mu, proj, codes=True)


def _hash_bwd(grad_y: Tensor, x: Tensor, anchors: Tensor, proj: Tensor, tensor_cores: bool = True) -> Tensor:
    bsz, h, n, d = x.shape
    m, nb = anchors.shape[1], proj.shape[1]
    if bsz * h * n * d == 0:
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if m == 0 or nb == 0:  # no path from x to y
        return torch.zeros(x.shape, device=x.device, dtype=x.dtype)
    cfg, nblk = _config(x, anchors, proj)
    part = _sigma_parts(x, anchors, cfg, nblk)
    s_part = torch.empty((bsz * h, nblk), device=x.device, dtype=torch.float32)
    grid = (bsz * h, nblk)
    cfg["G_EXACT"] = _tf32_exact(grad_y)
    _ksh_hash_bwd_sum_kernel[grid](grad_y, x, anchors, proj, part, s_part, h, n, m, d, nb, nblk, **cfg,
                                   TC=tensor_cores)
    gx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _ksh_hash_bwd_kernel[grid](grad_y, x, anchors, proj, part, s_part, gx, h, n, m, d, nb, nblk, **cfg,
                               TC=tensor_cores)
    return gx


def ksh_hash_bwd(grad_y: Tensor, x: Tensor, anchors: Tensor, mu: Tensor, proj: Tensor) -> Tensor:
    """dL/dx [B, H, N, d] in x's dtype for :func:`ksh_hash_fwd` (sigma's dependence on x
    included; see :func:`effkern.ops.binary_hash.ksh_hash_bwd`). mu does not enter."""
    return _hash_bwd(grad_y, x, anchors, proj)
