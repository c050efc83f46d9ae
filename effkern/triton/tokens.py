"""Triton backend of the row primitives of the sparse token ops (:mod:`effkern.ops.tokens`,
section 1): ``gather_rows``, ``scatter_rows``, ``weighted_sum_rows``, ``topk_rank``,
``segment_mean_rows`` and ``segment_mean_rows_bwd``.

Each host function has the name, signature and semantics of the torch primitive of the same
name and takes contiguous inputs that the public op has already validated (x in fp16, bf16 or
fp32; index tensors int64 or int32, loaded as they are and widened in the kernel). Empty
outputs return before any launch (``topk_rank`` with k = 0 needs no ranking: two torch fills).
Row offsets are widened to int64 before they are multiplied by C, so B * N * C may exceed 2^31.

Kernel structure.
* Row tiles. Every kernel but the ranking ones owns a tile of ``BLOCK_R`` rows x ``BLOCK_C``
  columns (a 1-D grid, column tiles fastest, so no grid axis meets the 65535 limit); rows are
  the flattened (batch, row) pairs of the *output* (of the input for ``segment_mean_rows_bwd``).
  ``BLOCK_C`` is a power of two that divides C where it can (C = 384: 128), so no lanes idle;
  when C is a multiple of 16 Triton specialises on it and the row loads become 16-byte vectors.
  ``BLOCK_R`` fills the tile to :data:`TILE` elements (8-16 KiB in flight per program; half
  that, with fewer elements a thread, when C is not a multiple of 16 and every access is scalar).
* ``gather_rows``: a masked copy; an out-of-range index masks its whole row, which is then
  stored as zeros (no out-of-bounds read).
* Scatter-like kernels (``scatter_rows``, ``segment_mean_rows``) work per *output* row, reading
  the row's segment of the CSR plan (``order``/``sources`` between ``starts[j]`` and
  ``starts[j + 1]``, see :func:`effkern.ops.tokens.scatter_plan`): every output row is written
  once by one program, deterministically, without atomics. A tile loops ``t`` up to its longest
  segment, each row masked off past its own; sums run in float32 in ascending segment order and
  are rounded once. Replace-scatter reads only the last segment entry, and reads x only for rows
  it does not replace.
* ``weighted_sum_rows``: one program per (batch, column block) walks the index list in blocks,
  accumulating w * x in a float32 tile, reduced once at the end.
* ``segment_mean_rows_bwd``: one program per block of input rows walks C in blocks: dx for each
  block, and (with sizes) the dot product g . (x - out) over the whole row for dsize.
* ``topk_rank``: two kernels. ``_topk_rank_kernel`` maps each score to an order-preserving int32
  key (fp32 bits, negatives' magnitude bits flipped; -0.0 -> +0.0; every NaN -> one key above
  +inf), so that torch.sort's stable descending order is: larger key first, ties by position.
  The rank of position i, #{j : key_j > key_i, or key_j == key_i and j < i}, is counted over
  square blocks of j; only the diagonal block needs the position compare (before it a tie
  always ranks above, after it never), so it is one int32 compare per pair elsewhere (O(M^2)
  per row, fine up to a few thousand tokens). Ranks below k place i in ``keep``; all ranks go
  to a scratch buffer, from which ``_topk_drop_kernel`` places each dropped position at
  i - #(kept positions before i) (a running count over earlier blocks plus ``tl.cumsum``).

Arithmetic. Sums accumulate in float32 and are rounded once to the output dtype, to nearest
even. Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's ``/`` is approximate on
NVIDIA GPUs). bfloat16 goes through :func:`_f32` / :func:`_round_to`, integer operations on the
bits that equal the GPU's conversions and are also exact under Triton's interpreter (whose own
bf16 casts truncate and flush subnormals), so the CPU tests check the same numbers a GPU gives.
On a GPU, Triton may contract ``acc + s * x`` into an FMA, so the weighted sums can differ from
torch's in the last bit; copies, add-scatter without repeats, dx and the ranking are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements a program of the row-tile kernels owns (BLOCK_R * BLOCK_C), the widest column block,
# and the narrowest column block the C-divisor search goes down to.
TILE = 4096
MAX_BLOCK_C = 512
MIN_BLOCK_C = 64
# topk_rank: positions ranked per program (and compared per step), positions per drop block.
RANK_BLOCK = 64
DROP_BLOCK = 1024

# Constants used inside kernels must be tl.constexpr globals (compiled Triton rejects others).
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _f32(v):
    """v as float32, exactly. bfloat16 widens by its bits (bits << 16): what the GPU's convert
    does, and exact in Triton's interpreter too, whose bf16 conversion flushes subnormals."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """float32 v rounded to ``dtype`` (round to nearest even, as torch's .to()). bfloat16 rounds
    by integer ops on the bits, identical to the GPU's cvt.rn.bf16.f32 and exact in Triton's
    interpreter too, whose fp32 -> bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = bits + 32767 + ((bits >> 16) & 1)  # ties to the even upper half; carries overflow to inf
        rounded = tl.where(v != v, bits | 4194304, rounded)  # NaN stays a (quiet) NaN: no carry
        return (rounded >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, R, N, K, C, col_tiles,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat output rows b * K + k
    cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = (cols < C)[None, :]
    i = tl.load(idx_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (i >= 0) & (i < N)  # out of range: a zero row, never read
    src = ((rows // K).to(tl.int64) * N + i) * C
    v = tl.load(x_ptr + src[:, None] + cols[None, :], mask=ok[:, None] & col_ok, other=0)
    dst = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + dst, v, mask=row_ok[:, None] & col_ok)


@triton.jit
def _scatter_rows_kernel(x_ptr, y_ptr, order_ptr, starts_ptr, out_ptr, R, N, K, C, col_tiles,
                         ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat output rows b * N + j
    cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = (cols < C)[None, :]
    b = (rows // N).to(tl.int64)
    seg = b * (N + 1) + (rows - (rows // N) * N)  # starts[b, j]
    start = tl.load(starts_ptr + seg, mask=row_ok, other=0).to(tl.int64)
    count = tl.load(starts_ptr + seg + 1, mask=row_ok, other=0).to(tl.int64) - start
    order_row = order_ptr + b * K + start  # this row's segment of order
    dst = rows.to(tl.int64)[:, None] * C + cols[None, :]
    if ADD:
        acc = _f32(tl.load(x_ptr + dst, mask=row_ok[:, None] & col_ok, other=0))
        for t in range(0, tl.max(count, axis=0).to(tl.int32)):
            k = tl.load(order_row + t, mask=row_ok & (t < count), other=-1).to(tl.int64)
            live = row_ok & (t < count) & (k >= 0) & (k < K)
            yv = _f32(tl.load(y_ptr + (b * K + k)[:, None] * C + cols[None, :],
                              mask=live[:, None] & col_ok, other=0))
            # where, not a plain add: adding +0.0 would turn an x of -0.0 into +0.0
            acc = tl.where(live[:, None], acc + yv, acc)
        tl.store(out_ptr + dst, _round_to(acc, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
    else:
        # The last k of the segment wins; x is read only for rows that no y row replaces.
        k = tl.load(order_row + count - 1, mask=row_ok & (count > 0), other=-1).to(tl.int64)
        has = row_ok & (k >= 0) & (k < K)
        yv = tl.load(y_ptr + (b * K + k)[:, None] * C + cols[None, :], mask=has[:, None] & col_ok, other=0)
        xv = tl.load(x_ptr + dst, mask=(row_ok & ~has)[:, None] & col_ok, other=0)
        tl.store(out_ptr + dst, tl.where(has[:, None], yv, xv), mask=row_ok[:, None] & col_ok)


@triton.jit
def _weighted_sum_rows_kernel(x_ptr, w_ptr, idx_ptr, out_ptr, N, J, C, col_tiles,
                              BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // col_tiles).to(tl.int64)
    cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = (cols < C)[None, :]
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        i = tl.load(idx_ptr + b * J + jj, mask=jj < J, other=-1).to(tl.int64)
        ok = (jj < J) & (i >= 0) & (i < N)  # out-of-range indices contribute nothing
        src = b * N + i
        w = _f32(tl.load(w_ptr + src, mask=ok, other=0))
        xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok, other=0)
        acc += w[:, None] * _f32(xv)
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + b * C + cols, _round_to(out, out_ptr.dtype.element_ty), mask=cols < C)


@triton.jit
def _score_keys(s_ptr, pos, M):
    """Order-preserving int32 keys of the scores at ``pos`` (see the module docstring);
    positions past M get INT32_MIN, below every real key (it is a NaN's, and NaNs are
    canonicalised)."""
    ok = pos < M
    s = _f32(tl.load(s_ptr + pos, mask=ok, other=0))  # exact for fp16 / bf16
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ _INT32_MAX, bits)  # negative floats: larger magnitude, smaller key
    key = tl.where(s != s, _INT32_MAX, key)  # every NaN: one key, above +inf
    return tl.where(ok, key, _INT32_MIN)


@triton.jit
def _topk_rank_kernel(s_ptr, rank_ptr, keep_ptr, M, k, blocks, KEEP_CLS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    first = (pid % blocks) * BLOCK
    i = first + tl.arange(0, BLOCK)
    row = s_ptr + b * M
    ki = _score_keys(row, i, M)[:, None]
    # rank_i = #{j : key_j > key_i, or key_j == key_i and j < i}. Square blocks: in blocks
    # before i's own, every tie ranks above (>=); in blocks after it, none does (>); only the
    # diagonal block compares positions.
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, first, BLOCK):
        kj = _score_keys(row, j0 + tl.arange(0, BLOCK), M)[None, :]
        rank += tl.sum((kj >= ki).to(tl.int32), axis=1)
    kj = _score_keys(row, i, M)[None, :]
    above = (kj > ki) | ((kj == ki) & (i[None, :] < i[:, None]))
    rank += tl.sum(above.to(tl.int32), axis=1)
    for j0 in range(first + BLOCK, M, BLOCK):
        kj = _score_keys(row, j0 + tl.arange(0, BLOCK), M)[None, :]  # padding: INT32_MIN, never >
        rank += tl.sum((kj > ki).to(tl.int32), axis=1)
    tl.store(rank_ptr + b * M + i, rank, mask=i < M)
    if KEEP_CLS:
        pos = (i + 1).to(tl.int64)
        keep_row = keep_ptr + b * (k + 1)
        if pid % blocks == 0:
            tl.store(keep_row, b * 0)  # the CLS token, position 0, first
        keep_row += 1
    else:
        pos = i.to(tl.int64)
        keep_row = keep_ptr + b * k
    tl.store(keep_row + rank, pos, mask=(i < M) & (rank < k))


@triton.jit
def _topk_drop_kernel(rank_ptr, drop_ptr, M, k, blocks, KEEP_CLS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    first = (pid % blocks) * BLOCK
    ranks = rank_ptr + b * M
    # kept positions before this block
    before = 0
    for j0 in range(0, first, BLOCK):
        r = tl.load(ranks + j0 + tl.arange(0, BLOCK))  # whole blocks: j0 + BLOCK <= first <= M
        before += tl.sum((r < k).to(tl.int32), axis=0)
    i = first + tl.arange(0, BLOCK)
    r = tl.load(ranks + i, mask=i < M, other=0)
    kept = ((r < k) & (i < M)).to(tl.int32)
    slot = i - before - (tl.cumsum(kept, axis=0) - kept)  # i - #(kept positions before i)
    if KEEP_CLS:
        pos = (i + 1).to(tl.int64)
    else:
        pos = i.to(tl.int64)
    tl.store(drop_ptr + b * (M - k) + slot, pos, mask=(i < M) & (kept == 0))


@triton.jit
def _segment_mean_rows_kernel(x_ptr, size_ptr, sources_ptr, starts_ptr, out_ptr, size_out_ptr,
                              R, N, M, C, col_tiles,
                              HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat output rows b * M + o
    col_tile = pid % col_tiles
    cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = (cols < C)[None, :]
    b = (rows // M).to(tl.int64)
    seg = b * (M + 1) + (rows - (rows // M) * M)
    # Clamped into [0, N]: a malformed plan (validate=False) can neither read sources out of
    # bounds nor make the loop below run more than N steps.
    start = tl.minimum(tl.maximum(tl.load(starts_ptr + seg, mask=row_ok, other=0).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(starts_ptr + seg + 1, mask=row_ok, other=0).to(tl.int64), start), N)
    count = end - start
    src_row = sources_ptr + b * N + start
    num = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t in range(0, tl.max(count, axis=0).to(tl.int32)):
        r = tl.load(src_row + t, mask=row_ok & (t < count), other=-1).to(tl.int64)
        live = row_ok & (t < count) & (r >= 0) & (r < N)
        src = b * N + r
        xv = _f32(tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=live[:, None] & col_ok, other=0))
        if HAS_SIZE:
            s = _f32(tl.load(size_ptr + src, mask=live, other=0))
            num += s[:, None] * xv
        else:
            s = live.to(tl.float32)
            num += xv
        den += s
    out = tl.math.div_rn(num, den[:, None])  # an empty segment gives 0 / 0 = NaN, as torch
    dst = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + dst, _round_to(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
    if col_tile == 0:
        tl.store(size_out_ptr + rows, den, mask=row_ok)


@triton.jit
def _segment_mean_rows_bwd_kernel(g_ptr, gs_ptr, x_ptr, size_ptr, out_ptr, size_out_ptr, dest_ptr,
                                  dx_ptr, dsize_ptr, R, N, M, C,
                                  HAS_SIZE: tl.constexpr, HAS_GRAD_SIZE: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat input rows b * N + r
    row_ok = rows < R
    o = tl.load(dest_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (o >= 0) & (o < M)
    orow = (rows // N).to(tl.int64) * M + o
    so = _f32(tl.load(size_out_ptr + orow, mask=ok, other=1))
    if HAS_SIZE:
        s = _f32(tl.load(size_ptr + rows, mask=row_ok, other=0))
    else:
        s = tl.full([BLOCK_R], 1.0, tl.float32)
    ratio = tl.math.div_rn(s, so)[:, None]  # s / S_o first, as the torch primitive
    src = orow[:, None] * C
    dst = rows.to(tl.int64)[:, None] * C
    dot = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        col_ok = cols < C
        g = _f32(tl.load(g_ptr + src + cols, mask=ok[:, None] & col_ok, other=0))
        tl.store(dx_ptr + dst + cols, _round_to(g * ratio, dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok)
        if HAS_SIZE:
            xv = _f32(tl.load(x_ptr + dst + cols, mask=row_ok[:, None] & col_ok, other=0))
            ov = _f32(tl.load(out_ptr + src + cols, mask=ok[:, None] & col_ok, other=0))
            dot += g * (xv - ov)
    if HAS_SIZE:
        ds = tl.math.div_rn(tl.sum(dot, axis=1), so)
        if HAS_GRAD_SIZE:
            ds += _f32(tl.load(gs_ptr + orow, mask=ok, other=0))
        tl.store(dsize_ptr + rows, ds, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Block sizes (by shape; no autotuning)
# --------------------------------------------------------------------------------------------


def _col_block(c: int, cap: int = MAX_BLOCK_C) -> int:
    """A power-of-two column block: the smallest covering C up to ``cap``, halved (down to
    MIN_BLOCK_C) until it divides C, so that the last column block has no idle lanes."""
    bc = min(triton.next_power_of_2(max(c, 1)), cap)
    while bc > MIN_BLOCK_C and c % bc:
        bc //= 2
    return bc


def _tile(rows: int, c: int, tile: int = TILE, cap: int = MAX_BLOCK_C) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, column tiles, num_warps) for a row-tile kernel."""
    bc = _col_block(c, cap)
    # C % 16 == 0: Triton proves rows 16-byte aligned and vectorises; 16 elements a thread.
    # Otherwise every element is a scalar access with its own 64-bit pointer: 8 a thread, and a
    # smaller tile, to keep registers (and occupancy) in check.
    per_thread = 16 if c % 16 == 0 else 8
    tile = tile if c % 16 == 0 else tile // 2
    br = max(1, min(tile // bc, triton.next_power_of_2(max(rows, 1))))
    return br, bc, max(1, triton.cdiv(c, bc)), max(1, min(8, br * bc // (32 * per_thread)))


# --------------------------------------------------------------------------------------------
# Host functions (same names, signatures and semantics as the torch primitives)
# --------------------------------------------------------------------------------------------


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """out[b, k] = x[b, idx[b, k]] for x [B, N, C]; an out-of-range index gives a zero row."""
    b, n, c = x.shape
    k = idx.shape[1]
    out = torch.empty((b, k, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    br, bc, col_tiles, warps = _tile(b * k, c)
    _gather_rows_kernel[(triton.cdiv(b * k, br) * col_tiles,)](
        x, idx, out, b * k, n, k, c, col_tiles, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return out


def scatter_rows(x: Tensor, y: Tensor, idx: Tensor, order: Tensor, starts: Tensor, add: bool) -> Tensor:
    """Out-of-place row scatter of y [B, K, C] into x [B, N, C] along the plan (order, starts):
    the last y row aimed at a row replaces it (add=False), or all of them are added to it in
    float32, ascending k, rounded once (add=True). ``idx`` is not needed: the plan has it all."""
    b, n, c = x.shape
    k = y.shape[1]
    out = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    br, bc, col_tiles, warps = _tile(b * n, c)
    _scatter_rows_kernel[(triton.cdiv(b * n, br) * col_tiles,)](
        x, y, order, starts, out, b * n, n, k, c, col_tiles, ADD=bool(add), BLOCK_R=br, BLOCK_C=bc,
        num_warps=warps)
    return out


def weighted_sum_rows(x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
    """[B, 1, C]: sum over j of weights[b, idx[b, j]] * x[b, idx[b, j]], accumulated in float32;
    an out-of-range index contributes nothing (J = 0: zeros)."""
    b, n, c = x.shape
    j = idx.shape[1]
    out = torch.empty((b, 1, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # Few programs (B x column blocks), each walking J: narrow column blocks give more of them.
    block_j, bc, col_tiles, warps = _tile(j, c, cap=128)
    block_j = min(block_j, 64)
    _weighted_sum_rows_kernel[(b * col_tiles,)](
        x, weights, idx, out, n, j, c, col_tiles, BLOCK_J=block_j, BLOCK_C=bc, num_warps=warps)
    return out


def topk_rank(scores: Tensor, k: int, keep_cls: bool) -> tuple[Tensor, Tensor]:
    """(keep [B, k + keep_cls], drop [B, M - k]) int64 in torch.sort(descending, stable) order:
    keep = [0 with keep_cls] + the k best positions, best first; drop = the rest, ascending;
    positions offset by keep_cls."""
    b, m = scores.shape
    off = int(keep_cls)
    keep = torch.empty((b, k + off), dtype=torch.int64, device=scores.device)
    drop = torch.empty((b, m - k), dtype=torch.int64, device=scores.device)
    if b == 0:
        return keep, drop
    if k == 0:  # nothing to rank
        keep.zero_()
        drop.copy_(torch.arange(off, m + off, device=scores.device).expand(b, m))
        return keep, drop
    rank = torch.empty((b, m), dtype=torch.int32, device=scores.device)
    block = min(RANK_BLOCK, max(16, triton.next_power_of_2(m)))
    blocks = triton.cdiv(m, block)
    _topk_rank_kernel[(b * blocks,)](scores, rank, keep, m, k, blocks, KEEP_CLS=bool(keep_cls), BLOCK=block,
                                     num_warps=4)
    if m > k:
        block = min(DROP_BLOCK, max(16, triton.next_power_of_2(m)))
        blocks = triton.cdiv(m, block)
        _topk_drop_kernel[(b * blocks,)](rank, drop, m, k, blocks, KEEP_CLS=bool(keep_cls), BLOCK=block,
                                         num_warps=4)
    return keep, drop


def segment_mean_rows(x: Tensor, size: Tensor | None, dest: Tensor, sources: Tensor,
                      starts: Tensor) -> tuple[Tensor, Tensor]:
    """(out [B, M, C] in x's dtype, size_out [B, M] float32): the size-weighted mean of the rows
    of x in each output row's segment of (sources, starts), and the segment's total size
    (sizes: ``size`` or 1). ``dest`` is the same map by input row; it is not needed here."""
    b, n, c = x.shape
    m = starts.shape[1] - 1
    out = torch.empty((b, m, c), dtype=x.dtype, device=x.device)
    size_out = torch.empty((b, m), dtype=torch.float32, device=x.device)
    if b * m == 0:
        return out, size_out
    br, bc, col_tiles, warps = _tile(b * m, c)
    _segment_mean_rows_kernel[(triton.cdiv(b * m, br) * col_tiles,)](
        x, size if size is not None else x, sources, starts, out, size_out, b * m, n, m, c, col_tiles,
        HAS_SIZE=size is not None, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return out, size_out


def segment_mean_rows_bwd(grad_out: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                          out: Tensor, size_out: Tensor, dest: Tensor) -> tuple[Tensor, Tensor | None]:
    """(dx [B, N, C] in x's dtype, dsize [B, N] float32 or None when size is None) for
    :func:`segment_mean_rows`: with o = dest[r], dx_r = s_r g_o / S_o and
    dsize_r = g_o . (x_r - out_o) / S_o + gS_o."""
    b, n, c = x.shape
    m = size_out.shape[1]
    dx = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    dsize = None if size is None else torch.empty((b, n), dtype=torch.float32, device=x.device)
    if b * n == 0:
        return dx, dsize
    # One program walks whole rows (the dot product spans C); smaller tiles: four live tiles.
    br, bc, _, warps = _tile(b * n, c, tile=TILE // 2, cap=256)
    has_size, has_gs = size is not None, size is not None and grad_size is not None
    _segment_mean_rows_bwd_kernel[(triton.cdiv(b * n, br),)](
        grad_out, grad_size if has_gs else size_out, x, size if has_size else size_out, out, size_out, dest,
        dx, dsize if has_size else size_out, b * n, n, m, c,
        HAS_SIZE=has_size, HAS_GRAD_SIZE=has_gs, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return dx, dsize
