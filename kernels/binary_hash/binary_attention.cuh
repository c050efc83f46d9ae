// Per-thread device code of the binary-hash attention kernels and their
// thread layouts, shared with the host transcription (host_check.cpp).
//
// Every helper is __host__ __device__ under nvcc and plain C++ elsewhere (the
// element types F16 / BF16 / F32 come from kernels/common/vec_rows.cuh, the
// EK_HD macro from kernels/common/host_device.h, num_words and kShiftAddEps
// from kernels/common/constants.h), so the kernels (binary_attention.cu) and
// the host check run the exact same arithmetic, thread by thread.
//
// Pass 1 (kv_accumulate / kv_store): KV[bh, i, c] = sum_j h_k[j, i] v[j, c] and ksum[bh, i]
// = sum_j h_k[j, i], split over tokens.  The tokens of a head are cut into `splits` chunks of
// `chunk` tokens (kv_chunk / kv_splits in binary_hash_launch.h: a function of N alone, so a
// head's result does not depend on B, H or the GPU).  One warp per item (bh, split s, group g
// of kKvBits code bits), kKvWarps items per block, grid-strided: kColGroups lanes per token
// row (kKvCols columns each, 16-byte loads), kSlots token slots, every lane all kKvBits bits
// of the group, so the warps are full at any nbits.  The slots are summed by an xor butterfly
// (__shfl_xor_sync; fixed order), then stored: with one split straight into KV and ksum,
// otherwise into split s's slab of a partials buffer that pass 1b (kv_reduce) sums in
// ascending s.  No atomics: deterministic, and the host check runs the same order.
//
// Pass 2 (token_partial / token_store): one warp per token, kTokensPerWarp
// tokens per warp, kBlock / 32 warps per block, blocks over (bh, token tile),
// grid-strided.  Lane l owns columns l, l + 32, ... (D / 32 of them): num =
// sum_i s_i KV[i, c] over the q code's bits (s_i = +-1 signed, skipped when 0
// unsigned), den = sum_i s_i ksum[i] in int64 (exact).  The shiftadd norm is a
// butterfly (xor 16, 8, 4, 2, 1) over the warp's 32 partial sums of squares.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/common/constants.h"
#include "kernels/common/host_device.h"
#include "kernels/common/vec_rows.cuh"

namespace effkern {
namespace binary_hash {

using effkern::BF16;
using effkern::F16;
using effkern::F32;
using effkern::kShiftAddEps;
using effkern::num_words;

constexpr int kBlock = 256;                    // threads per block, pass 1b and pass 2
constexpr int kWarps = kBlock / 32;
constexpr int kKvBlock = 128;                  // threads per pass-1 block
constexpr int kKvWarps = kKvBlock / 32;        // pass-1 work items per block, one per warp
// 8 bits an item: a lane's 8 x 8 sums fit in 128 registers (4 blocks, 16 warps per SM) with
// no spills; 16 bits took 168-255 registers and spilled.
constexpr int kKvMinBlocks = 4;                // pass-1 blocks per SM the registers must allow
constexpr int kKvBits = 8;                     // code bits per pass-1 item
constexpr int kKvCols = 8;                     // columns per pass-1 lane
constexpr int kKvUnroll = 2;                   // tokens a pass-1 lane loads before using them
constexpr int kTokensPerWarp = 4;
constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;  // pass-2 token tile
constexpr int64_t kMaxGrid = 1 << 20;          // blocks; more work is grid-strided
constexpr float kInvPi = 0.318309886183790671537767526745028724f;

template <int D> struct Layout {
  static_assert(D == 32 || D == 64 || D == 128, "d must be 32, 64 or 128");
  static constexpr int kColsPerLane = D / 32;            // pass 2
};

// ---- pass 1: KV and ksum, split over tokens ------------------------------------------------

// The unit of pass-1 work, one per warp: head bh, token split s (tokens j0 <= j < j1), code bits
// kKvBits g .. kKvBits g + kKvBits - 1.  Items are numbered with g fastest, then s, then bh, so
// the warps of one block read the same tokens of v.
struct KvItem {
  int64_t bh, s, j0, j1;
  int g;
};

EK_HD int64_t kv_groups(int64_t nbits) { return (nbits + kKvBits - 1) / kKvBits; }

EK_HD int64_t kv_items(int64_t BH, int64_t nbits, int64_t splits) {
  return BH * splits * kv_groups(nbits);
}

EK_HD KvItem kv_item(int64_t item, int64_t N, int64_t nbits, int64_t chunk, int64_t splits) {
  const int64_t G = kv_groups(nbits);
  const int64_t r = item / G;
  KvItem it;
  it.g = (int)(item % G);
  it.s = r % splits;
  it.bh = r / splits;
  it.j0 = it.s * chunk;
  it.j1 = it.j0 + chunk < N ? it.j0 + chunk : N;
  return it;
}

// Pass-1 blocks for `items` work items (kKvWarps per block), at most max_grid; more are
// grid-strided.
EK_HD int64_t kv_grid(int64_t items, int64_t max_grid) {
  const int64_t blocks = (items + kKvWarps - 1) / kKvWarps;
  return blocks < max_grid ? blocks : max_grid;
}

// v's rows move in 16-byte vectors when its base is 16-byte aligned (a row is 64 bytes or more,
// so every row then is); otherwise element by element.
EK_HD bool vec16_aligned(const void* p) { return (uintptr_t)p % 16 == 0; }

// Lane layout of pass 1 for head dim D: kColGroups lanes cover one token's row, kKvCols
// columns each (one 16-byte vector of 16-bit elements, two of float32); the warp's kSlots
// token slots take tokens j0 + slot, j0 + slot + kSlots, ...
template <int D> struct KvLayout {
  static_assert(D == 32 || D == 64 || D == 128, "d must be 32, 64 or 128");
  static constexpr int kColGroups = D / kKvCols;           // 4, 8, 16
  static constexpr int kSlots = 32 / kColGroups;           // 8, 4, 2
  // bits whose set tokens a lane counts: bit cg + kColGroups m, m < kCounted, if < kKvBits
  static constexpr int kCounted = (kKvBits + kColGroups - 1) / kColGroups;
};

// Element e of a lane's kKvCols columns is column kv_col(cg, e) of the row: 16-bit types
// 8 cg + e; float32 two vectors, e < 4 at 4 cg + e and e >= 4 at D / 2 + 4 cg + e - 4 (each
// vector load contiguous over the warp).
template <typename T, int D>
EK_HD int kv_col(int cg, int e) {
  constexpr int kPerVec = 16 / (int)sizeof(typename T::storage);  // 8 or 4
  constexpr int kVecs = kKvCols / kPerVec;                         // 1 or 2
  return (e / kPerVec) * (D / kVecs) + cg * kPerVec + e % kPerVec;
}

EK_HD void vec_words(const Vec<16>& r, uint32_t (&w)[4]) {
#if defined(__CUDACC__)
  w[0] = r.x;
  w[1] = r.y;
  w[2] = r.z;
  w[3] = r.w;
#else
  memcpy(w, r.b, 16);
#endif
}

EK_HD Vec<16> words_vec(const uint32_t (&w)[4]) {
#if defined(__CUDACC__)
  return make_uint4(w[0], w[1], w[2], w[3]);
#else
  Vec<16> r;
  memcpy(r.b, w, 16);
  return r;
#endif
}

// x[e] = v[row, kv_col(cg, e)] as float.
template <typename T, int D>
EK_HD void kv_load_token(const typename T::storage* row, int cg, bool vec_ok, float (&x)[kKvCols]) {
  using S = typename T::storage;
  constexpr int kPerVec = 16 / (int)sizeof(S);
  constexpr int kVecs = kKvCols / kPerVec;
  EK_UNROLL
  for (int u = 0; u < kVecs; ++u) {
    const S* p = row + kv_col<T, D>(cg, u * kPerVec);
    if (vec_ok) {
      uint32_t w[4];
      vec_words(load_vec(reinterpret_cast<const Vec<16>*>(p)), w);
      EK_UNROLL
      for (int q = 0; q < 4; ++q) {
        if constexpr (sizeof(S) == 2) {
          x[u * kPerVec + 2 * q] = T::load((S)(w[q] & 0xffffu));
          x[u * kPerVec + 2 * q + 1] = T::load((S)(w[q] >> 16));
        } else {
          x[u * kPerVec + q] = f32_from_bits(w[q]);
        }
      }
    } else {
      EK_UNROLL
      for (int e = 0; e < kPerVec; ++e) x[u * kPerVec + e] = T::load(p[e]);
    }
  }
}

// Pass 1, lane `lane` of the warp on item `it`: acc[e][k] = sum over the lane's tokens j of
// h_k[j, i] v[j, kv_col(cg, e)] (i = kKvBits g + k; h = +-1 signed, 0/1 unsigned), in ascending
// j, one fmaf each (h v is exact, so each step rounds once, as acc + (on ? x : -x) would);
// cnt[m] = tokens with bit cg + kColGroups m set.  Tokens are loaded kKvUnroll at a time before
// use; a slot past j1 counts as v = 0 with no bits set, which leaves acc and cnt exactly as
// they are.  Bits of the group beyond nbits are summed too and never stored.
template <typename T, int D>
EK_HD void kv_accumulate(const typename T::storage* v, const int32_t* k_codes, const KvItem& it,
                         int lane, int64_t N, int64_t nbits, bool is_signed, bool vec_ok,
                         float (&acc)[kKvCols][kKvBits], int32_t (&cnt)[KvLayout<D>::kCounted]) {
  using L = KvLayout<D>;
  const int cg = lane % L::kColGroups, slot = lane / L::kColGroups;
  const int64_t W = num_words(nbits);
  const int shift = (it.g % (32 / kKvBits)) * kKvBits;
  const float off_bit = is_signed ? -1.f : 0.f;
  EK_UNROLL
  for (int e = 0; e < kKvCols; ++e) {
    EK_UNROLL
    for (int k = 0; k < kKvBits; ++k) acc[e][k] = 0.f;
  }
  EK_UNROLL
  for (int m = 0; m < L::kCounted; ++m) cnt[m] = 0;
  // the lane's next token j: its row of v and its code word (pointers stepped, not recomputed)
  constexpr int kStep = L::kSlots * kKvUnroll;
  const int64_t first = it.bh * N + it.j0 + slot;
  const typename T::storage* vp = v + first * D;
  const int32_t* kp = k_codes + first * W + it.g / (32 / kKvBits);
  for (int64_t j = it.j0 + slot; j < it.j1; j += kStep, vp += kStep * D, kp += kStep * W) {
    float x[kKvUnroll][kKvCols];
    uint32_t bits[kKvUnroll];
    EK_UNROLL
    for (int u = 0; u < kKvUnroll; ++u) {
      if (j + u * L::kSlots < it.j1) {
        kv_load_token<T, D>(vp + u * L::kSlots * D, cg, vec_ok, x[u]);
        bits[u] = (uint32_t)kp[u * L::kSlots * W] >> shift;
      } else {
        EK_UNROLL
        for (int e = 0; e < kKvCols; ++e) x[u][e] = 0.f;
        bits[u] = 0;
      }
    }
    EK_UNROLL
    for (int u = 0; u < kKvUnroll; ++u) {
      EK_UNROLL
      for (int k = 0; k < kKvBits; ++k) {
        const float h = (bits[u] >> k) & 1u ? 1.f : off_bit;
        EK_UNROLL
        for (int e = 0; e < kKvCols; ++e) acc[e][k] = fmaf(h, x[u][e], acc[e][k]);
      }
      EK_UNROLL
      for (int m = 0; m < L::kCounted; ++m) {
        const int k = cg + L::kColGroups * m;
        if (k < kKvBits) cnt[m] += (int32_t)((bits[u] >> k) & 1u);
      }
    }
  }
}

// Pass 1, lane `lane` after the warp's reduction over its token slots (every slot then holds
// the item's sums): the slot k % kSlots lanes store bit k's row, 16 bytes at a time; the slot-0
// lanes store the counts.  splits == 1: straight into KV [BH, nbits, D] (kv_out) and ksum
// [BH, nbits] (cnt_out, as the float h_k sum: 2 cnt - N signed, cnt unsigned).  Otherwise
// into split s's slab of the partials, [splits, BH, nbits, D] floats and [splits, BH, nbits]
// int32 counts (their bits stored in floats), for kv_reduce.
template <typename T, int D>
EK_HD void kv_store(float* kv_out, float* cnt_out, const KvItem& it, int lane, int64_t BH,
                    int64_t N, int64_t nbits, int64_t splits, bool is_signed,
                    const float (&acc)[kKvCols][kKvBits],
                    const int32_t (&cnt)[KvLayout<D>::kCounted]) {
  using L = KvLayout<D>;
  const int cg = lane % L::kColGroups, slot = lane / L::kColGroups;
  const int64_t row0 = it.s * BH * nbits + it.bh * nbits + (int64_t)kKvBits * it.g;
  EK_UNROLL
  for (int k = 0; k < kKvBits; ++k) {
    if (k % L::kSlots != slot || kKvBits * it.g + k >= nbits) continue;
    float* row = kv_out + (row0 + k) * D;
    EK_UNROLL
    for (int e = 0; e < kKvCols; e += 4) {
      const uint32_t w[4] = {f32_to_bits(acc[e][k]), f32_to_bits(acc[e + 1][k]),
                             f32_to_bits(acc[e + 2][k]), f32_to_bits(acc[e + 3][k])};
      store_vec(reinterpret_cast<Vec<16>*>(row + kv_col<T, D>(cg, e)), words_vec(w));
    }
  }
  if (slot != 0) return;
  EK_UNROLL
  for (int m = 0; m < L::kCounted; ++m) {
    const int k = cg + L::kColGroups * m;
    if (k >= kKvBits || kKvBits * it.g + k >= nbits) continue;
    const int64_t c = cnt[m];
    cnt_out[row0 + k] = splits == 1 ? (float)(is_signed ? 2 * c - N : c) : f32_from_bits((uint32_t)c);
  }
}

// Where the workspace (binary_attention_workspace_elems floats) keeps KV and ksum and, with
// more than one split, the partials (part_kv, part_cnt; nullptr with one split).  KV and the
// partial sums start at multiples of E = BH nbits D floats (a multiple of 32), so their
// 16-byte vectors are aligned.
struct KvWorkspace {
  float *kv, *part_kv, *ksum, *part_cnt;
};

// Offsets (floats) of kv, part_kv, ksum, part_cnt; -1 for the partials with one split.
EK_HD void kv_workspace_offsets(int64_t BH, int64_t nbits, int64_t D, int64_t splits,
                                int64_t (&off)[4]) {
  const int64_t E = BH * nbits * D, R = BH * nbits, P = splits > 1 ? splits : 0;
  off[0] = 0;
  off[1] = P ? E : -1;
  off[2] = E * (1 + P);
  off[3] = P ? off[2] + R : -1;
}

EK_HD KvWorkspace kv_workspace(float* ws, int64_t BH, int64_t nbits, int64_t D, int64_t splits) {
  int64_t off[4];
  kv_workspace_offsets(BH, nbits, D, splits, off);
  KvWorkspace w;
  w.kv = ws + off[0];
  w.part_kv = off[1] < 0 ? nullptr : ws + off[1];
  w.ksum = ws + off[2];
  w.part_cnt = off[3] < 0 ? nullptr : ws + off[3];
  return w;
}

// Pass 1b (splits > 1): unit t of kv_reduce_units.  t < E / 4 (E = BH nbits D): KV[4t .. 4t + 3]
// = the partials' sum over s = 0, 1, ..., splits - 1 in that order; then ksum[t - E / 4] from
// the counts (exact, int64).
EK_HD int64_t kv_reduce_units(int64_t BH, int64_t nbits, int64_t D) { return BH * nbits * (D / 4 + 1); }

EK_HD void kv_reduce(const float* part_kv, const float* part_cnt, float* kv, float* ksum,
                     int64_t t, int64_t BH, int64_t N, int64_t nbits, int64_t D, int64_t splits,
                     bool is_signed) {
  const int64_t E = BH * nbits * D, R = BH * nbits;
  if (t < E / 4) {
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    const float* p = part_kv + 4 * t;
    for (int s = 0; s < (int)splits; ++s, p += E) {  // splits <= kKvMaxSplits
      uint32_t w[4];
      vec_words(load_vec(reinterpret_cast<const Vec<16>*>(p)), w);
      EK_UNROLL
      for (int q = 0; q < 4; ++q) sum[q] += f32_from_bits(w[q]);
    }
    const uint32_t w[4] = {f32_to_bits(sum[0]), f32_to_bits(sum[1]), f32_to_bits(sum[2]),
                           f32_to_bits(sum[3])};
    store_vec(reinterpret_cast<Vec<16>*>(kv + 4 * t), words_vec(w));
  } else if (t < E / 4 + R) {
    const int64_t r = t - E / 4;
    int64_t c = 0;
    for (int s = 0; s < (int)splits; ++s) c += (int32_t)f32_to_bits(part_cnt[s * R + r]);
    ksum[r] = (float)(is_signed ? 2 * c - N : c);
  }
}

// Pass 2, lane `lane` of the warp on token n of head bh: val[k] (column lane + 32 k) is the
// ecoformer output or the shiftadd t; returns the lane's sum of t^2 (shiftadd; 0 otherwise).
template <typename T, int D>
EK_HD float token_partial(const typename T::storage* v, const int32_t* q_codes,
                              const float* kv, const float* ksum, int64_t bh, int64_t n,
                              int lane, int64_t N, int64_t nbits, bool ecoformer,
                              float (&val)[Layout<D>::kColsPerLane]) {
  constexpr int C = Layout<D>::kColsPerLane;
  const int64_t W = num_words(nbits);
  float num[C];
  EK_UNROLL
  for (int k = 0; k < C; ++k) num[k] = 0.f;
  int64_t den = 0;
  const float* kvh = kv + bh * nbits * D + lane;
  const float* ksh = ksum + bh * nbits;
  const int32_t* qp = q_codes + (bh * N + n) * W;
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t word = (uint32_t)qp[w];
    const int nb = (int)(nbits - 32 * w < 32 ? nbits - 32 * w : 32);
    for (int b = 0; b < nb; ++b) {
      const int64_t i = 32 * w + b;
      const bool on = (word >> b) & 1u;
      if (ecoformer) {
        const float* row = kvh + i * D;
        const int64_t ks = (int64_t)ksh[i];  // an integer in [-N, N]
        EK_UNROLL
        for (int k = 0; k < C; ++k) num[k] += on ? row[32 * k] : -row[32 * k];
        den += on ? ks : -ks;
      } else if (on) {  // uniform over the warp: one token's code
        const float* row = kvh + i * D;
        EK_UNROLL
        for (int k = 0; k < C; ++k) num[k] += row[32 * k];
      }
    }
  }
  const typename T::storage* vp = v + (bh * N + n) * D + lane;
  float sq = 0.f;
  if (ecoformer) {
    const float cc = (float)(nbits + 1);
    const float dn = (float)(den + N * (nbits + 1));
    EK_UNROLL
    for (int k = 0; k < C; ++k) val[k] = (num[k] + cc * T::load(vp[32 * k])) / dn;
  } else {
    EK_UNROLL
    for (int k = 0; k < C; ++k) {
      val[k] = 0.5f * T::load(vp[32 * k]) + num[k] * kInvPi;
      sq += val[k] * val[k];
    }
  }
  return sq;
}

// Pass 2, after the warp's reduction: norm_sq is the token's sum of t^2 (shiftadd).
template <typename T, int D>
EK_HD void token_store(typename T::storage* out, int64_t bh, int64_t n, int lane, int64_t N,
                           bool ecoformer, float norm_sq,
                           const float (&val)[Layout<D>::kColsPerLane]) {
  constexpr int C = Layout<D>::kColsPerLane;
  typename T::storage* op = out + (bh * N + n) * D + lane;
  float div = 1.f;
  if (!ecoformer) {
    const float nrm = sqrtf(norm_sq);
    div = nrm > kShiftAddEps ? nrm : kShiftAddEps;
  }
  EK_UNROLL
  for (int k = 0; k < C; ++k) op[32 * k] = T::store(ecoformer ? val[k] : val[k] / div);
}

}  // namespace binary_hash
}  // namespace effkern
