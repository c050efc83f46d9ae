// The index arithmetic and integer decoding of the shift GEMM (shift_linear.cu), shared with
// its host transcription (host_check.cpp) so that both run the same code.  No CUDA calls here.
//
// The tile product runs on mma.sync m16n8k16 (bf16 or fp16 operands, float32 accumulators).
// Each K step of 64 is four MMAs.  Which physical k of the step a lane's fragment registers
// hold is our choice as long as A and B agree, so it is chosen for wide, conflict-free
// shared-memory reads of both operands: lane (g = lane / 4, t = lane % 4) holds
//
//   k in {8t .. 8t+7}  and  {32 + 8t .. 32 + 8t + 7}
//
// which is one 16-byte read of x per row and half, and for the weight codes one 8-byte read per
// half (5-bit: a byte per code) or per step (4-bit: byte j of a 64-group holds k = j in its low
// nibble and k = 32 + j in its high one, effkern/ops/shift.py).  MMA q = 2h + s (h: which half,
// s: which 4 of the 8) uses k = 32h + 8t + 4s + {0, 1} in the PTX ISA's fragment slots "2t,
// 2t + 1" and k = 32h + 8t + 4s + {2, 3} in slots "2t + 8, 2t + 9"; over the four lanes t that is
// every k of the step once.
#pragma once

#include <stdint.h>
#include <string.h>

#include "kernels/common/host_device.h"
#include "kernels/common/split_k.h"

namespace effkern {
namespace shift {

constexpr int kStepK = 64;        // K per pipeline stage (= the 4-bit packing group, SHIFT4_GROUP)
constexpr int kThreads = 128;     // four warps per block
constexpr int kBlockN = 128;      // output columns per block
constexpr int kStages = 3;        // cp.async pipeline depth

// Bytes of one weight row's codes per K step: a byte per code (5-bit) or a nibble (4-bit).
template <int kBits>
constexpr int kCodeBytes = kBits == 5 ? kStepK : kStepK / 2;

// ---- shared-memory layouts (XOR swizzles: conflict-free fragment reads) -------------------
//
// x tile: rows of 64 elements = eight 16-byte chunks.  The read of a quarter warp (rows g and
// g + 1, chunks t or 4 + t) would hit the same banks in both rows; flipping chunk bit 2 on odd
// rows separates them.
EK_HD int x_chunk_slot(int row, int chunk) { return row * 8 + (chunk ^ ((row & 1) << 2)); }

// 5-bit codes: rows of 64 bytes = four 16-byte chunks; a half warp reads 8 bytes of rows
// g = 0..3, which would pair rows g and g + 2 on the same banks: flip chunk bit 1 on rows with
// bit 1 set.  4-bit codes: rows of 32 bytes, already conflict-free.
EK_HD int code_chunk_slot(int row, int chunk, int bits) {
  return bits == 5 ? row * 4 + (chunk ^ (row & 2)) : row * 2 + chunk;
}

// Byte offset, in a stage's code tile, of the 8 code bytes lane t reads for half h of row n.
EK_HD int code_read_offset(int n, int t, int h, int bits) {
  if (bits == 4) return n * 32 + 8 * t;  // both halves: low and high nibbles of the same bytes
  const int byte = 32 * h + 8 * t;        // within the row's 64 bytes
  return 16 * code_chunk_slot(n, byte / 16, 5) + byte % 16;
}

// ---- decoding codes into MMA operands ------------------------------------------------------

// PTX prmt.b32 with a zero second operand (selector nibbles 0-3: bytes of w, 4-7: zero).
EK_HD uint32_t byte_perm0(uint32_t w, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(w), "r"(sel));
  return r;
#else
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 7;
    const uint32_t byte = s < 4 ? (w >> (8 * s)) & 0xFF : 0;
    r |= byte << (8 * i);
  }
  return r;
#endif
}

// Two codes (one per 16-bit half of `pair`, low half first in k) -> two 16-bit floats
// (-1)^sign * 2^(mag - 1), or +0 for magnitude 0; bf16 if kBf16 else fp16.  Integer ops only,
// both halves at once: mag <= 15 keeps every lane's sum below 2^16.
template <bool kBf16, int kBits>
EK_HD uint32_t decode_pair(uint32_t pair) {
  constexpr uint32_t kMagMask = ((1u << (kBits - 1)) - 1) * 0x00010001u;
  constexpr uint32_t kSignBit = (1u << (kBits - 1)) * 0x00010001u;
  constexpr int kMantissaBits = kBf16 ? 7 : 10;
  constexpr uint32_t kBiasMinusOne = (kBf16 ? 126u : 14u) * 0x00010001u;  // exponent bias - 1
  const uint32_t mag = pair & kMagMask;
  const uint32_t sign = (pair & kSignBit) << (16 - kBits);  // the sign bit to bit 15 of each half
  const uint32_t value = sign | ((mag + kBiasMinusOne) << kMantissaBits);
  // bit (kBits - 1) of mag + (2^(kBits-1) - 1) is set exactly when mag >= 1
  const uint32_t nonzero = ((mag + kMagMask) & kSignBit) >> (kBits - 1);  // 0 or 1 per half
  return value & (nonzero * 0xFFFFu);
}

// The B fragment of MMA (h, s) from the 8 code bytes a lane read for half h (5-bit) or for the
// step (4-bit): words[0] = bytes 0..3, words[1] = bytes 4..7.  reg[0]: k = .. + 4s + {0, 1};
// reg[1]: k = .. + 4s + {2, 3}.
template <bool kBf16, int kBits>
EK_HD void b_fragment(const uint32_t words[2], int h, int s, uint32_t reg[2]) {
  uint32_t w = words[s];
  if (kBits == 4) w = (h == 0 ? w : w >> 4) & 0x0F0F0F0Fu;  // the half's nibbles, a byte each
  reg[0] = decode_pair<kBf16, kBits>(byte_perm0(w, 0x4140u));  // bytes 0, 1 -> 16-bit halves
  reg[1] = decode_pair<kBf16, kBits>(byte_perm0(w, 0x4342u));  // bytes 2, 3
}

// The A fragment of MMA (h, s) from the x words a lane read: rows[r][h] = the 4 words (8 k) of
// row g + 8r, half h.  PTX slots: a0a1 (row g, k 2t..), a2a3 (row g+8), a4a5 (row g, k 2t+8..),
// a6a7 (row g+8) <- words 2s, 2s, 2s + 1, 2s + 1.
EK_HD void a_fragment(const uint32_t rows[2][2][4], int h, int s, uint32_t reg[4]) {
  reg[0] = rows[0][h][2 * s];
  reg[1] = rows[1][h][2 * s];
  reg[2] = rows[0][h][2 * s + 1];
  reg[3] = rows[1][h][2 * s + 1];
}

// The code of weight (n, k) in either packing (effkern/ops/shift.py), from a row-major
// [N, code_cols] code matrix.
EK_HD uint32_t code_at(const uint8_t* codes, int64_t n, int64_t k, int64_t code_cols, int bits) {
  if (bits == 5) return codes[n * code_cols + k];
  const int64_t group = k / kStepK, j = k % kStepK;
  const uint8_t byte = codes[n * code_cols + 32 * group + (j % 32)];
  return j < 32 ? byte & 0xF : byte >> 4;
}

// 2^e as a float32 (e in [-126, 127]: a normal number), built from its bits.
EK_HD float exp2_int(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

// ---- DeepShift's integer shift-add (deepshift_linear.cu) ----------------------------------

// A code as DeepShift applies it to a 16.16 fixed-point input: the right shift -p (>= 0; 31
// gives the same floor as any larger one on an int32) and the sign and zero masks, packed as
// shift | negative << 8 | zero << 9 so that a block decodes each weight once.
EK_HD uint32_t deepshift_pack(uint32_t code, int base, int bits) {
  const uint32_t half = 1u << (bits - 1);
  const uint32_t mag = code & (half - 1);
  int right = 1 - static_cast<int>(mag) - base;  // -p
  right = right < 0 ? 0 : (right > 31 ? 31 : right);
  return static_cast<uint32_t>(right) | ((code & half) ? 1u << 8 : 0u) | (mag == 0 ? 1u << 9 : 0u);
}

// s * floor(x / 2^-p) for a packed weight (0 for a zero weight): an arithmetic shift, negated
// in 64 bits (-(-2^31) does not fit an int32).
EK_HD int64_t deepshift_term(int32_t x, uint32_t packed) {
  const int64_t shifted = x >> (packed & 31);
  const int64_t signed_term = (packed >> 8) & 1 ? -shifted : shifted;
  return (packed >> 9) & 1 ? 0 : signed_term;
}

// ---- the launch plan -----------------------------------------------------------------------

struct Plan {
  int block_m;      // 16 (small M: the whole block along N) or 64
  int64_t m_tiles;  // grid.x
  int n_tiles;      // grid.y
  int split_k;      // grid.z: K ranges summed by the reduction kernel when > 1
  int steps_per_split;
};

// 16 x 128 tiles at small M, else 64 x 128; K split by split_k_plan (kernels/common/split_k.h).
EK_HD Plan make_plan(int64_t M, int64_t N, int64_t K, int sms) {
  Plan p;
  p.block_m = M <= 16 ? 16 : 64;
  p.m_tiles = (M + p.block_m - 1) / p.block_m;
  p.n_tiles = static_cast<int>((N + kBlockN - 1) / kBlockN);
  const SplitK s = split_k_plan(p.m_tiles * p.n_tiles, static_cast<int>((K + kStepK - 1) / kStepK), sms);
  p.split_k = s.split_k;
  p.steps_per_split = s.steps_per_split;
  return p;
}

// Warp tiling of a block: block_m 64 -> 2 x 2 warps of 32 x 64; block_m 16 -> 1 x 4 of 16 x 32.
template <int kBlockM>
struct WarpTile {
  static constexpr int kWarpsN = kBlockM == 16 ? 4 : 2;
  static constexpr int kM = kBlockM == 16 ? 16 : 32;  // rows per warp
  static constexpr int kN = kBlockN / kWarpsN;        // columns per warp
  static constexpr int kFragsM = kM / 16;
  static constexpr int kFragsN = kN / 8;
  EK_HD static int row0(int warp) { return (warp / kWarpsN) * kM; }
  EK_HD static int col0(int warp) { return (warp % kWarpsN) * kN; }
};

}  // namespace shift
}  // namespace effkern
