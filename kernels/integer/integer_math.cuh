// Integer-only element math for the I-ViT ops (softmax, gelu, layernorm).
//
// Depends on nothing (no CUDA, no torch): every helper is __host__ __device__
// under nvcc and plain C++ otherwise, so the exact same code is checked on the
// host (kernels/integer/host_check.cpp, driven by tests/test_integer_cuda.py)
// and run in the kernels.  All arithmetic is int64 and exact.  Right shifts of
// signed values are arithmetic (floor division by 2^k), which C++20 guarantees
// and gcc/clang/nvcc have always implemented.
#pragma once

#include <stdint.h>

#include "kernels/common/host_device.h"

namespace effkern {
namespace integer {

// 2^31 - 1: the integer that plays "1.0" in I-ViT's fixed-point divisions.
constexpr int64_t kOne = 2147483647LL;

// floor(a / b) for any signs (b != 0); C++ '/' truncates toward zero.
EK_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
  return q;
}

// a / b for a >= 0, b > 0; uses the (much cheaper on GPU) 32-bit divide when
// both operands fit in 32 bits.
EK_HD int64_t udiv_nonneg(int64_t a, int64_t b) {
  if (((uint64_t)a >> 32) == 0 && ((uint64_t)b >> 32) == 0) {
    return (int64_t)((uint32_t)a / (uint32_t)b);
  }
  return a / b;
}

// I-ViT shift-exponential.  d: the (integer) exponent argument, x0 <= -1,
// n >= 0.  Returns ((r - 2*x0) << (n - q)) >> 1, or 2^31 when the shift is
// >= 32 (only possible for d > 0; the value is then >= 2^31 anyway and is only
// ever used through a clamp to 2^31 - 1).  The host guarantees n <= 31 and
// |x0| <= 2^30, so (r - 2*x0) <= 2^31 and its shift by < 32 fits in int64.
EK_HD int64_t shift_exp(int64_t d, int64_t x0, int n) {
  int64_t p = d + (d >> 1) - (d >> 4);
  const int64_t lo = (int64_t)n * x0;
  if (p < lo) p = lo;
  int64_t q;
  if (p <= 0) {
    q = udiv_nonneg(-p, -x0);  // both non-negative: == floor(p / x0), in [0, n]
  } else {
    q = floor_div(p, x0);  // negative
  }
  const int64_t r = p - x0 * q;  // in (x0, 0]
  const int64_t shift = (int64_t)n - q;
  if (shift >= 32) return (int64_t)1 << 31;
  return ((r - 2 * x0) << shift) >> 1;
}

// Shift-exponential for d <= 0 (every per-element term): the shift is in
// [0, n], n <= 31, so this equals shift_exp(d, x0, n) without the branches.
EK_HD int64_t shift_exp_nonpos(int64_t d, int64_t x0, int n) {
  int64_t p = d + (d >> 1) - (d >> 4);
  const int64_t lo = (int64_t)n * x0;
  if (p < lo) p = lo;
  const int64_t q = udiv_nonneg(-p, -x0);
  const int64_t r = p - x0 * q;
  return ((r - 2 * x0) << (n - q)) >> 1;
}

// min(a + b, 2^31 - 1) for a, b in [0, 2^31 - 1]; folding it over clamped
// terms gives exactly min(sum, 2^31 - 1) of non-negative terms, in any order,
// without ever overflowing.
EK_HD int64_t sat_add(int64_t a, int64_t b) {
  const int64_t s = a + b;
  return s < kOne ? s : kOne;
}
EK_HD int64_t clamp_one(int64_t a) { return a < kOne ? a : kOne; }

// softmax: y = (e * f) >> (32 - out_bits), f = (2^31-1) / min(sum e, 2^31-1).
EK_HD int64_t softmax_out(int64_t e, int64_t f, int out_bits) {
  return (e * f) >> (32 - out_bits);
}

// gelu: I * sigmoid-ish, e = shift_exp(I - m), em = shift_exp(-m) per row.
EK_HD int64_t gelu_out(int64_t xi, int64_t e, int64_t em, int out_bits) {
  const int64_t s = sat_add(clamp_one(e), clamp_one(em));
  const int64_t f = kOne / s;
  const int64_t sig = (e * f) >> (32 - out_bits);
  return xi * sig;
}

// layernorm: round-half-to-even(sum / C), C > 0.
EK_HD int64_t round_half_even_div(int64_t sum, int64_t c) {
  int64_t q = floor_div(sum, c);
  const int64_t rem = sum - q * c;  // [0, c)
  if (2 * rem > c || (2 * rem == c && (q & 1))) q += 1;
  return q;
}

// layernorm: integer sqrt iterations, then the (2^31-1)/std factor.
EK_HD int64_t layernorm_factor(int64_t var, int iters) {
  int64_t k = (int64_t)1 << 16;
  for (int i = 0; i < iters; ++i) k = (k + var / k) / 2;  // k >= 1 for iters <= 16
  return kOne / k;
}

EK_HD int64_t layernorm_out(int64_t y, int64_t f, int64_t bias) {
  return ((y * f) >> 1) + bias;
}

}  // namespace integer
}  // namespace effkern
