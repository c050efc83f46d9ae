"""Tests of tests/sparse_mma_emulation.py (register-level model of
mma.sp::ordered_metadata.m16n8k64.row.col.s32.s8.s8.s32), CPU only.

The emulation is pinned to two independent descriptions of the same hardware layout:
torch/sparse/_semi_structured_conversions.py (a reimplementation of CUTLASS's
tools/util/include/cutlass/util/host_reorder.h + ColumnMajorInterleaved<2>, the layout CUTLASS's
SM80 sparse warp iterator feeds to the instruction), and the CuTe MMA_Traits of the m16n8k64
sparse atom (include/cute/atom/mma_traits_sm120_sparse.hpp), whose layouts are restated here as
numbers (shape, stride) and evaluated by a tiny local evaluator.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from tests import sparse_mma_emulation as E

PAIRS = list(itertools.combinations(range(4), 2))  # the 6 valid (i0, i1)


def random_2to4(R, K, gen, degenerate=False):
    """int8 [R, K]: exactly two non-zeros per 4-chunk (or, degenerate, 0..2 non-zeros)."""
    pick = torch.randint(0, 6, (R, K // 4), generator=gen)
    mask = torch.zeros(R, K // 4, 4, dtype=torch.bool)
    table = torch.zeros(6, 4, dtype=torch.bool)
    for p, (i, j) in enumerate(PAIRS):
        table[p, i] = table[p, j] = True
    mask[:] = table[pick]
    if degenerate:
        mask &= torch.rand(R, K // 4, 4, generator=gen) < 0.6
    vals = torch.randint(1, 128, (R, K // 4, 4), generator=gen)
    vals = vals * (torch.randint(0, 2, vals.shape, generator=gen) * 2 - 1)
    vals = vals.clamp(-128, 127)
    return (vals * mask).to(torch.int8).view(R, K)


def random_b(K, N, gen):
    return torch.randint(-128, 128, (K, N), generator=gen).to(torch.int8)


def wrap32(x):
    return ((x + 2**31) % 2**32) - 2**31


def run_tile(values, meta, B, C, row0, k0, n0, **kw):
    regs = E.lane_registers(values, meta, B, row0, k0, n0)
    d = E.mma_sp_emulate(regs.a, regs.b, E.c_registers(C), regs.e, regs.selector, **kw)
    return E.d_matrix(d)


# ------------------------------------------------------------------------------------------
# Storage format
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degenerate", [False, True])
def test_compress_roundtrip(gen, degenerate):
    x = random_2to4(32, 192, gen, degenerate)
    values, meta = E.compress(x)
    assert values.shape == (32, 96) and values.dtype == torch.int8
    assert meta.shape == (32, 24) and meta.dtype == torch.uint8
    assert torch.equal(E.decompress(values, meta), x)
    assert torch.equal(meta, E.logical_meta(x))
    nib = E.meta_nibbles(meta)
    assert set(nib.unique().tolist()) <= set(E.ORDERED_VALID_NIBBLES)


def test_logical_meta_byte_format():
    # chunk0 keeps (1,3), chunk1 (0,2), chunk2 all zero -> (0,1), chunk3 one nz at 2 -> (0,2)
    x = torch.tensor([[0, 5, 0, -7, 9, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 0]], dtype=torch.int8)
    meta = E.logical_meta(x)
    n = [1 | 3 << 2, 0 | 2 << 2, 0 | 1 << 2, 0 | 2 << 2]
    assert meta.tolist() == [[n[0] | n[1] << 4, n[2] | n[3] << 4]]
    values, _ = E.compress(x)
    assert values.tolist() == [[5, -7, 9, 3, 0, 0, 0, 4]]


def test_compress_rejects_three_nonzeros():
    x = torch.zeros(1, 8, dtype=torch.int8)
    x[0, :3] = 1
    with pytest.raises(ValueError):
        E.compress(x)


@pytest.mark.parametrize("nib", [n for n in range(16) if n not in E.ORDERED_VALID_NIBBLES])
def test_decompress_rejects_invalid_nibble(gen, nib):
    values, meta = E.compress(random_2to4(2, 16, gen))
    meta[1, 1] = (meta[1, 1] & 0xF0) | nib
    with pytest.raises(ValueError):
        E.decompress(values, meta)


# ------------------------------------------------------------------------------------------
# The mapping table vs. PTX formulas and CuTe layouts
# ------------------------------------------------------------------------------------------


def test_table_matches_ptx_formulas():
    # PTX 9.7.14.6.2.6: a_i row = g for 0<=i<4 || 8<=i<12 else g+8; firstcol = 8t (+32 for i>=8)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(16):
            row, ccol = E.a_reg_source(lane, i // 4)
            assert row == (g if (i < 4 or 8 <= i < 12) else g + 8)
            assert 2 * ccol == 8 * t + (32 if i >= 8 else 0)  # first dense col of the 8-wide span
        for i in range(4):  # accumulators as for dense m16n8k16 integer
            assert E.c_reg_coord(lane, i) == (g + 8 * (i >= 2), 2 * t + (i & 1))


def cute_eval(shape, stride, idx):
    """Offset of flat index idx in a (nested) CuTe layout (colexicographic)."""
    if isinstance(shape, int):
        return (idx % shape) * stride
    off = 0
    for s, d in zip(shape, stride):
        size = s if isinstance(s, int) else _size(s)
        off += cute_eval(s, d, idx % size)
        idx //= size
    return off


def _size(shape):
    return shape if isinstance(shape, int) else math.prod(_size(s) for s in shape)


# CuTe MMA_Traits<SM120_SPARSE_16x8x64_TN> (include/cute/atom/mma_traits_sm120_sparse.hpp),
# (thread, value) -> column-major offset in the (M16 x K64), (N8 x K64), (M16 x N8) tiles.
CUTE_A = (((4, 8), (8, 2, 2)), ((128, 1), (16, 8, 512)))
CUTE_B = (((4, 8), (4, 4)), ((32, 1), (8, 128)))
CUTE_C = (((4, 8), (2, 2)), ((32, 1), (16, 8)))
CUTE_E = (((2, 2, 8), 32), ((8, 512, 1), 16))


def cute_coord(layout, thread, value, rows):
    shape, stride = layout
    off = cute_eval(shape[0], stride[0], thread) + cute_eval(shape[1], stride[1], value)
    return off % rows, off // rows


def test_table_matches_cute_layouts():
    for lane in range(32):
        for j in range(4):
            row, ccol = E.a_reg_source(lane, j)
            for v in range(8):  # 8 dense k per register (4 kept)
                assert cute_coord(CUTE_A, lane, 8 * j + v, 16) == (row, 2 * ccol + v)
            k, n = E.b_reg_source(lane, j)
            for y in range(4):
                assert cute_coord(CUTE_B, lane, 4 * j + y, 8) == (n, k + y)
            assert cute_coord(CUTE_C, lane, j, 16) == E.c_reg_coord(lane, j)
        row, k = E.e_source(lane)
        for v in range(32):
            assert cute_coord(CUTE_E, lane, v, 16) == (row, k + v)


def test_every_value_and_nibble_owned_once():
    seen_a, seen_e = set(), set()
    for lane in range(32):
        for j in range(4):
            row, ccol = E.a_reg_source(lane, j)
            seen_a.update((row, ccol + y) for y in range(4))
        row, k = E.e_source(lane)
        seen_e.update((row, (k + 4 * c) // 4) for c in range(8))
    assert seen_a == {(r, c) for r in range(16) for c in range(32)}
    assert seen_e == {(r, c) for r in range(16) for c in range(16)}
    for r in range(16):
        for c in range(16):
            lane, bit = E.e_lane_for(r, c)
            row, k = E.e_source(lane)
            assert row == r and k + bit == 4 * c  # nibble at bits 4c' <-> dense k 32(t>>1) + 4c'


# ------------------------------------------------------------------------------------------
# Emulation == dense matmul
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degenerate", [False, True])
@pytest.mark.parametrize("ordered", [True, False])
def test_single_tile(gen, degenerate, ordered):
    A = random_2to4(16, 64, gen, degenerate)
    B = random_b(64, 8, gen)
    C = torch.randint(-(2**20), 2**20, (16, 8), generator=gen)
    values, meta = E.compress(A)
    D = run_tile(values, meta, B, C, 0, 0, 0, ordered=ordered)
    assert torch.equal(D, A.long() @ B.long() + C)
    regs = E.lane_registers(values, meta, B, 0, 0, 0)
    assert torch.equal(E.dense_a_from_registers(regs.a, regs.e), A.long())
    assert torch.equal(E.dense_b_from_registers(regs.b), B.long())


def test_larger_matrix_tiled(gen):
    R, K, N = 48, 192, 24
    A = random_2to4(R, K, gen, degenerate=True)
    B = random_b(K, N, gen)
    values, meta = E.compress(A)
    out = torch.zeros(R, N, dtype=torch.int64)
    for row0 in range(0, R, 16):
        for n0 in range(0, N, 8):
            acc = torch.zeros(16, 8, dtype=torch.int64)
            for k0 in range(0, K, 64):  # chain: D of one k-tile is C of the next
                acc = run_tile(values, meta, B, acc, row0, k0, n0)
            out[row0:row0 + 16, n0:n0 + 8] = acc
    assert torch.equal(out, A.long() @ B.long())


def test_wrap_and_satfinite(gen):
    A = torch.zeros(16, 64, dtype=torch.int8)
    A[:, 0] = 127
    A[:, 2] = 127
    B = torch.full((64, 8), 127, dtype=torch.int8)
    C = torch.full((16, 8), E.INT32_MAX - 10, dtype=torch.int64)
    values, meta = E.compress(A)
    exact = A.long() @ B.long() + C
    assert torch.equal(run_tile(values, meta, B, C, 0, 0, 0), wrap32(exact))
    assert torch.equal(run_tile(values, meta, B, C, 0, 0, 0, satfinite=True),
                       exact.clamp(max=E.INT32_MAX))


# ------------------------------------------------------------------------------------------
# Undefined metadata / selector
# ------------------------------------------------------------------------------------------


def _tile(gen):
    A = random_2to4(16, 64, gen)
    B = random_b(64, 8, gen)
    values, meta = E.compress(A)
    return A, B, E.lane_registers(values, meta, B, 0, 0, 0)


@pytest.mark.parametrize("selector", [1, 2, 3])
def test_selector_must_be_zero(gen, selector):
    _, _, regs = _tile(gen)
    with pytest.raises(ValueError):
        E.mma_sp_emulate(regs.a, regs.b, [[0] * 4] * 32, regs.e, selector)


@pytest.mark.parametrize("nib", E.ALWAYS_INVALID_NIBBLES)
@pytest.mark.parametrize("ordered", [True, False])
def test_equal_indices_undefined(gen, nib, ordered):
    _, _, regs = _tile(gen)
    lane, bit = E.e_lane_for(13, 11)
    regs.e[lane] = (regs.e[lane] & ~(0xF << bit) & E.MASK32) | (nib << bit)
    with pytest.raises(ValueError):
        E.mma_sp_emulate(regs.a, regs.b, [[0] * 4] * 32, regs.e, 0, ordered=ordered)


@pytest.mark.parametrize("row,chunk", [(0, 0), (5, 9), (13, 11), (15, 15)])
def test_unordered_pairs(gen, row, chunk):
    """i0 > i1: undefined for ::ordered_metadata; for plain mma.sp the value in the lower byte
    goes to position i0 (PTX lists only equal indices as invalid there - a GPU probe is needed
    to confirm). Swapping both the two A bytes and the two index fields must not change D."""
    A, B, regs = _tile(gen)
    lane, bit = E.e_lane_for(row, chunk)
    nib = (regs.e[lane] >> bit) & 0xF
    swapped = (nib >> 2) | ((nib & 3) << 2)
    e2 = list(regs.e)
    e2[lane] = (e2[lane] & ~(0xF << bit) & E.MASK32) | (swapped << bit)
    a2 = [list(r) for r in regs.a]
    la, j = 4 * (row % 8) + (chunk % 8) // 2, (row // 8) + 2 * (chunk // 8)
    w, y = a2[la][j], 2 * (chunk % 2)
    b0, b1 = (w >> 8 * y) & 0xFF, (w >> 8 * (y + 1)) & 0xFF
    a2[la][j] = (w & ~(0xFFFF << 8 * y) & E.MASK32) | (b1 << 8 * y) | (b0 << 8 * (y + 1))
    zero = [[0] * 4] * 32
    with pytest.raises(ValueError):
        E.mma_sp_emulate(a2, regs.b, zero, e2, 0, ordered=True)
    d = E.mma_sp_emulate(a2, regs.b, zero, e2, 0, ordered=False)
    assert torch.equal(E.d_matrix(d), A.long() @ B.long())


# ------------------------------------------------------------------------------------------
# Lane-major metadata layout and the cross-check against torch's CUTLASS conversion
# ------------------------------------------------------------------------------------------


def torch_meta_to_lane_major(torch_meta, R, K):
    """torch's reordered meta int32 [R, K/32] is, flattened, [K/64][R/16][32 lanes]."""
    return torch_meta.reshape(-1).view(K // 64, R // 16, 32).transpose(0, 1).contiguous()


def lane_major_to_torch_meta(words, R, K):
    return words.transpose(0, 1).contiguous().view(R, K // 32)


def test_lane_major_roundtrip_and_contiguity(gen):
    R, K = 48, 192
    values, meta = E.compress(random_2to4(R, K, gen, degenerate=True))
    words = E.mma_meta_from_logical(meta)
    assert words.shape == (R // 16, K // 64, 32) and words.dtype == torch.int32
    assert torch.equal(E.mma_meta_to_logical(words), meta)
    B = random_b(K, 8, gen)
    for row0 in range(0, R, 16):
        for k0 in range(0, K, 64):
            regs = E.lane_registers(values, meta, B, row0, k0, 0)
            assert regs.e == E.lane_e_from_mma_meta(words, row0, k0)
            # contiguity: e of lane (g, t) = 4 aligned bytes of one row of the logical layout
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                start = k0 // 8 + 4 * (t >> 1)
                assert start % 4 == 0
                row = meta[row0 + g + 8 * (t & 1), start:start + 4].tolist()
                assert regs.e[lane] == sum(b << (8 * i) for i, b in enumerate(row))


def test_torch_cutlass_conversion_agrees(gen):
    R, K, N = 48, 192, 24
    A = random_2to4(R, K, gen)  # exactly two non-zeros per chunk: encodings coincide
    values, meta = E.compress(A)
    t_sparse, t_meta = sparse_semi_structured_from_dense_cutlass(A)
    assert t_meta.dtype == torch.int32 and t_meta.shape == (R, K // 32)
    assert torch.equal(t_sparse, values)
    words = E.mma_meta_from_logical(meta)
    assert torch.equal(torch_meta_to_lane_major(t_meta, R, K), words)
    assert torch.equal(lane_major_to_torch_meta(words, R, K), t_meta)
    # our logical nibbles recovered from torch's meta
    assert torch.equal(E.mma_meta_to_logical(torch_meta_to_lane_major(t_meta, R, K)), meta)
    # emulate from torch's data, with e loaded the way CUTLASS's SM80 warp iterator loads it
    # (lane l of the 16-row group tm, 64-k block tk <- flat word tk*2R + 32*tm + l)
    B = random_b(K, N, gen)
    flat = t_meta.reshape(-1)
    out = torch.zeros(R, N, dtype=torch.int64)
    for row0 in range(0, R, 16):
        for n0 in range(0, N, 8):
            acc = torch.zeros(16, 8, dtype=torch.int64)
            for k0 in range(0, K, 64):
                regs = E.lane_registers(t_sparse, meta, B, row0, k0, n0)
                base = (k0 // 64) * 2 * R + 32 * (row0 // 16)
                e = [int(x) & E.MASK32 for x in flat[base:base + 32].tolist()]
                assert e == regs.e
                acc = E.d_matrix(E.mma_sp_emulate(regs.a, regs.b, E.c_registers(acc), e, 0))
            out[row0:row0 + 16, n0:n0 + 8] = acc
    assert torch.equal(out, A.long() @ B.long())


def test_torch_decodes_our_degenerate_choices(gen):
    """Chunks with < 2 non-zeros: torch picks other padding positions (e.g. all-zero chunk ->
    0b1110, ours 0b0100), but both are valid and torch's decoder reproduces the dense matrix
    from our values + meta."""
    R, K = 32, 128
    A = random_2to4(R, K, gen, degenerate=True)
    values, meta = E.compress(A)
    t_meta = lane_major_to_torch_meta(E.mma_meta_from_logical(meta), R, K)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, t_meta), A)
    zero = torch.zeros(16, 64, dtype=torch.int8)
    _, tz = sparse_semi_structured_from_dense_cutlass(zero)
    assert (tz.view(-1) & 0xF).unique().tolist() == [0b1110]
    assert E.meta_nibbles(E.logical_meta(zero)).unique().tolist() == [0b0100]
