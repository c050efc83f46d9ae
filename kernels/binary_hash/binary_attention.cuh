// Per-thread device code of the binary-hash attention kernels and their
// thread layouts, shared with the host transcription (host_check.cpp).
//
// Every helper is __host__ __device__ under nvcc and plain C++ elsewhere (the
// element types F16 / BF16 / F32 come from kernels/common/vec_rows.cuh, the
// EK_HD macro from kernels/common/host_device.h, num_words and kShiftAddEps
// from kernels/common/constants.h), so the kernels (binary_attention.cu) and
// the host check run the exact same arithmetic, thread by thread.
//
// Pass 1 (kv_thread): one block of kBlock threads per (bh, code word w),
// grid-strided; thread t owns column c = t % D and the kBitsPerThread<D> bits
// g * kBitsPerThread .. of word w, g = t / D, and loops over all N tokens in
// ascending order: acc[k] += +-v[j, c] (signed codes) or bit * v[j, c], and an
// integer count of set bits.  Writes KV[bh, i, c] and (c == 0) ksum[bh, i]
// for i = 32 w + g * kBitsPerThread + k < nbits.  No split over tokens: no
// second stage and no atomics, deterministic.
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

constexpr int kBlock = 256;                    // threads per block, both passes
constexpr int kWarps = kBlock / 32;
constexpr int kTokensPerWarp = 4;
constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;  // pass-2 token tile
constexpr int64_t kMaxGrid = 1 << 20;          // blocks; more work is grid-strided
constexpr float kInvPi = 0.318309886183790671537767526745028724f;

template <int D> struct Layout {
  static_assert(D == 32 || D == 64 || D == 128, "d must be 32, 64 or 128");
  static constexpr int kGroups = kBlock / D;             // bit groups per word
  static constexpr int kBitsPerThread = 32 / kGroups;    // D / 8
  static constexpr int kColsPerLane = D / 32;            // pass 2
};

// Pass 1, thread t of the block for (bh, word w).
template <typename T, int D>
EK_HD void kv_thread(const typename T::storage* v, const int32_t* k_codes, float* kv,
                         float* ksum, int64_t bh, int w, int t, int64_t N, int64_t nbits,
                         bool is_signed) {
  using L = Layout<D>;
  const int64_t W = num_words(nbits);
  const int c = t % D;
  const int g = t / D;
  const int shift = g * L::kBitsPerThread;
  const int first_bit = 32 * w + shift;
  if (first_bit >= nbits) return;  // uniform over the thread's group
  float acc[L::kBitsPerThread];
  int64_t cnt[L::kBitsPerThread];
  EK_UNROLL
  for (int k = 0; k < L::kBitsPerThread; ++k) {
    acc[k] = 0.f;
    cnt[k] = 0;
  }
  const typename T::storage* vp = v + bh * N * D + c;
  const int32_t* kp = k_codes + bh * N * W + w;
  for (int64_t j = 0; j < N; ++j) {
    const float x = T::load(vp[j * D]);
    const uint32_t bits = (uint32_t)kp[j * W] >> shift;
    EK_UNROLL
    for (int k = 0; k < L::kBitsPerThread; ++k) {
      const bool on = (bits >> k) & 1u;
      if (is_signed) {
        acc[k] += on ? x : -x;
      } else {
        acc[k] += on ? x : 0.f;
      }
      cnt[k] += on ? 1 : 0;
    }
  }
  EK_UNROLL
  for (int k = 0; k < L::kBitsPerThread; ++k) {
    const int64_t i = first_bit + k;
    if (i < nbits) {
      kv[(bh * nbits + i) * D + c] = acc[k];
      if (c == 0) ksum[bh * nbits + i] = (float)(is_signed ? 2 * cnt[k] - N : cnt[k]);
    }
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
