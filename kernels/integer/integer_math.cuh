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

// =============================================================================================
// 32-bit forms the kernels run.  Each is exact against the int64 helpers above over the
// ranges stated (host_check.cpp compares them exhaustively at the edges); the constants they
// need are computed once per launch on the host (make_shift_exp32).  Unsigned 32-bit wrap is
// used deliberately where a value is known to come back into range.
// =============================================================================================

EK_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

// floor(p / X) by a multiplier: umulhi(p + 1, magic) >> shift, for p + 1 in [1, pcap].
// With 2^k = 2^(32+shift), magic = floor((2^k - 1) / X) < 2^32 and f = 2^k - magic*X in
// [1, X]:  (p+1)*magic / 2^k = q + (R + 1 - (p+1)*f / 2^k) / X  (p = q*X + R, 0 <= R < X),
// and 0 <= R + 1 - (p+1)*f/2^k < X holds when (p+1)*f <= 2^k (lower) and f >= 1 (upper, at
// R = X-1).  find_div_magic takes the smallest shift satisfying pcap*f <= 2^k; one always
// exists for pcap <= 2^31: X = 1: shift 0 (f = 1); else with 2^(l-1) < X <= 2^l, shift = l-1
// gives magic < 2^32 and pcap*f <= 2^31 * 2^l = 2^k.  Host only.
inline bool find_div_magic(uint32_t x, uint32_t pcap, uint32_t* magic, uint32_t* shift) {
  if (x == 0 || pcap == 0 || pcap > (1u << 31)) return false;
  for (uint32_t s = 0; s < 32; ++s) {
    const unsigned __int128 two_k = (unsigned __int128)1 << (32 + s);
    const unsigned __int128 m = (two_k - 1) / x;
    if (m >> 32) continue;
    const unsigned __int128 f = two_k - m * x;  // in [1, x]
    if ((unsigned __int128)pcap * f <= two_k) {
      *magic = (uint32_t)m;
      *shift = s;
      return true;
    }
  }
  return false;
}

EK_HD uint32_t div_by_magic(uint32_t p1, uint32_t magic, uint32_t shift) {
  return umulhi32(p1, magic) >> shift;
}

// Constants of the 32-bit shift-exponential for x0 = -X (X in [1, 2^30]) and n in [0, 31].
//   narrow (K = X * 2^n <= 2^31 - 1): every exp term fits 32 bits (shift_exp32);
//   otherwise only the exponent split does (shift_exp32_wide returns a 64-bit term).
struct ShiftExp32 {
  uint32_t amax;   // a = (row max - x) is clamped to amax first (32-bit inputs; see below)
  uint32_t pcap;   // P + 1 is clamped to pcap = min(n*X, 2^31 - 1) + 1 (P = -p >= 0)
  uint32_t magic, shift;  // floor(P / X) = div_by_magic(P + 1, ...) for P + 1 <= pcap
  uint32_t k2, c2, nm2;   // narrow: e = (q*k2 + c2 + (P+1)*nm2) >> q, nm2 = -m2 mod 2^32
  uint32_t x, c;          // wide: t = q*X + (2X + 1) - (P+1), e = (t << (n - q)) >> 1
  int32_t n;
  int32_t narrow;
};

// P(a) = a + ceil(a/2) - ceil(a/16) = -(d + (d >> 1) - (d >> 4)) for d = -a <= 0 (floor shifts
// of a negative d are ceilings of a), in int64 for the host.
inline int64_t shift_exp_p(int64_t a) { return a + (a + 1) / 2 - (a + 15) / 16; }

// Host: the constants, or false when x0 / n are outside [-2^30, -1] / [0, 31].
inline bool make_shift_exp32(int64_t x0, int n, ShiftExp32* c) {
  if (x0 > -1 || x0 < -((int64_t)1 << 30) || n < 0 || n > 31) return false;
  const int64_t X = -x0;
  const int64_t nx = (int64_t)n * X;
  const int64_t pmax = nx < 2147483647LL ? nx : 2147483647LL;
  c->pcap = (uint32_t)(pmax + 1);  // <= 2^31
  // smallest a with P(a) + 1 >= pcap (P is non-decreasing in a, steps of at most 2): for
  // a >= amax the clamp gives pcap either way, and P(amax) + 1 <= pcap + 2 < 2^32.
  int64_t lo = 0, hi = 0xFFFFFFFFLL;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (shift_exp_p(mid) + 1 >= (int64_t)c->pcap) hi = mid; else lo = mid + 1;
  }
  c->amax = (uint32_t)lo;
  if (!find_div_magic((uint32_t)X, c->pcap, &c->magic, &c->shift)) return false;
  c->narrow = (X << n) <= 2147483647LL;
  // narrow: t*2^(n-1) = q*X*2^(n-1) + (2X+1)*2^(n-1) - (P+1)*2^(n-1) <= K, and
  // e = floor(t*2^(n-q)/2) = (t*2^(n-1)) >> q.  n = 0: q = 0 and P = 0, e = X.
  if (n >= 1) {
    c->nm2 = 0u - (1u << (n - 1));
    c->k2 = c->narrow ? (uint32_t)(X << (n - 1)) : 0;
    c->c2 = c->narrow ? (uint32_t)((2 * X + 1) << (n - 1)) : 0;
  } else {
    c->nm2 = 0; c->k2 = 0; c->c2 = (uint32_t)X;
  }
  c->x = (uint32_t)X;
  c->c = (uint32_t)(2 * X + 1);
  c->n = n;
  return true;
}

// The functions below take b = a + 1, a = m - x >= 0 the element's distance below the row
// maximum m: for int8 / int16 rows a <= 2^16 - 1 and b = (m + 1) - x, one subtraction from a
// per-row constant; 32-bit rows go through shift_exp_b, which clamps a to amax first (then b
// and 3b/2 stay below 2^32).
template <bool kClampA>
EK_HD uint32_t shift_exp_b(uint32_t a, const ShiftExp32& c) {
  if (kClampA) a = a < c.amax ? a : c.amax;
  return a + 1;
}

// b for element x of a row with maximum m (what the kernels call).
template <bool kClampA>
EK_HD uint32_t exp_arg(int32_t m, int32_t x, const ShiftExp32& c) {
  if (kClampA) return shift_exp_b<true>((uint32_t)m - (uint32_t)x, c);
  return ((uint32_t)m + 1u) - (uint32_t)x;
}

// P + 1 = b + floor(b/2) - floor((b + 14)/16), clamped to pcap (P + 1 <= 94209 unclamped for
// 16-bit a).
EK_HD uint32_t shift_exp_p1(uint32_t b, const ShiftExp32& c) {
  const uint32_t p1 = b + (b >> 1) - ((b + 14) >> 4);
  return p1 < c.pcap ? p1 : c.pcap;
}

// shift_exp_nonpos(-a, x0, n) for a narrow c: the result is at most K <= 2^31 - 1.
// q in [0, n]; the bracket equals t*2^(n-1) in [0, K] modulo 2^32.
EK_HD uint32_t shift_exp32(uint32_t b, const ShiftExp32& c) {
  const uint32_t p1 = shift_exp_p1(b, c);
  const uint32_t q = div_by_magic(p1, c.magic, c.shift);
  return (q * c.k2 + (c.c2 + p1 * c.nm2)) >> q;
}

// shift_exp_nonpos(-a, x0, n) for any c: t = 2X - R in [X+1, 2X] <= 2^31, shift <= 31.
EK_HD uint64_t shift_exp32_wide(uint32_t b, const ShiftExp32& c) {
  const uint32_t p1 = shift_exp_p1(b, c);
  const uint32_t q = div_by_magic(p1, c.magic, c.shift);
  const uint32_t t = q * c.x + c.c - p1;
  return ((uint64_t)t << (c.n - (int)q)) >> 1;
}

constexpr uint32_t kOne32 = 2147483647u;

// min(a + b, 2^31 - 1) for a, b <= 2^31 - 1 (a + b < 2^32).
EK_HD uint32_t sat_add32(uint32_t a, uint32_t b) {
  const uint32_t s = a + b;
  return s < kOne32 ? s : kOne32;
}

// softmax_out for e <= s' and f = (2^31-1)/s (narrow: e*f <= 2^31 - 1, see int_softmax.cu).
EK_HD uint32_t softmax_out32(uint32_t e, uint32_t f, int out_bits) {
  return (e * f) >> (32 - out_bits);
}

// gelu_out, narrow (e <= 2^31 - 1), em_c = min(e(-max), 2^31 - 1).  s = min(e + em_c, 2^31-1);
// e*f <= 2^31 - 1 (s >= e, or s saturated and f = 1).  x * sig is taken modulo 2^32, as the
// reference's int64 -> int32 conversion does.
EK_HD int32_t gelu_out32(int32_t xi, uint32_t e, uint32_t em_c, int out_bits) {
  const uint32_t f = kOne32 / sat_add32(e, em_c);
  const uint32_t sig = (e * f) >> (32 - out_bits);
  return (int32_t)((uint32_t)xi * sig);
}

// gelu_out for a 64-bit e: f >= 2 means s <= 2^30, so e = min(e, 2^31-1) and e*f fits; f = 1
// leaves e >> (32 - out_bits), of which only the low 32 bits reach the int32 product.
EK_HD int32_t gelu_out32_wide(int32_t xi, uint64_t e, uint32_t em_c, int out_bits) {
  const uint32_t ec = e < kOne32 ? (uint32_t)e : kOne32;
  const uint32_t f = kOne32 / sat_add32(ec, em_c);
  const uint64_t ef = f == 1 ? e : (uint64_t)(ec * f);
  const uint32_t sig = (uint32_t)(ef >> (32 - out_bits));
  return (int32_t)((uint32_t)xi * sig);
}

// layernorm: var = sum((x - mu)^2) = sumsq - 2*mu*sum + C*mu^2 (exact in int64 for
// |x| <= 2^15 and C < 2^31), so one pass gives both sums.
EK_HD int64_t layernorm_var(int64_t sum, int64_t sumsq, int64_t mu, int64_t c) {
  return sumsq - 2 * mu * sum + c * mu * mu;
}

// layernorm_factor with 32-bit divisions when var < 2^32 (every int8 row up to C = 66051):
// from k0 = 2^16 > sqrt(var) the iteration stays at or above isqrt(var) = r (AM-GM, with the
// floors: floor((k + floor(v/k))/2) = floor((k + v/k)/2) >= r), so v/k <= v/r < r + 3 and
// k + v/k < 2^17 + 3: no 32-bit overflow.  var = 0 halves k, which stays >= 1 for iters <= 16.
EK_HD int64_t layernorm_factor32(int64_t var, int iters) {
  if ((uint64_t)var >> 32) return layernorm_factor(var, iters);
  const uint32_t v = (uint32_t)var;
  uint32_t k = 1u << 16;
  for (int i = 0; i < iters; ++i) k = (k + v / k) >> 1;
  return (int64_t)(kOne32 / k);
}

// ((y*f) >> 1) + bias in 32 bits, y = x - mu, muf = mu * f mod 2^32 (once per row):
// |y| <= k (k0 = 2^16 > |y|; after an iteration k >= isqrt(var) >= |y|), so
// |y*f| <= k*floor((2^31-1)/k) <= 2^31 - 1 and x*f - mu*f, taken modulo 2^32, is y*f exactly;
// the bias addition wraps modulo 2^32 like the reference's int64 -> int32 conversion.
EK_HD uint32_t layernorm_muf(int32_t mu, int32_t f) { return (uint32_t)mu * (uint32_t)f; }
EK_HD int32_t layernorm_out32(int32_t x, uint32_t muf, int32_t f, int32_t bias) {
  const int32_t yf = (int32_t)((uint32_t)x * (uint32_t)f - muf);
  return (int32_t)((uint32_t)(yf >> 1) + (uint32_t)bias);
}

// ---- row layout: head (scalar) | chunks of VEC elements (16-byte aligned) | tail (scalar) -----

// Row r of a contiguous [rows, L] matrix spans global elements [r*L, r*L + L).  Chunks start at
// global indices congruent to g0 mod vec (g0 < 0: no aligned chunks, all scalar), vec a power
// of two: head + nc*vec + tail == L, head, tail < vec unless nc == 0.
struct RowSplit {
  int64_t head;  // scalar elements before the first chunk
  int64_t nc;    // chunks
  int64_t tail;  // scalar elements after the last chunk
};

EK_HD RowSplit row_split(int64_t row, int64_t L, int g0, int vec) {
  RowSplit s;
  if (g0 < 0) {
    s.head = L; s.nc = 0; s.tail = 0;
    return s;
  }
  const int64_t start = row * L;
  int64_t head = (int64_t)((uint64_t)(g0 - start) & (uint64_t)(vec - 1));
  if (head > L) head = L;
  s.head = head;
  s.nc = (L - head) / vec;
  s.tail = L - head - s.nc * vec;
  return s;
}

// Index in the row of scalar element u (u < head + tail): head elements first, then the tail.
EK_HD int64_t scalar_index(int64_t u, const RowSplit& s, int vec) {
  return u < s.head ? u : u + s.nc * vec;
}

}  // namespace integer
}  // namespace effkern
