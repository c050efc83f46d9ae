"""Triton backend of the attention-like primitives of the sparse token ops: CLS attention
(EViT / IdleViT token scores), DynamicViT's policy-masked softmax and ToMe's bipartite matching.

The host wrappers have the names and signatures of the torch primitives of
:mod:`effkern.ops.tokens` (section 1) and take contiguous, already validated fp16 / bf16 / fp32
tensors; everything is computed in float32. Empty inputs give empty outputs without a launch.
Offsets are formed in int64 (B * H * N * N can exceed 2^31). Block sizes are picked by shape,
without autotuning. No kernel uses atomics: every reduction across programs goes through a small
fp32 scratch buffer reduced in a fixed order, so results are deterministic.

Kernels.

* ``cls_attention_fwd``: memory-bound (k is read once; the single query makes nothing N x N).
  ``_cls_attention_fwd_chunk_kernel`` runs one program per (b, h, chunk of BLOCK_N keys) and
  writes the scaled logits [B, H, N] plus the chunk's softmax statistics (max, sum of exps) to
  scratch; splitting N as well as B * H keeps enough loads in flight at small B * H.
  ``_cls_attention_fwd_mean_kernel`` (one program per (b, block of n), all heads in one tile)
  merges each head's chunk statistics, normalises and sums the heads in a fixed-order reduction
  (the head-mean). The scratch costs 8 bytes per (b, h, n) against 2 * d (fp16) to 4 * d bytes
  of k.
* ``cls_attention_bwd``: the chunk kernel recomputes the logits (reading k once) and stores, per
  chunk and relative to the chunk max m_c, l_c = sum e_n, s_c = sum e_n g_n,
  U_c = sum e_n g_n k_n and V_c = sum e_n k_n (e_n = exp(logit_n - m_c)). With M, L, S the merged
  statistics, c = S / L = sum_n p_n g_n and dq = scale / (H L) * sum_c exp(m_c - M) (U_c - c V_c):
  k is not needed again. The finish kernel writes dk_n = scale * p_n (g_n - c) / H * q from the
  stored logits; its first chunk program also writes dq. Without softmax the chunk kernel writes
  dk directly (dlogit = g / H) and the finish kernel sums the U_c.
* ``masked_softmax_fwd`` / ``_bwd``: row kernels over the B * H * N rows of length N. A row of
  up to :data:`MAX_ROW_BLOCK` keys is held in registers (several short rows per program);
  longer rows are processed in chunks of MAX_ROW_BLOCK (online max and sums, then a second pass
  that writes), so any N works. The forward numbers rows in int32: B * H * N is limited to
  :data:`MAX_MASKED_SOFTMAX_ROWS` (about 2^31; the wrapper raises beyond). The backward's policy gradient is reduced over the rows of a program in
  registers and written per program to a [B, H * row blocks, N] buffer that torch sums. Its
  row-max term uses the closed form -sum_j dL/dA_j A_j = eps (S_g S_A / N - G_A) / z^2
  (G_A = sum g A, S_A = sum A, S_g = sum g, z = S_A + eps), exact algebra that avoids the
  cancellation of O(|g|) terms in the direct sum (the term itself is O(eps)). A row without
  weight (S_A = 0: all its logits -inf, or every kept key) is the uniform 1/N with zero logit
  gradients, as :func:`effkern.ops.tokens.masked_softmax` defines it; the row max of an all -inf
  row is taken as 0, and a zero denominator (eps = 0) is never divided by.
* ``tome_match``: ``_tome_row_scale_kernel`` first gives every metric row a power-of-two scale
  2^-e (its largest |x| = f 2^e, f in [0.5, 1)) and the inverse norm of the scaled row
  1 / max(||x 2^-e||, 1e-12 2^-e) (torch's clamp, scaled): exact scaling, so the scores equal
  the plain formula's wherever that does not overflow, and huge finite values (|x| ~ 1e20,
  whose squares overflow float32) still give cosines. Then one program per (b, block of
  a-rows) loops over blocks of b-rows, and for each over chunks of :data:`TOME_BLOCK_C` metric
  columns: ``tl.dot`` in IEEE fp32 (tf32 would reorder close scores) of the scaled rows; the
  cosine score is the dot times both inverse norms, then a running max and first argmax. The
  [ceil(N/2), N/2] score matrix never exists in memory. fp32 dots run on FMA units, which hold
  operand rows per thread: C chunks keep them from spilling.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import NORM_EPS
from effkern.triton.rows import rows_per_program

# Row kernels of masked_softmax: the longest row kept in registers in one pass (longer rows are
# chunked by this much), and the elements a program aims to own when it packs short rows.
MAX_ROW_BLOCK = 4096
ROW_TILE = 4096
# The forward numbers rows in int32 (row / batch / diagonal from a 32-bit division).
MAX_MASKED_SOFTMAX_ROWS = 2**31 - 1 - ROW_TILE
# cls_attention: elements of k per program ([BLOCK_N, BLOCK_D] tile), and the chunk
# statistics / partials merged per loop step (there are usually few chunks per head).
CLS_TILE = 4096
STAT_BLOCK = 16
# tome_match: the chunk of the metric width per tl.dot step.
TOME_BLOCK_C = 32

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_NORM_EPS = tl.constexpr(NORM_EPS)
_SCALE_EXP_LIMIT = tl.constexpr(125)  # effkern.ops.tokens.row_scale's clamp for float32
_NO_INDEX = tl.constexpr(2147483647)  # larger than any column index: "not a maximum"


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_max(m_ptr, base, NB, BLOCK_S: tl.constexpr):
    """max of the NB chunk maxima m_ptr[base:base + NB]."""
    s = tl.arange(0, BLOCK_S)
    acc = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, NB, BLOCK_S):
        acc = tl.maximum(acc, tl.load(m_ptr + base + s0 + s, mask=s0 + s < NB, other=float("-inf")))
    return tl.max(acc, axis=0)


@triton.jit
def _rescaled_sum(m_ptr, v_ptr, base, NB, mx, BLOCK_S: tl.constexpr):
    """sum_c v_c exp(m_c - mx): chunk sums taken relative to their own max m_c, merged."""
    s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, NB, BLOCK_S):
        mask = s0 + s < NB
        m = tl.load(m_ptr + base + s0 + s, mask=mask, other=float("-inf"))
        v = tl.load(v_ptr + base + s0 + s, mask=mask, other=0.0)
        acc += tl.where(mask, v * tl.exp(m - mx), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _safe_max(m):
    """A row max usable as an exp shift: 0 for rows that are all -inf (padding), avoiding
    -inf - -inf = NaN (the interpreter warns, and such rows are never stored)."""
    return tl.where(m == float("-inf"), 0.0, m)


# --------------------------------------------------------------------------------------------
# cls_attention
# --------------------------------------------------------------------------------------------


@triton.jit
def _cls_chunk_logits(q_ptr, k_ptr, bh, n0, N, D, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of head bh: (n, n_mask, tile offsets, tile mask, q [BLOCK_D],
    k [BLOCK_N, BLOCK_D], scaled logits [BLOCK_N]), fp32 and 0 where masked. Tile offsets are
    int32 from the chunk's first row (the int64 part is a scalar)."""
    nl = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    n = n0 + nl
    n_mask = n < N
    d_mask = dd < D
    tile = nl[:, None] * D + dd[None, :]
    tile_mask = n_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + bh * D + dd, mask=d_mask, other=0.0).to(tl.float32)
    kt = tl.load(k_ptr + (bh * N + n0) * D + tile, mask=tile_mask, other=0.0).to(tl.float32)
    logits = tl.sum(kt * q[None, :], axis=1) * scale
    return n, n_mask, tile, tile_mask, q, kt, logits


@triton.jit
def _cls_attention_fwd_chunk_kernel(q_ptr, k_ptr, logit_ptr, m_ptr, l_ptr, N, D, NB, scale,
                                    SOFTMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NB
    n, n_mask, _, _, _, _, logits = _cls_chunk_logits(
        q_ptr, k_ptr, bh, (pid % NB) * BLOCK_N, N, D, scale, BLOCK_N, BLOCK_D)
    tl.store(logit_ptr + bh * N + n, logits, mask=n_mask)
    if SOFTMAX:
        lm = tl.where(n_mask, logits, float("-inf"))
        m = tl.max(lm, axis=0)
        tl.store(m_ptr + pid, m)
        tl.store(l_ptr + pid, tl.sum(tl.exp(lm - m), axis=0))


@triton.jit
def _cls_attention_fwd_mean_kernel(logit_ptr, m_ptr, l_ptr, out_ptr, H, N, NB, NBN,
                                   SOFTMAX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_S: tl.constexpr):
    # One program per (b, block of n) holds every head: all loads are issued at once (a loop
    # over heads would chain H rounds of load latency), and the head sum is a fixed-order
    # reduction: deterministic.
    pid = tl.program_id(0)
    b = pid // NBN
    n = (pid % NBN) * BLOCK_N + tl.arange(0, BLOCK_N)
    hh = tl.arange(0, BLOCK_H)
    h_mask = hh < H
    bh = b.to(tl.int64) * H + hh
    mask = h_mask[:, None] & (n < N)[None, :]
    x = tl.load(logit_ptr + bh[:, None] * N + n[None, :], mask=mask, other=0.0)
    if SOFTMAX:
        # Merge each head's chunk statistics: M = max_c m_c, L = sum_c l_c exp(m_c - M).
        s = tl.arange(0, BLOCK_S)[None, :]
        stat = bh[:, None] * NB + s
        m_acc = tl.full([BLOCK_H, BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, NB, BLOCK_S):
            sm = h_mask[:, None] & (s0 + s < NB)
            m_acc = tl.maximum(m_acc, tl.load(m_ptr + stat + s0, mask=sm, other=float("-inf")))
        mx = _safe_max(tl.max(m_acc, axis=1))[:, None]
        l_acc = tl.zeros([BLOCK_H, BLOCK_S], tl.float32)
        for s0 in range(0, NB, BLOCK_S):
            sm = h_mask[:, None] & (s0 + s < NB)
            mc = tl.load(m_ptr + stat + s0, mask=sm, other=float("-inf"))
            l_acc += tl.load(l_ptr + stat + s0, mask=sm, other=0.0) * tl.exp(mc - mx)
        l = tl.where(h_mask[:, None], tl.sum(l_acc, axis=1)[:, None], 1.0)
        x = tl.where(mask, tl.exp(x - mx) / l, 0.0)
    tl.store(out_ptr + b.to(tl.int64) * N + n, tl.sum(x, axis=0) / H, mask=n < N)


@triton.jit
def _cls_attention_bwd_chunk_kernel(q_ptr, k_ptr, g_ptr, logit_ptr, m_ptr, l_ptr, s_ptr, u_ptr, v_ptr,
                                    dk_ptr, H, N, D, NB, scale,
                                    SOFTMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NB
    n0 = (pid % NB) * BLOCK_N
    n, n_mask, tile, tile_mask, q, kt, logits = _cls_chunk_logits(
        q_ptr, k_ptr, bh, n0, N, D, scale, BLOCK_N, BLOCK_D)
    g = tl.load(g_ptr + (bh // H) * N + n, mask=n_mask, other=0.0).to(tl.float32)
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    if SOFTMAX:
        tl.store(logit_ptr + bh * N + n, logits, mask=n_mask)
        lm = tl.where(n_mask, logits, float("-inf"))
        m = tl.max(lm, axis=0)
        e = tl.exp(lm - m)  # 0 on padding
        tl.store(m_ptr + pid, m)
        tl.store(l_ptr + pid, tl.sum(e, axis=0))
        tl.store(s_ptr + pid, tl.sum(e * g, axis=0))
        tl.store(u_ptr + pid * D + dd, tl.sum((e * g)[:, None] * kt, axis=0), mask=d_mask)
        tl.store(v_ptr + pid * D + dd, tl.sum(e[:, None] * kt, axis=0), mask=d_mask)
    else:
        dl = g / H  # dlogit is known here: write dk now, leave sum_n dl_n k_n for dq
        tl.store(dk_ptr + (bh * N + n0) * D + tile,
                 ((scale * dl)[:, None] * q[None, :]).to(dk_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(u_ptr + pid * D + dd, tl.sum(dl[:, None] * kt, axis=0), mask=d_mask)


@triton.jit
def _cls_attention_bwd_finish_kernel(q_ptr, g_ptr, logit_ptr, m_ptr, l_ptr, s_ptr, u_ptr, v_ptr,
                                     dq_ptr, dk_ptr, H, N, D, NB, scale,
                                     SOFTMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                     BLOCK_S: tl.constexpr):
    # Softmax: one program per (b, h, chunk), writing dk for the chunk; without softmax dk is
    # already written and there is one program per (b, h). The first chunk's program writes dq.
    pid = tl.program_id(0).to(tl.int64)
    bh = pid
    if SOFTMAX:
        bh = pid // NB
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    s = tl.arange(0, BLOCK_S)
    part = (bh * NB + s)[:, None] * D + dd[None, :]  # rows of the per-chunk U, V partials
    if SOFTMAX:
        mx = _chunk_max(m_ptr, bh * NB, NB, BLOCK_S)
        l = _rescaled_sum(m_ptr, l_ptr, bh * NB, NB, mx, BLOCK_S)
        c = _rescaled_sum(m_ptr, s_ptr, bh * NB, NB, mx, BLOCK_S) / l  # sum_n p_n g_n
        nb = pid % NB
        nl = tl.arange(0, BLOCK_N)
        n0 = nb * BLOCK_N
        n_mask = n0 + nl < N
        x = tl.load(logit_ptr + bh * N + n0 + nl, mask=n_mask, other=float("-inf"))
        g = tl.load(g_ptr + (bh // H) * N + n0 + nl, mask=n_mask, other=0.0).to(tl.float32)
        dl = tl.exp(x - mx) / l * (g - c) / H
        q = tl.load(q_ptr + bh * D + dd, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(dk_ptr + (bh * N + n0) * D + nl[:, None] * D + dd[None, :],
                 ((scale * dl)[:, None] * q[None, :]).to(dk_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & d_mask[None, :])
        if nb == 0:
            dq = tl.zeros([BLOCK_D], tl.float32)
            for s0 in range(0, NB, BLOCK_S):
                sm = s0 + s < NB
                w = tl.exp(tl.load(m_ptr + bh * NB + s0 + s, mask=sm, other=float("-inf")) - mx)
                um = sm[:, None] & d_mask[None, :]
                u = tl.load(u_ptr + part + s0 * D, mask=um, other=0.0)
                v = tl.load(v_ptr + part + s0 * D, mask=um, other=0.0)
                dq += tl.sum(w[:, None] * (u - c * v), axis=0)
            tl.store(dq_ptr + bh * D + dd, (dq * (scale / (H * l))).to(dq_ptr.dtype.element_ty), mask=d_mask)
    else:
        dq = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, NB, BLOCK_S):
            um = (s0 + s < NB)[:, None] & d_mask[None, :]
            dq += tl.sum(tl.load(u_ptr + part + s0 * D, mask=um, other=0.0), axis=0)
        tl.store(dq_ptr + bh * D + dd, (dq * scale).to(dq_ptr.dtype.element_ty), mask=d_mask)


# --------------------------------------------------------------------------------------------
# masked_softmax
# --------------------------------------------------------------------------------------------


@triton.jit
def _policy_gate(p_ptr, pbase, diag, c, mask):
    """G = policy[b, j] off the diagonal, 1 on it (0 where masked)."""
    pol = tl.load(p_ptr + pbase + c, mask=mask, other=0.0).to(tl.float32)
    return tl.where(c == diag, 1.0, pol)


@triton.jit
def _masked_softmax_out(big_a, sa, eps, eps_n, inv_n, row_mask):
    """(A + eps / N) / (S_A + eps), and 1/N for rows without weight (S_A = 0; see
    effkern.ops.tokens.masked_softmax). Padding rows and weightless rows divide by 1: no 0 / 0."""
    z = tl.where(row_mask & (sa + eps != 0), sa + eps, 1.0)
    return tl.where(sa == 0, inv_n, (big_a + eps_n) / z)


@triton.jit
def _masked_softmax_fwd_kernel(x_ptr, p_ptr, y_ptr, R, N, HN, eps, eps_n, inv_n,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    # ROWS rows of any (b, h) per program; row r belongs to batch r // (H N), query i = r % N.
    # Row numbers fit int32 (the host checks R < 2^31; int64 division would be a call per row);
    # offsets are int64.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * N
    pbase = (rows // HN).to(tl.int64)[:, None] * N
    diag = (rows % N)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        mask = row_mask & (cols < N)
        a = tl.load(x_ptr + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = _safe_max(tl.max(a, axis=1))[:, None]
        big_a = tl.exp(a - m) * _policy_gate(p_ptr, pbase, diag, cols, mask)
        sa = tl.sum(big_a, axis=1)[:, None]
        tl.store(y_ptr + base + cols, _masked_softmax_out(big_a, sa, eps, eps_n, inv_n, row_mask).to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        # Pass 1: online row max and sum of A (rescaled when the max grows).
        m_run = tl.full([ROWS, 1], float("-inf"), tl.float32)
        sa = tl.zeros([ROWS, 1], tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = row_mask & (c < N)
            a = tl.load(x_ptr + base + c, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_run, tl.max(a, axis=1)[:, None])
            ms = _safe_max(m_new)
            big_a = tl.exp(a - ms) * _policy_gate(p_ptr, pbase, diag, c, mask)
            sa = sa * tl.exp(m_run - ms) + tl.sum(big_a, axis=1)[:, None]
            m_run = m_new
        m = _safe_max(m_run)
        # Pass 2: recompute A and write.
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = row_mask & (c < N)
            a = tl.load(x_ptr + base + c, mask=mask, other=float("-inf")).to(tl.float32)
            big_a = tl.exp(a - m) * _policy_gate(p_ptr, pbase, diag, c, mask)
            tl.store(y_ptr + base + c, _masked_softmax_out(big_a, sa, eps, eps_n, inv_n, row_mask).to(y_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def _masked_softmax_row_terms(sa, ga, sg, eps, eps_n, row_mask):
    """From S_A = sum A, G_A = sum g A, S_g = sum g of a row: z; c = sum_j g_j out_j; and
    dL/dm = -sum_j dL/dA_j A_j in closed form (see the module docstring). Padding rows get
    z = 1 (with eps = 0 they would compute 0 / 0, and leak NaN into the policy gradient); a
    weightless row with eps = 0 (z = 0) gets z = inf: zero gradients, as the torch backend."""
    z = tl.where(row_mask, tl.where(sa + eps != 0, sa + eps, float("inf")), 1.0)
    c = (ga + eps_n * sg) / z
    d_max = (eps_n * sg * sa - eps * ga) / (z * z)
    return z, c, d_max


@triton.jit
def _masked_softmax_bwd_rows(g_ptr, x_ptr, p_ptr, dx_ptr, i, N, bh, pbase, eps, eps_n, cols,
                             BLOCK: tl.constexpr):
    """One-pass backward of the rows i ([ROWS, 1] query indices of head bh) held in registers;
    writes their logit gradients and returns their policy-gradient contribution per key [BLOCK]."""
    row_mask = i < N
    base = (bh.to(tl.int64) * N + i) * N
    mask = row_mask & (cols < N)
    a = tl.load(x_ptr + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
    g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    m = _safe_max(tl.max(a, axis=1))[:, None]
    s = tl.exp(a - m)  # 0 where masked
    big_a = s * _policy_gate(p_ptr, pbase, i, cols, mask)
    first_max = tl.min(tl.where(a == m, cols, _NO_INDEX), axis=1)[:, None]  # first argmax
    z, c, d_max = _masked_softmax_row_terms(tl.sum(big_a, axis=1)[:, None], tl.sum(g * big_a, axis=1)[:, None],
                                            tl.sum(g, axis=1)[:, None], eps, eps_n, row_mask)
    d_big_a = (g - c) / z
    d_x = d_big_a * big_a + tl.where(cols == first_max, d_max, 0.0)
    tl.store(dx_ptr + base + cols, d_x.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(tl.where(cols == i, 0.0, d_big_a * s), axis=0)


@triton.jit
def _masked_softmax_bwd_kernel(g_ptr, x_ptr, p_ptr, dx_ptr, dp_ptr, N, H, NRB, eps, eps_n,
                               BLOCK_I: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                               STEP_I: tl.constexpr = 1):
    # One program per (b, h, block of BLOCK_I query rows): its policy-gradient contribution is
    # summed over its rows in registers and written to dp[pid, :] (no atomics). The one-pass
    # path holds STEP_I rows at a time (the row layout of effkern.triton.rows), so that BLOCK_I
    # (and with it the size of dp) is independent of the layout.
    pid = tl.program_id(0)
    bh = pid // NRB
    i = (pid % NRB) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = (i < N)[:, None]
    base = (bh.to(tl.int64) * N + i)[:, None] * N
    pbase = (bh // H).to(tl.int64) * N
    diag = i[:, None]
    cols1 = tl.arange(0, BLOCK)
    cols = cols1[None, :]
    if ONE_PASS:
        i0 = (pid % NRB) * BLOCK_I
        d_pol = _masked_softmax_bwd_rows(g_ptr, x_ptr, p_ptr, dx_ptr, (i0 + tl.arange(0, STEP_I))[:, None], N, bh,
                                         pbase, eps, eps_n, cols, BLOCK)
        for step in range(STEP_I, BLOCK_I, STEP_I):
            d_pol += _masked_softmax_bwd_rows(g_ptr, x_ptr, p_ptr, dx_ptr, (i0 + step + tl.arange(0, STEP_I))[:, None],
                                              N, bh, pbase, eps, eps_n, cols, BLOCK)
        tl.store(dp_ptr + pid.to(tl.int64) * N + cols1, d_pol, mask=cols1 < N)
    else:
        # Pass 1: online max, its first index, and the sums (S_A, G_A rescaled as the max grows).
        m_run = tl.full([BLOCK_I, 1], float("-inf"), tl.float32)
        first_max = tl.zeros([BLOCK_I, 1], tl.int32)
        sa = tl.zeros([BLOCK_I, 1], tl.float32)
        ga = tl.zeros([BLOCK_I, 1], tl.float32)
        sg = tl.zeros([BLOCK_I, 1], tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = row_mask & (c < N)
            a = tl.load(x_ptr + base + c, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.load(g_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            cm = tl.max(a, axis=1)[:, None]
            ci = tl.min(tl.where(a == cm, c, _NO_INDEX), axis=1)[:, None]
            first_max = tl.where(cm > m_run, ci, first_max)  # strictly greater: keep the earlier
            m_new = tl.maximum(m_run, cm)
            ms = _safe_max(m_new)
            big_a = tl.exp(a - ms) * _policy_gate(p_ptr, pbase, diag, c, mask)
            rescale = tl.exp(m_run - ms)
            sa = sa * rescale + tl.sum(big_a, axis=1)[:, None]
            ga = ga * rescale + tl.sum(g * big_a, axis=1)[:, None]
            sg += tl.sum(g, axis=1)[:, None]
            m_run = m_new
        m = _safe_max(m_run)
        z, cc, d_max = _masked_softmax_row_terms(sa, ga, sg, eps, eps_n, row_mask)
        # Pass 2: gradients, chunk by chunk.
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = row_mask & (c < N)
            a = tl.load(x_ptr + base + c, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.load(g_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            s = tl.exp(a - m)
            big_a = s * _policy_gate(p_ptr, pbase, diag, c, mask)
            d_big_a = (g - cc) / z
            d_x = d_big_a * big_a + tl.where(c == first_max, d_max, 0.0)
            tl.store(dx_ptr + base + c, d_x.to(dx_ptr.dtype.element_ty), mask=mask)
            d_pol = tl.sum(tl.where(c == diag, 0.0, d_big_a * s), axis=0)
            tl.store(dp_ptr + pid.to(tl.int64) * N + start + cols1, d_pol, mask=start + cols1 < N)


# --------------------------------------------------------------------------------------------
# tome_match
# --------------------------------------------------------------------------------------------


@triton.jit
def _tome_row_scale_kernel(x_ptr, scale_ptr, inv_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per metric row: the power-of-two scale 2^-e (max |x| = f 2^e, f in [0.5, 1), e clamped to
    +-125; effkern.ops.tokens.row_scale) and 1 / max(||x 2^-e||, NORM_EPS 2^-e): the scaled row
    times it is x / max(||x||, NORM_EPS), without overflow for huge finite values."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < R)[:, None]
    base = rows.to(tl.int64)[:, None] * C
    cc = tl.arange(0, BLOCK_C)[None, :]
    mx = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v = tl.load(x_ptr + base + c0 + cc, mask=row_ok & (c0 + cc < C), other=0.0).to(tl.float32)
        mx = tl.maximum(mx, tl.max(tl.abs(v), axis=1))
    # frexp's exponent from the float32 bits (a zero or subnormal max clamps to -125)
    e = ((mx.to(tl.int32, bitcast=True) >> 23) & 255) - 126
    e = tl.minimum(tl.maximum(e, -_SCALE_EXP_LIMIT), _SCALE_EXP_LIMIT)
    scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
    sq = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v = tl.load(x_ptr + base + c0 + cc, mask=row_ok & (c0 + cc < C), other=0.0).to(tl.float32)
        v = v * scale[:, None]
        sq += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), scale * _NORM_EPS)  # tensor first: constexpr * tensor fails in triton 3.8's interpreter
    tl.store(scale_ptr + rows, scale, mask=rows < R)
    tl.store(inv_ptr + rows, inv, mask=rows < R)


@triton.jit
def _tome_match_kernel(x_ptr, scale_ptr, inv_ptr, max_ptr, idx_ptr, N, C, TA, TB, NAB,
                       CLASS_TOKEN: tl.constexpr, DISTILL_TOKEN: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    batch = (pid // NAB).to(tl.int64)
    xb = x_ptr + batch * N * C
    ia = (pid % NAB) * BLOCK_A + tl.arange(0, BLOCK_A)  # a-row t is metric row 2 t
    a_ok = ia < TA
    a_mask = a_ok[:, None]
    a_off = (2 * ia).to(tl.int64)[:, None] * C
    a_scale = tl.load(scale_ptr + batch * N + 2 * ia, mask=a_ok, other=0.0)[:, None]
    a_inv = tl.load(inv_ptr + batch * N + 2 * ia, mask=a_ok, other=0.0)
    jb0 = tl.arange(0, BLOCK_B)
    cc = tl.arange(0, BLOCK_C)[None, :]
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for j0 in range(0, TB, BLOCK_B):
        jb = j0 + jb0  # b-row t is metric row 2 t + 1
        b_ok = jb < TB
        b_mask = b_ok[:, None]
        b_off = (2 * jb + 1).to(tl.int64)[:, None] * C
        b_scale = tl.load(scale_ptr + batch * N + 2 * jb + 1, mask=b_ok, other=0.0)[:, None]
        b_inv = tl.load(inv_ptr + batch * N + 2 * jb + 1, mask=b_ok, other=0.0)
        # Dot products of the power-of-two-scaled rows in one sweep over C (the a-rows are
        # re-read from cache); register tiles over C keep the FMA dot from spilling.
        dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            a_c = tl.load(xb + a_off + c0 + cc, mask=a_mask & (c0 + cc < C), other=0.0).to(tl.float32) * a_scale
            b_c = tl.load(xb + b_off + c0 + cc, mask=b_mask & (c0 + cc < C), other=0.0).to(tl.float32) * b_scale
            dots = tl.dot(a_c, tl.trans(b_c), dots, input_precision="ieee")
        # Cosine similarity: the scaled dot times both inverse scaled norms (the same values as
        # normalising first, to a few ulp, for BLOCK_A + BLOCK_B divisions instead of a tile's).
        scores = dots * a_inv[:, None] * b_inv[None, :]
        scores = tl.where((jb < TB)[None, :], scores, float("-inf"))
        if DISTILL_TOKEN:  # nothing merges into the distillation token (b-row 0)
            scores = tl.where((jb == 0)[None, :], float("-inf"), scores)
        blk_max = tl.max(scores, axis=1)
        blk_idx = tl.min(tl.where(scores == blk_max[:, None], jb[None, :], _NO_INDEX), axis=1)
        better = blk_max > best  # strictly greater: an earlier block keeps its tie
        best_idx = tl.where(better, blk_idx, best_idx)
        best = tl.where(better, blk_max, best)
    if CLASS_TOKEN:
        best = tl.where(ia == 0, float("-inf"), best)
        best_idx = tl.where(ia == 0, 0, best_idx)
    out = (pid // NAB).to(tl.int64) * TA + ia
    tl.store(max_ptr + out, best, mask=ia < TA)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=ia < TA)


# --------------------------------------------------------------------------------------------
# Host wrappers (the signatures of effkern.ops.tokens' primitives)
# --------------------------------------------------------------------------------------------


def _cls_config(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, number of key chunks) for cls_attention."""
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, min(triton.next_power_of_2(n), CLS_TILE // block_d))
    return block_n, block_d, triton.cdiv(n, block_n)


def cls_attention_fwd(q: Tensor, k: Tensor, scale: float, softmax: bool) -> Tensor:
    """[B, N] float32: the head-mean of softmax_n(scale * q . k_n) (or of the scaled logits)."""
    b, h, n, d = k.shape
    out = torch.empty((b, n), dtype=torch.float32, device=k.device)
    if out.numel() == 0 or h == 0:
        return out.fill_(math.nan)  # h == 0: torch's mean over no heads (nothing to fill if empty)
    block_n, block_d, nb = _cls_config(n, d)
    logits = torch.empty((b, h, n), dtype=torch.float32, device=k.device)
    stats = torch.empty((2, b * h * nb), dtype=torch.float32, device=k.device)  # chunk max, sum
    _cls_attention_fwd_chunk_kernel[(b * h * nb,)](
        q, k, logits, stats[0], stats[1], n, d, nb, float(scale),
        SOFTMAX=bool(softmax), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    block_h = triton.next_power_of_2(h)
    block_m = max(16, min(triton.next_power_of_2(n), CLS_TILE // block_h))
    nbn = triton.cdiv(n, block_m)
    _cls_attention_fwd_mean_kernel[(b * nbn,)](
        logits, stats[0], stats[1], out, h, n, nb, nbn,
        SOFTMAX=bool(softmax), BLOCK_H=block_h, BLOCK_N=block_m, BLOCK_S=STAT_BLOCK, num_warps=4)
    return out


def cls_attention_bwd(grad: Tensor, q: Tensor, k: Tensor, scale: float, softmax: bool) -> tuple[Tensor, Tensor]:
    """(dq, dk) for :func:`cls_attention_fwd`, recomputing the probabilities."""
    b, h, n, d = k.shape
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if dk.numel() == 0:
        # N = 0 (and only then) leaves a non-empty dq: the sum over no keys.
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_n, block_d, nb = _cls_config(n, d)
    chunks = b * h * nb
    logits = torch.empty((b, h, n) if softmax else (1,), dtype=torch.float32, device=k.device)
    stats = torch.empty((3, chunks) if softmax else (3, 1), dtype=torch.float32, device=k.device)
    uv = torch.empty((2 if softmax else 1, chunks, d), dtype=torch.float32, device=k.device)
    v = uv[1] if softmax else uv[0]
    args = (logits, stats[0], stats[1], stats[2], uv[0], v)
    consts = {"SOFTMAX": bool(softmax), "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 4}
    _cls_attention_bwd_chunk_kernel[(chunks,)](q, k, grad, *args, dk, h, n, d, nb, float(scale), **consts)
    _cls_attention_bwd_finish_kernel[(chunks if softmax else b * h,)](
        q, grad, *args, dq, dk, h, n, d, nb, float(scale), BLOCK_S=STAT_BLOCK, **consts)
    return dq, dk


def _row_config(n: int, block: int | None) -> tuple[int, bool]:
    """(BLOCK, ONE_PASS) for masked_softmax rows of length n (``block`` forces a chunk size)."""
    if block is None:
        block = min(MAX_ROW_BLOCK, max(16, triton.next_power_of_2(n)))
    return block, n <= block


def masked_softmax_fwd(logits: Tensor, policy: Tensor, eps: float, *, block: int | None = None) -> Tensor:
    """DynamicViT's softmax_with_policy on [B, H, N, N] logits, returned in the input dtype.
    ``block`` (a power of two >= 16) forces the chunk length; tests use it to reach the chunked
    path on short rows."""
    b, h, n, _ = logits.shape
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.numel() == 0:
        return out
    policy = policy if policy.dtype in (torch.float16, torch.bfloat16, torch.float32) else policy.float()
    block, one_pass = _row_config(n, block)
    r = b * h * n
    if r > MAX_MASKED_SOFTMAX_ROWS:
        raise ValueError(f"masked_softmax: B * H * N = {r} rows exceed {MAX_MASKED_SOFTMAX_ROWS} (int32 row numbers)")
    rows, warps = rows_per_program(r, n, block, logits.element_size(), ROW_TILE)
    _masked_softmax_fwd_kernel[(triton.cdiv(r, rows),)](
        logits, policy, out, r, n, h * n, float(eps), float(eps) / n, 1.0 / n,
        ROWS=rows, BLOCK=block, ONE_PASS=one_pass, num_warps=warps)
    return out


def masked_softmax_bwd(grad: Tensor, logits: Tensor, policy: Tensor, eps: float, *,
                       block: int | None = None) -> tuple[Tensor, Tensor]:
    """(d logits, d policy) of :func:`masked_softmax_fwd`; the row max's gradient goes to the
    first maximal key. ``block`` as for the forward."""
    b, h, n, _ = logits.shape
    d_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if d_logits.numel() == 0:
        return d_logits, torch.zeros(policy.shape, dtype=policy.dtype, device=policy.device)
    pol = policy if policy.dtype in (torch.float16, torch.bfloat16, torch.float32) else policy.float()
    block, one_pass = _row_config(n, block)
    # BLOCK_I rows per program (their policy gradients summed in registers: dp has B * H * N / BLOCK_I
    # rows), held STEP_I at a time in the row layout of rows_per_program.
    block_i = max(1, min(ROW_TILE // block, triton.next_power_of_2(n)))
    step_i, warps = rows_per_program(block_i, n, block, logits.element_size(), ROW_TILE)
    nrb = triton.cdiv(n, block_i)
    partial = torch.empty((b, h * nrb, n), dtype=torch.float32, device=logits.device)
    _masked_softmax_bwd_kernel[(b * h * nrb,)](
        grad, logits, pol, d_logits, partial, n, h, nrb, float(eps), float(eps) / n,
        BLOCK_I=block_i, BLOCK=block, ONE_PASS=one_pass, STEP_I=step_i, num_warps=warps)
    return d_logits, partial.sum(1).to(policy.dtype)


def tome_match(metric: Tensor, class_token: bool, distill_token: bool = False) -> tuple[Tensor, Tensor]:
    """ToMe's scores of L2-normalised even rows (a) against odd rows (b) of metric [B, N, C]:
    (node_max [B, ceil(N/2)] float32, node_idx int64) = max and first argmax over b, the CLS
    a-row at -inf when class_token, the distillation token's b column (0) at -inf when
    distill_token. Needs N >= 2."""
    b, n, c = metric.shape
    ta, tb = (n + 1) // 2, n // 2
    node_max = torch.empty((b, ta), dtype=torch.float32, device=metric.device)
    node_idx = torch.empty((b, ta), dtype=torch.int64, device=metric.device)
    if node_max.numel() == 0:
        return node_max, node_idx
    # fp32 tl.dot runs on FMA units and holds operand rows per thread: checked on sm_90, these
    # tiles do not spill (a whole 64-wide fp16 row per tile does).
    block_c = min(TOME_BLOCK_C, max(16, triton.next_power_of_2(c)))
    block_a = min(32, max(16, triton.next_power_of_2(ta)))
    block_b = min(64, max(16, triton.next_power_of_2(tb)))
    nab = triton.cdiv(ta, block_a)
    rows = b * n
    norms = torch.empty((2, rows), dtype=torch.float32, device=metric.device)  # row scale, inverse norm
    block_r = min(64, triton.next_power_of_2(rows))
    _tome_row_scale_kernel[(triton.cdiv(rows, block_r),)](
        metric, norms[0], norms[1], rows, c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    _tome_match_kernel[(b * nab,)](
        metric, norms[0], norms[1], node_max, node_idx, n, c, ta, tb, nab,
        CLASS_TOKEN=bool(class_token), DISTILL_TOKEN=bool(distill_token), BLOCK_A=block_a, BLOCK_B=block_b,
        BLOCK_C=block_c,
        num_warps=4)  # 8 warps at 32 x 64: triton 3.8 (torch 2.14's) spills one register, 3.9 not
    return node_max, node_idx
