"""Triton backend of the binary-hash attention kernels of :mod:`effkern.ops.binary_hash`:
``pack_codes``, ``binary_attention_fwd``, ``binary_attention_bwd`` and ``hashed_attention_fwd``.

The host wrappers have the names and signatures of the torch primitives and take contiguous,
already validated inputs: v (and grad_out) float16 / bfloat16 / float32, codes int32
[B, H, N, ceil(nbits / 32)]. Everything is accumulated in float32. Offsets are int64. No
atomics: reductions across programs go through fp32 scratch summed in a fixed order, so
results are deterministic.

The codes are never unpacked to memory: a kernel loads, for a tile of tokens and a block of
BLOCK_K bits (BLOCK_K = 16 or 32, inside one 32-bit word), one word per token and extracts the
bits in registers; the code values ({-1, +1} for "ecoformer", {0, 1} for "shiftadd") are exact
in any 16-bit float.

Matrix products run on tensor cores with float32 accuracy (``_dot``): a product of two 16-bit
tiles (the codes, a bf16 / fp16 input) is exact in the fp32 accumulator; an fp32 operand (KV,
the gradients, fp32 v) is split exactly into three bfloat16 pieces (``_split3``) and every
piece product, exact too, is summed in fp32. ``TENSOR_CORES = False`` gives the former FP32-core
products (``input_precision="ieee"``), kept as the accuracy reference of the tests.

Kernels.

* ``_codes_outer_partial_kernel``: one program per (b * h, chunk of tokens, block of bits)
  sums h[n, k] x[n, :] (and h[n, k] w[n], or h[n, k] when there is no w) over its chunk:
  KV / ksum in the forward (x = v), dKV / dksum in the backward (x = the per-token gradient
  G, w = the denominator gradient), into one row per (b * h, chunk): KV [nbits, d] then ksum
  [nbits]. Splitting N into chunks fills the GPU at small B * H.
* ``_chunk_sum_kernel``: the deterministic second stage, summing the chunk rows in order, run
  only when there are more than FOLD_CHUNKS chunks; with fewer, the consumers below sum the
  chunk rows themselves, in the same order (the same bits, one launch fewer).
* ``_attention_fwd_kernel``: one program per (b * h, block of query tokens): num = h_q . KV
  and den = h_q . ksum over blocks of bits, then the form's output.
* ``_attention_bwd_query_kernel``: recomputes num / den (or t) per query token and writes
  G (= g / den for ecoformer, g_t / pi for shiftadd), the denominator gradient
  g_den = -(g . out) / den (ecoformer) and d h_q = G KV^T (+ g_den ksum).
* ``_attention_bwd_key_kernel``: one program per (b * h, block of tokens): d h_k = v dKV^T
  (+ dksum) and dv = h_k dKV + c G (ecoformer) or (pi / 2) G (shiftadd, = g_t / 2).
* ``_pack_codes_kernel``: one program per (block of rows, word): 32 comparisons, shifted and
  summed into an int32 word (two's complement).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from effkern._common import num_words
from effkern.triton.mma import mma16

# Programs the chunked reductions aim for (enough to fill an H100's 132 SMs several times).
# Under Triton's interpreter every program costs milliseconds of Python: few there (still
# several chunks at B * H = 1 and N >= 128, so the two-stage sum is exercised).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FILL_PROGRAMS = 4 if _INTERPRET else 528
# Tokens per step of the chunked reductions.
REDUCE_BLOCK_N = 32
# Up to this many chunks, the kernels that read KV sum the chunk rows themselves (no chunk-sum
# launch: at N = 785 and B * H = 384 a forward is two launches); beyond, one chunk-sum launch.
FOLD_CHUNKS = 4
# Elements per program of the chunk sum.
SUM_BLOCK = 1024
# Rows per program of pack_codes.
PACK_BLOCK_R = 64
# Products on tensor cores (False: on FP32 cores, input_precision="ieee": the tests' reference).
TENSOR_CORES = True

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_SHIFTADD_EPS = tl.constexpr(1e-12)  # effkern.ops.binary_hash.SHIFTADD_EPS (tests check they agree)
_PI = tl.constexpr(math.pi)
_HALF_PI = tl.constexpr(math.pi / 2)
_RADIX = tl.constexpr(256.0)  # 2^8: the scale between consecutive bfloat16 pieces of _split3
_INV_RADIX = tl.constexpr(1.0 / 256.0)


# --------------------------------------------------------------------------------------------
# Device helpers: exact products on tensor cores
# --------------------------------------------------------------------------------------------


@triton.jit
def _bf16_trunc(x):
    """fp32 x with its low 16 bits cleared: x rounded toward zero to a bfloat16 value (as fp32).
    Toward zero, not to nearest: the largest fp32 values cannot round up to infinity."""
    return (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits(x):
    """The bfloat16 tile of fp32 x that holds a bfloat16 value (low 16 bits zero), taken by its
    bits: exact for subnormals too (the interpreter's float conversion flushes those)."""
    return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _split3(x):
    """bfloat16 tiles (p0, p1, p2) with x = p0 + p1 2^-8 + p2 2^-16 exactly, for every finite
    fp32 x, subnormals included: p0 holds x's top 8 significant bits, p1 and p2 the next 8 each,
    scaled up by 2^8 per piece. Every step is exact: x - p0 only clears x's top bits, * 2^8 is a
    shift; a scaled remainder is below 2 |x| with at most 16 bits (no overflow) and its lowest bit
    is no finer than 2^-133, bfloat16's subnormal step (p2 fits)."""
    p0 = _bf16_trunc(x)
    r = (x - p0) * _RADIX
    p1 = _bf16_trunc(r)
    p2 = (r - p1) * _RADIX
    return _bf16_bits(p0), _bf16_bits(p1), _bf16_bits(p2)


@triton.jit
def _dot(a, b, acc, TC: tl.constexpr):
    """acc + a @ b with float32 accuracy; b is fp32 or has a's 16-bit dtype.

    With TC (tensor cores) every product is exact: two 16-bit tiles of one dtype directly;
    otherwise each fp32 / fp16 operand as its exact bfloat16 pieces (_split3; a bf16 a is its
    own single piece) and every piece product, summed in fp32 from the smallest scale up
    (Horner in 2^-8) into the block's sum, which is then added to acc. Without TC: FP32 cores."""
    if not TC:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        t = tl.zeros(acc.shape, dtype=tl.float32)
        if a.dtype == b.dtype and a.dtype != tl.float32:
            t = mma16(a, b, t)
        else:
            b0, b1, b2 = _split3(b.to(tl.float32))
            if a.dtype == tl.bfloat16:
                t = mma16(a, b2, t)
                t = mma16(a, b1, t * _INV_RADIX)
                t = mma16(a, b0, t * _INV_RADIX)
            else:
                # a2 is 0 for fp16 a (11 significant bits): its products are left out.
                a0, a1, a2 = _split3(a.to(tl.float32))
                if a.dtype == tl.float32:
                    t = mma16(a2, b2, t)
                t = mma16(a1, b2, t * _INV_RADIX)
                if a.dtype == tl.float32:
                    t = mma16(a2, b1, t)
                t = mma16(a1, b1, mma16(a0, b2, t * _INV_RADIX))
                if a.dtype == tl.float32:
                    t = mma16(a2, b0, t)
                t = mma16(a1, b0, mma16(a0, b1, t * _INV_RADIX))
                t = mma16(a0, b0, t * _INV_RADIX)
        acc += t
    return acc


@triton.jit
def _dot_codes(h, x, acc, TC: tl.constexpr):
    """acc + h @ x for a tile h of code values (exact in any 16-bit float): one product in x's
    dtype for 16-bit x, three (x's bfloat16 pieces) for fp32 x."""
    if x.dtype == tl.float32:
        hc = h.to(tl.bfloat16)
    else:
        hc = h.to(x.dtype)
    return _dot(hc, x, acc, TC)


# --------------------------------------------------------------------------------------------
# Device helpers: codes and KV
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_code_values(codes_ptr, base, n, n_mask, k0, W, NBITS, SIGNED: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32 code values of tokens n and bits k0 + [0, BLOCK_K) ({-1, +1} when
    SIGNED, else {0, 1}; 0 for tokens outside n_mask and bits from NBITS on). The bits lie in one
    word (k0 is a multiple of BLOCK_K, which divides 32): one word per token is loaded (a
    contiguous vector for W = 1). base: int64 offset of the (b, h) codes; n: int64."""
    word = tl.load(codes_ptr + base + n * W + k0 // 32, mask=n_mask, other=0)
    j = tl.arange(0, BLOCK_K)
    bit = ((word[:, None] >> (k0 % 32 + j)[None, :]) & 1).to(tl.float32)
    if SIGNED:
        bit = 2.0 * bit - 1.0
    return tl.where(n_mask[:, None] & (k0 + j < NBITS)[None, :], bit, 0.0)


@triton.jit
def _load_kv(kv_ptr, bh, k0, dd, d_mask, D, NBITS, NC, L, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(KV [BLOCK_K, BLOCK_D], ksum [BLOCK_K]) of bits k0 + [0, BLOCK_K) for (b, h) = bh from its
    NC chunk rows in kv_ptr ([BH, NC, L] fp32: KV [NBITS, D] then ksum [NBITS], padded to L),
    summed in chunk order as _chunk_sum_kernel does (NC = 1 once it has run)."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_mask = k < NBITS
    kv = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    ks = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c in range(NC):
        row = kv_ptr + (bh * NC + c) * L
        kv += tl.load(row + k[:, None] * D + dd[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        ks += tl.load(row + NBITS * D + k, mask=k_mask, other=0.0)
    return kv, ks


@triton.jit
def _query_num_den(q_codes_ptr, kv_ptr, bh, n, n_mask, dd, d_mask, N, D, W, NBITS, NC, L,
                   SIGNED: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """(num [BLOCK_M, BLOCK_D] = h_q . KV, den0 [BLOCK_M] = h_q . ksum) for tokens n."""
    num = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, NBITS, BLOCK_K):
        h = _load_code_values(q_codes_ptr, bh * N * W, n, n_mask, k0, W, NBITS, SIGNED, BLOCK_K)
        kv, ks = _load_kv(kv_ptr, bh, k0, dd, d_mask, D, NBITS, NC, L, BLOCK_K, BLOCK_D)
        num = _dot_codes(h, kv, num, TC)
        den += tl.sum(h * ks[None, :], axis=1)
    return num, den


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _codes_outer_partial_kernel(codes_ptr, x_ptr, w_ptr, part_ptr, N, D, W, NBITS, CHUNK, L,
                                SIGNED: tl.constexpr, HAS_W: tl.constexpr, TC: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row (bh, c) of part ([BH, NC, L]): [k, :] = sum_{n in chunk c} h[n, k] x[n, :], then
    [NBITS * D + k] = sum h[n, k] w[n] (w = 1 without HAS_W)."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    k0 = tl.program_id(2) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    k_mask = k < NBITS
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    code_base = bh * N * W
    x_base = bh * N * D
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    ks = tl.zeros((BLOCK_K,), dtype=tl.float32)
    n_start = c * CHUNK
    for i in range(0, CHUNK, BLOCK_N):
        n = n_start + i + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = n < N
        h = _load_code_values(codes_ptr, code_base, n, n_mask, k0, W, NBITS, SIGNED, BLOCK_K)
        x = tl.load(x_ptr + x_base + n[:, None] * D + dd[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)
        acc = _dot_codes(tl.trans(h), x, acc, TC)
        if HAS_W:
            w = tl.load(w_ptr + bh * N + n, mask=n_mask, other=0.0)
            ks += tl.sum(h * w[:, None], axis=0)
        else:
            ks += tl.sum(h, axis=0)
    row = part_ptr + (bh * tl.num_programs(1) + c) * L
    tl.store(row + k[:, None] * D + dd[None, :], acc, mask=k_mask[:, None] & d_mask[None, :])
    tl.store(row + NBITS * D + k, ks, mask=k_mask)


@triton.jit
def _chunk_sum_kernel(part_ptr, out_ptr, NC, L, BLOCK: tl.constexpr):
    """out[bh, :] = sum_c part[bh, c, :] (c in increasing order) over rows of length L."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(NC):
        acc += tl.load(part_ptr + (bh * NC + c) * L + j, mask=mask, other=0.0)
    tl.store(out_ptr + bh * L + j, acc, mask=mask)


@triton.jit
def _form_output(num, den0, v, mask, N, C, ECO: tl.constexpr):
    """The output rows of one query block from num = h_q . KV and den0 = h_q . ksum, as
    (out, den, ||t||): ecoformer out = (num + c v) / (den0 + N c); shiftadd t = v / 2 + num / pi,
    out = t / max(||t||, eps). den is meaningful for ecoformer only, ||t|| for shiftadd only."""
    den = den0 + N * C
    if ECO:
        out = tl.math.div_rn(num + C * v, den[:, None])
        nt = den
    else:
        t = v * 0.5 + tl.math.div_rn(num, tl.full(num.shape, _PI, tl.float32))
        t = tl.where(mask, t, 0.0)
        nt = tl.math.sqrt_rn(tl.sum(t * t, axis=1))
        out = tl.math.div_rn(t, tl.maximum(nt, _SHIFTADD_EPS)[:, None])
    return out, den, nt


@triton.jit
def _attention_fwd_kernel(v_ptr, q_codes_ptr, kv_ptr, out_ptr, N, D, W, NBITS, NC, L, C,
                          ECO: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    num, den0 = _query_num_den(q_codes_ptr, kv_ptr, bh, n, n_mask, dd, d_mask, N, D, W, NBITS, NC, L,
                               ECO, TC, BLOCK_M, BLOCK_K, BLOCK_D)
    offs = bh * N * D + n[:, None] * D + dd[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out, _, _ = _form_output(num, den0, v, mask, N, C, ECO)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_query_kernel(g_ptr, v_ptr, q_codes_ptr, kv_ptr, gq_ptr, gden_ptr, dhq_ptr,
                                N, D, W, NBITS, NC, L, C, ECO: tl.constexpr, TC: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """G = g / den (ecoformer) or g_t / pi (shiftadd), g_den (ecoformer) and d h_q."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    num, den0 = _query_num_den(q_codes_ptr, kv_ptr, bh, n, n_mask, dd, d_mask, N, D, W, NBITS, NC, L,
                               ECO, TC, BLOCK_M, BLOCK_K, BLOCK_D)
    offs = bh * N * D + n[:, None] * D + dd[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_in = tl.load(g_ptr + offs, mask=mask, other=0.0)
    g = g_in.to(tl.float32)
    out, den, nt = _form_output(num, den0, v, mask, N, C, ECO)
    if ECO:
        gq = tl.math.div_rn(g, den[:, None])
        gden = -tl.math.div_rn(tl.sum(g * out, axis=1), den)
        tl.store(gden_ptr + bh * N + n, gden, mask=n_mask)
    else:
        ntc = tl.maximum(nt, _SHIFTADD_EPS)[:, None]
        gt = tl.math.div_rn(g - tl.sum(g * out, axis=1)[:, None] * out, ntc)
        gt = tl.where(nt[:, None] > _SHIFTADD_EPS, gt, tl.math.div_rn(g, tl.full(g.shape, _SHIFTADD_EPS, tl.float32)))
        gq = tl.math.div_rn(gt, tl.full(gt.shape, _PI, tl.float32))
        gden = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gq = tl.where(mask, gq, 0.0)
    tl.store(gq_ptr + offs, gq, mask=mask)
    # d h_q[n, k] = G[n] . KV[k] (+ g_den[n] ksum[k]); for ecoformer on tensor cores as
    # (g[n] . KV[k]) / den[n]: g is exact in its own dtype (fewer piece products than G's).
    for k0 in range(0, NBITS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kv, ks = _load_kv(kv_ptr, bh, k0, dd, d_mask, D, NBITS, NC, L, BLOCK_K, BLOCK_D)
        zero = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if ECO and TC:
            dh = tl.math.div_rn(_dot(g_in, tl.trans(kv), zero, TC), den[:, None])
        else:
            dh = _dot(gq, tl.trans(kv), zero, TC)
        if ECO:
            dh += gden[:, None] * ks[None, :]
        tl.store(dhq_ptr + bh * N * NBITS + n[:, None] * NBITS + k[None, :], dh,
                 mask=n_mask[:, None] & (k < NBITS)[None, :])


@triton.jit
def _attention_bwd_key_kernel(v_ptr, k_codes_ptr, gq_ptr, dkv_ptr, dhk_ptr, dv_ptr, N, D, W, NBITS, NC, L,
                              GCOEF, ECO: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """d h_k = v dKV^T (+ dksum); dv = h_k dKV + GCOEF G."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    offs = bh * N * D + n[:, None] * D + dd[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)  # v's dtype: exact pieces for _dot
    dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    code_base = bh * N * W
    for k0 in range(0, NBITS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        dkv, dks = _load_kv(dkv_ptr, bh, k0, dd, d_mask, D, NBITS, NC, L, BLOCK_K, BLOCK_D)
        dh = _dot(v, tl.trans(dkv), tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), TC)
        if ECO:
            dh += dks[None, :]
        tl.store(dhk_ptr + bh * N * NBITS + n[:, None] * NBITS + k[None, :], dh,
                 mask=n_mask[:, None] & (k < NBITS)[None, :])
        h = _load_code_values(k_codes_ptr, code_base, n, n_mask, k0, W, NBITS, ECO, BLOCK_K)
        dv = _dot_codes(h, dkv, dv, TC)
    gq = tl.load(gq_ptr + offs, mask=mask, other=0.0)
    dv += GCOEF * gq
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pack_codes_kernel(h_ptr, out_ptr, R, B, WORDS, BLOCK_R: tl.constexpr):
    """out[r, w] = sum_{j < 32} 1[h[r, 32 w + j] > 0] << j (int32, two's complement)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(1)
    j = tl.arange(0, 32)
    col = w * 32 + j
    r_mask = r < R
    mask = r_mask[:, None] & (col < B)[None, :]
    h = tl.load(h_ptr + r[:, None] * B + col[None, :], mask=mask, other=0.0)
    if h.dtype == tl.bfloat16:
        h = h.to(tl.float32)  # the interpreter compares bfloat16 wrongly; exact widening
    bits = tl.where(mask & (h > 0), 1, 0).to(tl.int32)
    word = tl.sum(bits << j[None, :], axis=1)
    tl.store(out_ptr + r * WORDS + w, word, mask=r_mask)


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------


def _block_k(nbits: int) -> int:
    return 16 if nbits <= 16 else 32


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_m(block_d: int) -> int:
    return 64 if block_d <= 64 else (32 if block_d <= 256 else 16)


def _warps(block_d: int) -> int:
    return 4 if block_d <= 128 else 8


def _bwd_config(block_d: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_K, warps, tensor cores) of the two backward attention kernels, which hold
    more [BLOCK_M, BLOCK_D] and [BLOCK_K, BLOCK_D] tiles (and their bfloat16 pieces) than the
    forward: BLOCK_K = 16, and 16 rows from d = 128 on, so that they do not spill (read at sm_90);
    wide heads (d > 128, no ViT's) keep the FP32-core products, whose tiles need no pieces."""
    if block_d <= 64:
        return 64, 16, 4, TENSOR_CORES
    if block_d <= 128:
        return 16, 16, 4, TENSOR_CORES
    return 16, 16, 8, False


def pack_codes(h: Tensor) -> Tensor:
    """int32 [..., ceil(b / 32)]: bit j of word j // 32 is 1[h[..., j] > 0]."""
    b = h.shape[-1]
    words = num_words(b)
    out = torch.empty(tuple(h.shape[:-1]) + (words,), dtype=torch.int32, device=h.device)
    if out.numel() == 0:
        return out
    h = h.contiguous()
    rows = h.numel() // b
    _pack_codes_kernel[(triton.cdiv(rows, PACK_BLOCK_R), words)](h, out, rows, b, words, BLOCK_R=PACK_BLOCK_R,
                                                                 num_warps=4)
    return out


def _codes_outer(codes: Tensor, x: Tensor, w: Tensor | None, nbits: int, signed: bool) -> tuple[Tensor, int, int]:
    """(kv, NC, L): kv [BH, NC, L] fp32 holds, per (b, h) and chunk of tokens, sum_n h[n] x[n]^T
    [nbits, d] then sum_n h[n] w[n] [nbits] (w = 1 when None), rows padded to L (a multiple of 16
    elements: aligned rows), for codes [B, H, N, W] and x [B, H, N, d] (w [B, H, N]). More than
    FOLD_CHUNKS chunks are summed here (NC = 1); fewer are left to the kernels that read kv."""
    bsz, heads, n, d = x.shape
    bh = bsz * heads
    words = codes.shape[-1]
    # fp32 x (the backward's G, fp32 v): three bf16 pieces per tile; 16 bits per program keep
    # them in registers.
    block_k = 16 if x.dtype == torch.float32 else _block_k(nbits)
    block_d = _block_d(d)
    kb = triton.cdiv(nbits, block_k)
    steps = triton.cdiv(n, REDUCE_BLOCK_N)
    nc = min(steps, max(1, triton.cdiv(FILL_PROGRAMS, bh * kb)))
    steps_per_chunk = triton.cdiv(steps, nc)
    nc = triton.cdiv(steps, steps_per_chunk)
    chunk = steps_per_chunk * REDUCE_BLOCK_N
    length = triton.cdiv(nbits * (d + 1), 16) * 16
    part = torch.empty((bh, nc, length), dtype=torch.float32, device=x.device)
    has_w = w is not None
    _codes_outer_partial_kernel[(bh, nc, kb)](
        codes, x, w if has_w else part, part, n, d, words, nbits, chunk, length,
        SIGNED=bool(signed), HAS_W=has_w, TC=TENSOR_CORES, BLOCK_N=REDUCE_BLOCK_N, BLOCK_K=block_k,
        BLOCK_D=block_d, num_warps=_warps(block_d))
    if nc <= FOLD_CHUNKS:
        return part, nc, length
    kv = torch.empty((bh, 1, length), dtype=torch.float32, device=x.device)
    _chunk_sum_kernel[(bh, triton.cdiv(length, SUM_BLOCK))](part, kv, nc, length, BLOCK=SUM_BLOCK, num_warps=4)
    return kv, 1, length


def binary_attention_fwd(q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int, form: str) -> Tensor:
    """out [B, H, N, d] in v's dtype from packed codes [B, H, N, W] and v [B, H, N, d]."""
    bsz, heads, n, d = v.shape
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    eco = form == "ecoformer"
    kv, nc, length = _codes_outer(k_codes, v, None, nbits, eco)
    block_k, block_d = _block_k(nbits), _block_d(d)
    block_m = _block_m(block_d)
    _attention_fwd_kernel[(bsz * heads, triton.cdiv(n, block_m))](
        v, q_codes, kv, out, n, d, q_codes.shape[-1], nbits, nc, length, float(nbits + 1),
        ECO=eco, TC=TENSOR_CORES, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_warps(block_d))
    return out


def binary_attention_bwd(grad_out: Tensor, q_codes: Tensor, k_codes: Tensor, v: Tensor, nbits: int,
                         form: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d h_q [B, H, N, nbits] fp32, d h_k [B, H, N, nbits] fp32, dv in v's dtype), recomputing KV
    and ksum; see :func:`effkern.ops.binary_hash.binary_attention_bwd` for the formulas."""
    bsz, heads, n, d = v.shape
    code_shape = (bsz, heads, n, nbits)
    if v.numel() == 0:
        # d = 0 (or nothing at all): KV, g and hence every gradient are zero.
        return (torch.zeros(code_shape, dtype=torch.float32, device=v.device),
                torch.zeros(code_shape, dtype=torch.float32, device=v.device),
                torch.zeros(v.shape, dtype=v.dtype, device=v.device))
    eco = form == "ecoformer"
    words = q_codes.shape[-1]
    kv, nc, length = _codes_outer(k_codes, v, None, nbits, eco)
    block_d = _block_d(d)
    block_m, block_k, warps, tc = _bwd_config(block_d)
    grid = (bsz * heads, triton.cdiv(n, block_m))
    gq = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    gden = torch.empty((bsz, heads, n) if eco else (1,), dtype=torch.float32, device=v.device)
    d_hq = torch.empty(code_shape, dtype=torch.float32, device=v.device)
    c = float(nbits + 1)
    _attention_bwd_query_kernel[grid](
        grad_out, v, q_codes, kv, gq, gden, d_hq, n, d, words, nbits, nc, length, c,
        ECO=eco, TC=tc, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps)
    dkv, nc, length = _codes_outer(q_codes, gq, gden if eco else None, nbits, eco)
    d_hk = torch.empty(code_shape, dtype=torch.float32, device=v.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _attention_bwd_key_kernel[grid](
        v, k_codes, gq, dkv, d_hk, dv, n, d, words, nbits, nc, length, c if eco else math.pi / 2,
        ECO=eco, TC=tc, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps)
    return d_hq, d_hk, dv


def hashed_attention_fwd(y_q: Tensor, y_k: Tensor, v: Tensor, form: str) -> Tensor:
    """binary_attention_fwd of the packed codes of the hashes y_q, y_k [B, H, N, b]."""
    return binary_attention_fwd(pack_codes(y_q), pack_codes(y_k), v, y_q.shape[-1], form)
