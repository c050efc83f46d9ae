"""Register-level CPU emulation of the 2:4 sparse int8 tensor-core MMA

    mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32  d, a, b, c, e, f;

(sm_80 and later, so also sm_90), written before any GPU was available so that a CUDA kernel can
be developed against an exact, tested model of which lane holds what. Pure torch/python, CPU.

Shapes: A is 16 x 64 (rows = output channels, 2:4 structured sparse along K, passed compressed:
16 x 32 kept int8 values + 2-bit indices), B is 64 x 8 (K x tokens), C/D are 16 x 8 int32.

Notation: lane = %laneid (0..31), g = groupID = lane >> 2 (0..7), t = threadID_in_group =
lane % 4 (0..3). "byte b" of a .b32 register is bits [8b+7 : 8b] (little endian, b = 0 lowest);
element i of a fragment vector lives at byte i % 4 of register i // 4 ("low to high" order).
Tile origin: rows row0.., dense K k0.. (k0 % 64 == 0), tokens n0...

Mapping table (what each lane holds)
------------------------------------
A: four .b32 registers a[0..3]; each holds the 4 kept (non-zero) values of 8 consecutive dense
   columns (= 2 chunks of 4) of one row, in increasing k order (chunk 2x's two kept values in bytes
   0,1, chunk 2x+1's in bytes 2,3; inside a chunk the value at the lower index first):

   | reg  | row      | dense cols            | compressed cols (K/2 space)  |
   |------|----------|-----------------------|------------------------------|
   | a[0] | g        | 8t .. 8t+7            | 4t .. 4t+3                   |
   | a[1] | g + 8    | 8t .. 8t+7            | 4t .. 4t+3                   |
   | a[2] | g        | 32+8t .. 32+8t+7      | 16+4t .. 16+4t+3             |
   | a[3] | g + 8    | 32+8t .. 32+8t+7      | 16+4t .. 16+4t+3             |

   Source: PTX ISA 9.7.14.6.2.6 "Matrix Fragments for sparse mma.m16n8k64 with .u8/.s8/.e4m3/
   .e5m2 type" (row = groupID for a_i, 0<=i<4 || 8<=i<12, else groupID+8; firstcol = 8t for
   i < 8, 8t+32 for i >= 8; lastcol = firstcol+7; the four values are "four non-zero elements
   out of 8 consecutive elements", order "as described in Sparse matrix storage" 9.7.14.6.1).
   Cross-checked with CUTLASS include/cute/atom/mma_traits_sm120_sparse.hpp
   (SM120_SPARSE_16x8x64_TN ALayout: thread (t, g) -> m = g, k = 8t; values (8, 2, 2) ->
   k + v0, m + 8 v1, k + 32 v2) and include/cutlass/arch/mma_sparse_sm80.h (FragmentA =
   Array<int8_t, 16>, i.e. 4 x .b32).
   With our compressed `values` [R, K/2] (kept values in k order) every A register is ONE aligned
   32-bit load: values[row0 + g + 8*(j & 1), k0/2 + 16*(j >> 1) + 4t : +4].

B: four .b32 registers b[0..3], register j byte y holds B[k = 16j + 4t + y, n = g]:

   | reg  | B rows (k)        | B col (n) |
   |------|-------------------|-----------|
   | b[0] | 4t .. 4t+3        | g         |
   | b[1] | 16+4t .. 16+4t+3  | g         |
   | b[2] | 32+4t .. 32+4t+3  | g         |
   | b[3] | 48+4t .. 48+4t+3  | g         |

   Source: PTX ISA 9.7.14.6.2.6, Multiplicand B (four .b32, b0..b15 low to high; the per-lane
   picture is in Figures 132-135, which are images) - the rows are read from CUTLASS
   mma_traits_sm120_sparse.hpp BLayout ((4,8),(4,4)):((32,1),(8,128)) over (N8, K64), i.e.
   n = g, k = 4t + v0 + 16 v1, which is the dense m16n8k32 s8 B layout extended by +32 / +48.
   With B^T stored [N, K] (K contiguous, ".col") each b[j] is one aligned 32-bit load.

C / D: four .s32 registers (PTX 9.7.14.6.2.6: "same as Matrix Fragments for mma.m16n8k16 with
   integer type"; CUTLASS SM120_16x8_Row):

   | reg | row   | col      |
   |-----|-------|----------|
   | c0  | g     | 2t       |
   | c1  | g     | 2t + 1   |
   | c2  | g + 8 | 2t       |
   | c3  | g + 8 | 2t + 1   |

e (metadata, one .b32 per lane) and f (sparsity selector):
   * f must be 0 for m16n8k64 .s8/.u8: "All threads within a group of four consecutive threads
     contribute the sparsity metadata. Hence, the sparsity selector in this case must be 0"
     (PTX 9.7.14.6.1 "Sparse matrix storage"; CUTLASS mma_sparse_sm80.h kMaxID2 = 1 and
     `assert(0)` for id2 != 0). So all 32 lanes supply e.
   * e of lane (g, t) holds 16 2-bit indices = 8 chunks of 4 dense k = 32 consecutive dense k of
     ONE row:  row = g + 8*(t & 1),  dense k = 32*(t >> 1) .. 32*(t >> 1) + 31.
     Bits [4c+3 : 4c] hold chunk c (c = 0..7, dense k = 32*(t>>1) + 4c .. +3); within that nibble
     bits [1:0] = index (0..3) of the first stored value (lower byte of the A register), bits
     [3:2] = index of the second stored value.

     | lane t | row   | dense k of that row |
     |--------|-------|---------------------|
     | 0      | g     | 0 .. 31             |
     | 1      | g + 8 | 0 .. 31             |
     | 2      | g     | 32 .. 63            |
     | 3      | g + 8 | 32 .. 63            |

     Sources (the PTX figures 136/137 that state this are images, so the mapping is derived from
     code and cross-checked): (1) CUTLASS SM80 path: tools/util/include/cutlass/util/
     host_reorder.h reorder_meta (rows of a 16-row group interleaved as 2*(m%8) + m/8, then 2x2
     blocks swizzled "from Z to N"), stored ColumnMajorInterleaved<2> (gemm/threadblock/
     default_mma_core_sparse_sm80.h GmemLayoutE) and copied to a ColumnMajor smem tile, then
     gemm/warp/mma_tensor_op_tile_iterator_sparse.h SparseMmaTensorOpMetaTileIterator loads it
     with ldmatrix (lane l -> 32-bit word l of the 32-word column of its 16-row group) and
     gemm/warp/mma_sparse_tensor_op.h hands that word to the mma as E. Worked through, word l
     of the column is row g + 8(t&1), k-half t>>1. (2) torch/sparse/_semi_structured_conversions.py
     (a reimplementation of the same reorder), see tests/test_sparse_mma_emulation.py, which pins
     this file to it. (3) CUTLASS include/cute/atom/mma_traits_sm120_sparse.hpp ELayout for the
     m16n8k64 sparse atom: ((2,2,8),32):((8,512,1),16) over (M16, K64), i.e. thread
     (a, b, g) = (t&1, t>>1, g) -> m = g + 8a, k = 32b + v (v = 0..31) - the same table.
     The nibble bit order (chunk c at bits 4c..4c+3, index of the first value in the low two
     bits) is CUTLASS tools/util/include/cutlass/util/host_uncompress.h uncompress() and torch's
     sparse_semi_structured_from_dense_cutlass encoding.
   * Valid nibbles: with ::ordered_metadata only 0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110
     (i.e. i0 < i1: "indices ... sorted in an increasing order starting from LSB", PTX 9.7.14.6.3
     and 9.7.14.6.1); everything else is undefined behaviour. For plain mma.sp PTX only names
     0b0000, 0b0101, 0b1010, 0b1111 (equal indices) invalid, so unordered pairs (i0 > i1) are
     allowed there; the layout of a/b/c/d/e is the same for both spellings (one PTX section
     covers both; CUTLASS mma_sparse_sm80.h emits one or the other with identical operands
     depending on the CUDA version). PTX only notes that plain mma.sp "may have substantially
     reduced performance on some target architectures".

Contiguity answer (our logical metadata layout, uint8 [R, K/8], byte j = chunk 2j | chunk 2j+1
<< 4): YES - lane (g, t)'s e is exactly the little-endian 32-bit word made of bytes
[k0/8 + 4*(t>>1), k0/8 + 4*(t>>1) + 4) of row row0 + g + 8*(t & 1); since k0 % 64 == 0 that byte
offset is a multiple of 8, so it is one aligned 32-bit load whenever the row pitch (K/8 bytes)
is a multiple of 4. A warp's 32 loads then touch 16 rows x 8 bytes (16 separate sectors, not
coalesced); mma_meta_from_logical() gives the lane-major layout [R/16, K/64, 32] int32 in which
the warp's 32 words for one tile are one contiguous 128-byte line, plus its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_M, TILE_N, TILE_K = 16, 8, 64
MASK32 = 0xFFFFFFFF
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Nibbles (i0 | i1 << 2) that mma.sp::ordered_metadata accepts (PTX 9.7.14.6.1).
ORDERED_VALID_NIBBLES = (0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110)
# Nibbles PTX names invalid for every mma.sp spelling (both indices equal).
ALWAYS_INVALID_NIBBLES = (0b0000, 0b0101, 0b1010, 0b1111)


# --------------------------------------------------------------------------------------------
# Our storage format: values [R, K/2] int8 (kept values in k order), meta [R, K/8] uint8.
# --------------------------------------------------------------------------------------------


def _check_dense(dense: torch.Tensor) -> None:
    if dense.dim() != 2 or dense.dtype != torch.int8:
        raise ValueError(f"expected a 2-D int8 tensor, got {tuple(dense.shape)} {dense.dtype}")
    if dense.shape[1] % 8:
        raise ValueError(f"K={dense.shape[1]} must be a multiple of 8")


def chunk_positions(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i0, i1) int64 [R, K/4]: the two kept positions of every 4-chunk, i0 < i1.

    The non-zeros are kept; a chunk with fewer than two non-zeros is padded with its
    lowest-index zero positions. More than two non-zeros in a chunk is a ValueError."""
    _check_dense(dense)
    r, k = dense.shape
    nz = dense.view(r, k // 4, 4) != 0
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("not 2:4 sparse: a chunk of 4 has more than 2 non-zeros")
    # Rank: non-zeros first (by index), then zeros (by index); keep the first two.
    rank = (~nz).to(torch.int64) * 4 + torch.arange(4)
    keep = rank.argsort(dim=-1)[..., :2].sort(dim=-1).values
    return keep[..., 0], keep[..., 1]


def _pack_nibbles(i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    nib = (i0 | (i1 << 2)).to(torch.int64)  # [R, K/4]
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def meta_nibbles(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/8] -> int64 [R, K/4] nibbles (chunk c at column c)."""
    m = meta.to(torch.int64)
    return torch.stack((m & 0xF, m >> 4), dim=-1).reshape(meta.shape[0], -1)


def logical_meta(dense: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/8]: chunk c's nibble i0 | i1 << 2 (i0 < i1); byte j = chunk 2j (low nibble)
    | chunk 2j+1 (high nibble)."""
    return _pack_nibbles(*chunk_positions(dense))


def compress(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dense 2:4 int8 [R, K] -> (values int8 [R, K/2], kept values in k order;
    meta uint8 [R, K/8])."""
    i0, i1 = chunk_positions(dense)
    r, k = dense.shape
    d4 = dense.view(r, k // 4, 4)
    v0 = d4.gather(-1, i0[..., None])[..., 0]
    v1 = d4.gather(-1, i1[..., None])[..., 0]
    v = torch.stack((v0, v1), -1)
    return v.reshape(r, k // 2).contiguous(), _pack_nibbles(i0, i1)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of compress(); a nibble that is not one of ORDERED_VALID_NIBBLES is a ValueError."""
    r, kh = values.shape
    nib = meta_nibbles(meta)
    if nib.shape != (r, kh // 2):
        raise ValueError(f"meta {tuple(meta.shape)} does not fit values {tuple(values.shape)}")
    i0, i1 = nib & 3, nib >> 2
    if bool((i0 >= i1).any()):
        raise ValueError("invalid metadata nibble (indices must satisfy i0 < i1)")
    out = torch.zeros(r, kh // 2, 4, dtype=values.dtype)
    v = values.view(r, kh // 2, 2)
    out.scatter_(-1, i0[..., None], v[..., :1])
    out.scatter_(-1, i1[..., None], v[..., 1:])
    return out.view(r, 2 * kh)


# --------------------------------------------------------------------------------------------
# Lane <-> matrix maps (the table in the module docstring, as functions).
# --------------------------------------------------------------------------------------------


def a_reg_source(lane: int, j: int) -> tuple[int, int]:
    """(tile row, first compressed column) of A register j of `lane`; 4 consecutive values."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (j & 1), 16 * (j >> 1) + 4 * t


def b_reg_source(lane: int, j: int) -> tuple[int, int]:
    """(first k, n) of B register j of `lane`; bytes 0..3 are k .. k+3."""
    g, t = lane >> 2, lane & 3
    return 16 * j + 4 * t, g


def c_reg_coord(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of accumulator register i of `lane`."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def e_source(lane: int) -> tuple[int, int]:
    """(tile row, first dense k) covered by `lane`'s metadata word (32 dense k, 8 chunks)."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (t & 1), 32 * (t >> 1)


def e_lane_for(row: int, chunk: int) -> tuple[int, int]:
    """(lane, bit offset) of the nibble of chunk `chunk` (0..15) of tile row `row` (0..15)."""
    return 4 * (row % 8) + (row // 8) + 2 * (chunk // 8), 4 * (chunk % 8)


# --------------------------------------------------------------------------------------------
# Registers as a kernel would load them.
# --------------------------------------------------------------------------------------------


def _word(b4) -> int:
    """Little-endian .b32 from 4 int8/uint8 values (unsigned 32-bit pattern)."""
    w = 0
    for y, x in enumerate(b4):
        w |= (int(x) & 0xFF) << (8 * y)
    return w


def _byte(word: int, y: int, signed: bool = True) -> int:
    x = (word >> (8 * y)) & 0xFF
    return x - 256 if signed and x >= 128 else x


@dataclass
class LaneRegisters:
    """Per-lane operands of one m16n8k64 mma.sp; all words are unsigned 32-bit patterns."""

    a: list  # [32][4]
    b: list  # [32][4]
    e: list  # [32]
    selector: int = 0


def lane_registers(values, meta, B, row0: int, k0: int, n0: int) -> LaneRegisters:
    """Operands of the m16n8k64 tile at (row0, k0, n0) loaded from our storage format.

    values int8 [R, K/2], meta uint8 [R, K/8], B int8 [K, N] (a kernel would keep B^T [N, K] so
    that each b register is one 32-bit load). Every register below is one aligned 4-byte slice:
      a[j] = values[row0 + g + 8(j&1), k0/2 + 16(j>>1) + 4t : +4]
      b[j] = B^T[n0 + g, k0 + 16j + 4t : +4]
      e    = meta[row0 + g + 8(t&1), k0/8 + 4(t>>1) : +4]    (selector 0)
    """
    if row0 % TILE_M or k0 % TILE_K or n0 % TILE_N:
        raise ValueError("tile origin must be a multiple of (16, 64, 8)")
    bt = B.t()
    a, b, e = [], [], []
    for lane in range(32):
        a.append([])
        b.append([])
        for j in range(4):
            r, cc = a_reg_source(lane, j)
            a[lane].append(_word(values[row0 + r, k0 // 2 + cc : k0 // 2 + cc + 4].tolist()))
            kk, n = b_reg_source(lane, j)
            b[lane].append(_word(bt[n0 + n, k0 + kk : k0 + kk + 4].tolist()))
        r, kk = e_source(lane)
        e.append(_word(meta[row0 + r, (k0 + kk) // 8 : (k0 + kk) // 8 + 4].tolist()))
    return LaneRegisters(a=a, b=b, e=e, selector=0)


def c_registers(C: torch.Tensor) -> list:
    """[32][4] accumulator registers (signed ints) from a 16 x 8 matrix."""
    return [[int(C[c_reg_coord(l, i)]) for i in range(4)] for l in range(32)]


def d_matrix(d) -> torch.Tensor:
    """16 x 8 int64 matrix from [32][4] accumulator registers."""
    out = torch.zeros(TILE_M, TILE_N, dtype=torch.int64)
    for l in range(32):
        for i in range(4):
            out[c_reg_coord(l, i)] = int(d[l][i])
    return out


# --------------------------------------------------------------------------------------------
# The instruction.
# --------------------------------------------------------------------------------------------


def dense_a_from_registers(a_regs, e, selector: int = 0, ordered: bool = True) -> torch.Tensor:
    """Reconstruct the dense 16 x 64 A tile the hardware multiplies (int64)."""
    if selector != 0:
        raise ValueError("sparsity selector must be 0 for m16n8k64 .s8 (PTX 9.7.14.6.1)")
    A = torch.zeros(TILE_M, TILE_K, dtype=torch.int64)
    for row in range(TILE_M):
        for chunk in range(TILE_K // 4):
            # values: chunk -> register (row half, k half), lane t = (chunk % 8) // 2, bytes
            # 2*(chunk % 2), +1
            lane_a = 4 * (row % 8) + (chunk % 8) // 2
            word = int(a_regs[lane_a][(row // 8) + 2 * (chunk // 8)]) & MASK32
            v0, v1 = _byte(word, 2 * (chunk % 2)), _byte(word, 2 * (chunk % 2) + 1)
            lane_e, bit = e_lane_for(row, chunk)
            nib = ((int(e[lane_e]) & MASK32) >> bit) & 0xF
            i0, i1 = nib & 3, nib >> 2
            if i0 == i1 or (ordered and i0 > i1):
                raise ValueError(
                    f"undefined behaviour: metadata nibble {nib:#06b} (row {row}, chunk {chunk},"
                    f" lane {lane_e}, bits {bit + 3}..{bit}) for "
                    f"{'mma.sp::ordered_metadata' if ordered else 'mma.sp'}"
                )
            A[row, 4 * chunk + i0] = v0
            A[row, 4 * chunk + i1] = v1
    return A


def dense_b_from_registers(b_regs) -> torch.Tensor:
    """The 64 x 8 B tile (int64) from [32][4] registers."""
    B = torch.zeros(TILE_K, TILE_N, dtype=torch.int64)
    for lane in range(32):
        for j in range(4):
            kk, n = b_reg_source(lane, j)
            w = int(b_regs[lane][j]) & MASK32
            for y in range(4):
                B[kk + y, n] = _byte(w, y)
    return B


def mma_sp_emulate(a_regs, b_regs, c, e, selector: int = 0, *, ordered: bool = True,
                   satfinite: bool = False) -> list:
    """d[32][4] (signed int32) = A*B + C, mma.sp{::ordered_metadata}.m16n8k64.s32.s8.s8.s32.

    Only the lane registers are used. The product is exact (int64); the sum is then wrapped to
    int32 (no .satfinite: "the accumulated value is wrapped") or clamped (.satfinite). Undefined
    metadata (see module docstring) or selector != 0 raises ValueError."""
    A = dense_a_from_registers(a_regs, e, selector, ordered)
    B = dense_b_from_registers(b_regs)
    C = d_matrix(c)
    D = A @ B + C
    if satfinite:
        D = D.clamp(INT32_MIN, INT32_MAX)
    else:
        D = ((D - INT32_MIN) % 2**32) + INT32_MIN
    return c_registers(D)


# --------------------------------------------------------------------------------------------
# Lane-major metadata layout (one coalesced 128-byte line of e words per warp and tile).
# --------------------------------------------------------------------------------------------


def _meta_gather_index(R: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, word column) of logical meta viewed as int32 [R, K/32] for out[tm, tk, lane]."""
    lane = torch.arange(32)
    g, t = lane >> 2, lane & 3
    tm = torch.arange(R // TILE_M)[:, None, None]
    tk = torch.arange(K // TILE_K)[None, :, None]
    rows = tm * TILE_M + (g + 8 * (t & 1))[None, None, :]
    cols = tk * 2 + (t >> 1)[None, None, :]
    return rows.expand(R // TILE_M, K // TILE_K, 32), cols.expand(R // TILE_M, K // TILE_K, 32)


def _as_words(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/8] -> int32 [R, K/32] (little endian, as a 32-bit load sees it)."""
    b = meta.to(torch.int64).view(meta.shape[0], -1, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _from_words(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & MASK32
    b = torch.stack([(w >> (8 * y)) & 0xFF for y in range(4)], -1)
    return b.reshape(words.shape[0], -1).to(torch.uint8)


def mma_meta_from_logical(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/8] (R % 16 == 0, K % 64 == 0) -> int32 [R/16, K/64, 32]: out[tm, tk, lane]
    is the e operand of `lane` for the tile (16 tm, 64 tk); a kernel reads it with one aligned
    32-bit load at word offset (tm * K/64 + tk) * 32 + lane."""
    R, K = meta.shape[0], meta.shape[1] * 8
    if R % TILE_M or K % TILE_K:
        raise ValueError(f"meta for R={R}, K={K}: need R % 16 == 0 and K % 64 == 0")
    rows, cols = _meta_gather_index(R, K)
    return _as_words(meta)[rows, cols].contiguous()


def mma_meta_to_logical(words: torch.Tensor) -> torch.Tensor:
    """Inverse of mma_meta_from_logical: int32 [R/16, K/64, 32] -> uint8 [R, K/8]."""
    R, K = words.shape[0] * TILE_M, words.shape[1] * TILE_K
    rows, cols = _meta_gather_index(R, K)
    w = torch.zeros(R, K // 32, dtype=torch.int32)
    w[rows, cols] = words.to(torch.int32)
    return _from_words(w)


def lane_e_from_mma_meta(words: torch.Tensor, row0: int, k0: int) -> list:
    """The 32 e operands (unsigned patterns) of tile (row0, k0) from the lane-major layout."""
    return [int(x) & MASK32 for x in words[row0 // TILE_M, k0 // TILE_K].tolist()]
