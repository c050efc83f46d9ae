// The index arithmetic and the epilogue of the 2:4-sparse int8 GEMM (sparse24_int8_linear.cu),
// shared with its host transcription (host_check.cpp) so that both run the same code.
//
// y[m, n] = epilogue(sum_k x[m, k] * W[n, k]) with W 2:4-sparse along K, stored compressed
// (effkern/ops/sparse24.py): values int8 [N, K/2] (the two kept values of each group of four,
// in k order) and meta uint8 [N, K/8] (per group the nibble i0 | i1 << 2 of its kept positions,
// group 2j in the low nibble of byte j).  The product runs on
//
//   mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32
//
// with the weight as the sparse operand A (16 output channels x 64 k) and x as B (64 k x 8
// tokens), so a block computes a tile of y^T.  Lane (g = lane / 4, t = lane % 4) holds
// (tests/sparse_mma_emulation.py has the table and its sources):
//   a[j]: values[row g + 8 (j & 1), compressed k 16 (j >> 1) + 4t .. + 3]
//   b[j]: x[token g, k 16 j + 4t .. + 3]
//   e:    meta[row g + 8 (t & 1), bytes 4 (t >> 1) .. + 3] (32 consecutive k of one row)
//   c:    (row g, tokens 2t, 2t + 1), (row g + 8, tokens 2t, 2t + 1)
// so every operand is a 32-bit slice of a row of the stored format: A and B come from shared
// memory through ldmatrix (x4: four 8 x 16-byte matrices), e with one 32-bit shared load.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kernels/common/host_device.h"
#include "kernels/common/split_k.h"

namespace effkern {
namespace sparse24 {

constexpr int kStepK = 64;       // dense K per pipeline stage (one MMA)
constexpr int kThreads = 128;    // four warps
constexpr int kBlockRows = 128;  // output channels (weight rows) per block
constexpr int kStages = 3;

// Bytes per row and K step of each operand tile in shared memory.
constexpr int kValueBytes = kStepK / 2;  // 32: two 16-byte chunks
constexpr int kMetaBytes = kStepK / 8;   // 8
constexpr int kXBytes = kStepK;          // 64: four 16-byte chunks
// The metadata of rows past N (their values are zero-filled): positions (0, 1) in every group,
// since the all-zero nibble is undefined for mma.sp.
constexpr uint64_t kPaddingMeta = 0x4444444444444444ull;

// ---- shared-memory swizzles (conflict-free ldmatrix) --------------------------------------
// ldmatrix reads one 16-byte chunk of eight consecutive rows per matrix.  Values rows are two
// chunks (32 bytes): rows r and r + 4 would share banks, so chunk bit 0 flips with row bit 2.
EK_HD int value_chunk_slot(int row, int chunk) { return row * 2 + (chunk ^ ((row >> 2) & 1)); }
// x rows are four chunks (64 bytes): rows r, r + 2, r + 4, r + 6 would share banks.
EK_HD int x_chunk_slot(int row, int chunk) { return row * 4 + (chunk ^ ((row >> 1) & 3)); }

// The (row, 16-byte chunk) whose address lane `lane` gives to ldmatrix.x4 for the A fragment
// of the 16-row tile at row0: matrices 0..3 = (rows 0-7, chunk 0), (rows 8-15, chunk 0),
// (rows 0-7, chunk 1), (rows 8-15, chunk 1) -> a[0..3] as in the table above.
EK_HD void a_ldmatrix_source(int row0, int lane, int* row, int* chunk) {
  const int matrix = lane / 8;
  *row = row0 + (lane % 8) + 8 * (matrix & 1);
  *chunk = matrix >> 1;
}
// For the B fragment of the 8 tokens at tok0: matrix j = (tokens 0-7, chunk j) -> b[j].
EK_HD void b_ldmatrix_source(int tok0, int lane, int* row, int* chunk) {
  *row = tok0 + (lane % 8);
  *chunk = lane / 8;
}
// The metadata word of lane `lane` for the 16-row tile at row0: (row, byte offset in the step).
EK_HD void meta_source(int row0, int lane, int* row, int* byte) {
  const int t = lane % 4;
  *row = row0 + lane / 4 + 8 * (t & 1);
  *byte = 4 * (t >> 1);
}

// ---- the epilogue (effkern/ops/sparse24.py specifies this float order) ---------------------

enum class OutKind : int { I32 = 0, BF16 = 1, F16 = 2, I8 = 3, F32 = 4 };
enum class Activation : int { None = 0, ReLU = 1, GELU = 2 };

EK_HD int32_t saturating_add(int32_t a, int32_t b) {
  const int64_t s = static_cast<int64_t>(a) + b;
  return s > INT32_MAX ? INT32_MAX : (s < INT32_MIN ? INT32_MIN : static_cast<int32_t>(s));
}

// v = float32(acc) * float32(x_scale * w_scale) + bias, then the activation.
EK_HD float epilogue_value(int32_t acc, float x_scale, float w_scale, float bias, Activation act) {
  const float s = x_scale * w_scale;
#if defined(__CUDA_ARCH__)
  // no fused multiply-add: the reference rounds the product and the sum separately
  float v = __fadd_rn(__fmul_rn(static_cast<float>(acc), s), bias);
#else
  float v = static_cast<float>(acc) * s + bias;  // ISO C++ (-std=c++17): no contraction
#endif
  if (act == Activation::ReLU) v = v > 0.f ? v : 0.f;
  if (act == Activation::GELU) v = 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
  return v;
}

// int8 requantisation: clamp(rint(v * inv_out_scale), -128, 127), round half to even.
EK_HD int8_t requantize_int8(float v, float inv_out_scale) {
  float q = v * inv_out_scale;
  q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
  return static_cast<int8_t>(nearbyintf(q));  // the current rounding mode: to nearest even
}

// ---- the launch plan -----------------------------------------------------------------------

struct Plan {
  int block_tokens;  // 16 (few tokens) or 64
  int64_t tok_tiles;  // grid.x
  int row_tiles;      // grid.y
  int split_k;        // grid.z: K ranges whose int32 partials a second kernel sums
  int steps_per_split;
};

// 128 output channels x 16 tokens (few tokens) or x 64; K split by split_k_plan
// (kernels/common/split_k.h).
EK_HD Plan make_plan(int64_t M, int64_t N, int64_t K, int sms) {
  Plan p;
  p.block_tokens = M <= 16 ? 16 : 64;
  p.tok_tiles = (M + p.block_tokens - 1) / p.block_tokens;
  p.row_tiles = static_cast<int>((N + kBlockRows - 1) / kBlockRows);
  const SplitK s = split_k_plan(p.tok_tiles * p.row_tiles, static_cast<int>((K + kStepK - 1) / kStepK), sms);
  p.split_k = s.split_k;
  p.steps_per_split = s.steps_per_split;
  return p;
}

// Warps of a block: 64 tokens -> 2 x 2 warps of 64 rows x 32 tokens; 16 tokens -> 4 x 1 of
// 32 rows x 16 tokens.
template <int kBlockTokens>
struct WarpTile {
  static constexpr int kWarpsTok = kBlockTokens == 16 ? 1 : 2;
  static constexpr int kRows = kBlockRows / (4 / kWarpsTok);
  static constexpr int kTokens = kBlockTokens / kWarpsTok;
  static constexpr int kFragsRow = kRows / 16;
  static constexpr int kFragsTok = kTokens / 8;
  EK_HD static int row0(int warp) { return (warp / kWarpsTok) * kRows; }
  EK_HD static int tok0(int warp) { return (warp % kWarpsTok) * kTokens; }
};

}  // namespace sparse24
}  // namespace effkern
