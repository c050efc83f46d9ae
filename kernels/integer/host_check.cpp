// Host transcription of the integer row kernels, for checking their math without a GPU.
//
// Two layers, both driven by tests/test_integer_cuda.py through ctypes (this file is compiled
// with the host C++ compiler into a small shared library; not part of effkern/_C*.so):
//  - ek_int_*_rows: the kernels' 32-bit arithmetic (integer_math.cuh, the same functions the
//    kernels call), row by row in the kernels' order of passes, laid out as the kernels lay a
//    row out (row_split: head / 16-byte chunks / tail), compared with the torch reference;
//  - ek_check_*: each 32-bit helper against its plain int64 form (shift_exp_nonpos, gelu_out,
//    layernorm_out, plain division), exhaustively over the ranges where they could part
//    (every 16-bit argument, every multiple of the divisor, the ends of each range);
//    they return the number of mismatches (0 expected), or -1 for unusable arguments.
//
// Inputs are int32 (any int8/int16/int32 row widened); outputs are int64 holding the value
// after the kernel's cast to its output type.
#include <stdint.h>

#include "kernels/integer/integer_math.cuh"

using namespace effkern::integer;

namespace {
int64_t cast_to_bits(int64_t v, int bits) {
  if (bits == 8) return (int8_t)v;
  if (bits == 16) return (int16_t)v;
  return (int32_t)v;
}
int32_t row_max(const int32_t* x, int64_t L) {
  int32_t m = INT32_MIN;
  for (int64_t i = 0; i < L; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
// The chunk width of each kernel: 16 bytes of the narrower of input and output.
int chunk_vec(int in_bytes, int out_bytes) { return 16 / (in_bytes < out_bytes ? in_bytes : out_bytes); }

// Visits row r's elements in the kernel's order (chunks, then head and tail), checking that the
// split covers the row exactly once with chunks on the g0 grid.  Returns false if it does not.
template <typename F>
bool for_row(int64_t r, int64_t L, int g0, int vec, F&& f) {
  const RowSplit sp = row_split(r, L, g0, vec);
  if (sp.head < 0 || sp.nc < 0 || sp.tail < 0 || sp.head + sp.nc * vec + sp.tail != L) return false;
  if (sp.nc > 0 && (sp.head >= vec || sp.tail >= vec)) return false;
  if (sp.nc > 0 && ((r * L + sp.head) - g0) % vec != 0) return false;
  for (int64_t c = 0; c < sp.nc; ++c)
    for (int j = 0; j < vec; ++j) f(sp.head + c * vec + j);
  for (int64_t u = 0; u < sp.head + sp.tail; ++u) f(scalar_index(u, sp, vec));
  return true;
}
}  // namespace

extern "C" {

// The kernels' math; g0: the chunk phase (chunk_phase in integer_common.cuh; -1: all scalar).
// Returns 0, or -1 when the constants cannot be made (softmax: K > 2^31 - 1) or a row split is
// wrong.
int ek_int_softmax_rows(const int32_t* x, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
                        int in_bytes, int g0, int64_t* y) {
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c) || !c.narrow) return -1;
  const int vec = chunk_vec(in_bytes, out_bits / 8);
  const bool clamp_a = in_bytes == 4;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * L;
    int64_t* yr = y + r * L;
    const int32_t m = row_max(xr, L);
    auto e_of = [&](int64_t i) {
      return shift_exp32(clamp_a ? exp_arg<true>(m, xr[i], c) : exp_arg<false>(m, xr[i], c), c);
    };
    uint32_t s = 0;
    if (!for_row(r, L, g0, vec, [&](int64_t i) { s = sat_add32(s, e_of(i)); })) return -1;
    const uint32_t f = kOne32 / s;
    for_row(r, L, g0, vec, [&](int64_t i) { yr[i] = cast_to_bits(softmax_out32(e_of(i), f, out_bits), out_bits); });
  }
  return 0;
}

int ek_int_gelu_rows(const int32_t* x, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
                     int in_bytes, int g0, int64_t* y) {
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c)) return -1;
  const int vec = chunk_vec(in_bytes, 4);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * L;
    int64_t* yr = y + r * L;
    const int32_t m = row_max(xr, L);
    const int64_t em = shift_exp(-(int64_t)m, x0, n);
    const uint32_t em_c = em < (int64_t)kOne32 ? (uint32_t)em : kOne32;
    const bool ok = for_row(r, L, g0, vec, [&](int64_t i) {
      const uint32_t b = exp_arg<false>(m, xr[i], c);
      yr[i] = c.narrow ? gelu_out32(xr[i], shift_exp32(b, c), em_c, out_bits)
                       : gelu_out32_wide(xr[i], shift_exp32_wide(b, c), em_c, out_bits);
    });
    if (!ok) return -1;
  }
  return 0;
}

int ek_int_layernorm_rows(const int32_t* x, const int32_t* bias, int64_t rows, int64_t C, int iters,
                          int in_bytes, int g0, int64_t* y) {
  const int vec = chunk_vec(in_bytes, 4);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * C;
    int64_t* yr = y + r * C;
    int64_t sum = 0, sq = 0;
    if (!for_row(r, C, g0, vec, [&](int64_t i) { sum += xr[i]; sq += (int64_t)xr[i] * xr[i]; })) return -1;
    const int64_t mu = round_half_even_div(sum, C);
    const int32_t f = (int32_t)layernorm_factor32(layernorm_var(sum, sq, mu, C), iters);
    const uint32_t muf = layernorm_muf((int32_t)mu, f);
    for_row(r, C, g0, vec, [&](int64_t i) { yr[i] = layernorm_out32(xr[i], muf, f, bias[i]); });
  }
  return 0;
}

// ---- the 32-bit helpers against their plain forms ----------------------------------------

// floor(P / X) by multiplier for P + 1 in [1, pcap]: all P + 1 up to 2^20 and in the last 2^20
// below pcap, and X*k - 1, X*k, X*k + 1 for every k with X*k <= pcap (all of them when
// pcap / X <= 2^22, else 2^22 of them spread over the range, the last ones included).
int64_t ek_check_div_magic(uint32_t x, uint32_t pcap) {
  uint32_t magic, shift;
  if (!find_div_magic(x, pcap, &magic, &shift)) return -1;
  int64_t bad = 0;
  auto check = [&](int64_t p1) {
    if (p1 >= 1 && p1 <= (int64_t)pcap) bad += div_by_magic((uint32_t)p1, magic, shift) != (uint32_t)((p1 - 1) / x);
  };
  const int64_t span = (int64_t)1 << 20;
  for (int64_t p1 = 1; p1 <= span; ++p1) check(p1);
  for (int64_t p1 = (int64_t)pcap - span; p1 <= (int64_t)pcap; ++p1) check(p1);
  const int64_t kmax = (int64_t)pcap / x;
  const int64_t step = kmax > ((int64_t)1 << 22) ? kmax >> 22 : 1;
  for (int64_t k = 0; k <= kmax + 1; k = (k + step > kmax && k < kmax) ? kmax : k + step) {
    for (int64_t d = -1; d <= 2; ++d) check(k * (int64_t)x + d);
  }
  return bad;
}

// shift_exp32 / shift_exp32_wide (a = m - x) against shift_exp_nonpos(-a): every a in
// [0, 2^16 - 1] (int8 / int16 rows); with clamp_a also a in [amax - 2^20, amax + 2^20] and the
// top 2^20 values below 2^32 (int32 rows, narrow only).
int64_t ek_check_shift_exp32(int64_t x0, int n, int clamp_a) {
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c)) return -1;
  int64_t bad = 0;
  auto check = [&](int64_t a) {
    if (a < 0 || a > 0xFFFFFFFFLL) return;
    const int64_t want = shift_exp_nonpos(-a, x0, n);
    if (c.narrow) {
      const uint32_t got = shift_exp32(clamp_a ? shift_exp_b<true>((uint32_t)a, c) : (uint32_t)a + 1, c);
      bad += (int64_t)got != want;
    }
    const uint64_t wide = shift_exp32_wide(clamp_a ? shift_exp_b<true>((uint32_t)a, c) : (uint32_t)a + 1, c);
    bad += (int64_t)wide != want;
  };
  for (int64_t a = 0; a < 65536; ++a) check(a);
  if (clamp_a) {
    if (!c.narrow) return -1;
    const int64_t span = (int64_t)1 << 20;
    for (int64_t a = (int64_t)c.amax - span; a <= (int64_t)c.amax + span; ++a) check(a);
    for (int64_t a = 0xFFFFFFFFLL - span; a <= 0xFFFFFFFFLL; ++a) check(a);
  }
  return bad;
}

// gelu_out32 / gelu_out32_wide against gelu_out for every int8 or int16 x in a row with
// maximum m (x <= m), given x0, n and out_bits.
int64_t ek_check_gelu_out32(int64_t x0, int n, int out_bits, int32_t m, int32_t xmin) {
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c) || xmin > m || m - (int64_t)xmin > 65535) return -1;
  const int64_t em = shift_exp(-(int64_t)m, x0, n);
  const uint32_t em_c = em < (int64_t)kOne32 ? (uint32_t)em : kOne32;
  int64_t bad = 0;
  for (int64_t xi = xmin; xi <= m; ++xi) {
    const int64_t e = shift_exp_nonpos(xi - m, x0, n);
    const int32_t want = (int32_t)gelu_out(xi, e, em, out_bits);
    const uint32_t b = exp_arg<false>(m, (int32_t)xi, c);
    if (c.narrow) bad += gelu_out32((int32_t)xi, shift_exp32(b, c), em_c, out_bits) != want;
    bad += gelu_out32_wide((int32_t)xi, shift_exp32_wide(b, c), em_c, out_bits) != want;
  }
  return bad;
}

// softmax_out32 against softmax_out for e in [1, K] (every e up to 2^20 and the top 2^20)
// and the row sum s (so f = (2^31-1) / min(s, 2^31-1)); e <= s unless s saturates.
int64_t ek_check_softmax_out32(int64_t k, int64_t s, int out_bits) {
  if (k < 1 || k > (int64_t)kOne32 || s < 1) return -1;
  const int64_t sc = s < (int64_t)kOne32 ? s : (int64_t)kOne32;
  const int64_t f = (int64_t)kOne32 / sc;
  const int64_t emax = sc < (int64_t)kOne32 ? (sc < k ? sc : k) : k;
  int64_t bad = 0;
  auto check = [&](int64_t e) {
    if (e >= 1 && e <= emax)
      bad += (int64_t)softmax_out32((uint32_t)e, (uint32_t)f, out_bits) != cast_to_bits(softmax_out(e, f, out_bits), out_bits);
  };
  const int64_t span = (int64_t)1 << 20;
  for (int64_t e = 1; e <= span; ++e) check(e);
  for (int64_t e = emax - span; e <= emax; ++e) check(e);
  return bad;
}

// layernorm_out32 against layernorm_out(x - mu) for every int16 x with |x - mu| <= k, for
// f = (2^31-1)/k, k in [kmin, kmax], and the mu and bias values given.
int64_t ek_check_layernorm_out32(int64_t kmin, int64_t kmax, const int32_t* mus, int nmu, const int32_t* bias,
                                 int nbias) {
  if (kmin < 1 || kmax < kmin) return -1;
  int64_t bad = 0;
  for (int64_t k = kmin; k <= kmax; ++k) {
    const int64_t f = (int64_t)kOne32 / k;
    for (int u = 0; u < nmu; ++u) {
      const uint32_t muf = layernorm_muf(mus[u], (int32_t)f);
      for (int64_t x = -32768; x <= 32767; ++x) {
        const int64_t y = x - mus[u];
        if (y > k || y < -k) continue;
        for (int b = 0; b < nbias; ++b)
          bad += layernorm_out32((int32_t)x, muf, (int32_t)f, bias[b]) != (int32_t)layernorm_out(y, f, bias[b]);
      }
    }
  }
  return bad;
}

// The Newton iteration keeps k >= |y| for every y of the row (what layernorm_out32 needs), and
// layernorm_var equals sum((x - mu)^2): for a row x of length C, with iters iterations.
int64_t ek_check_layernorm_row(const int32_t* x, int64_t C, int iters) {
  int64_t sum = 0, sq = 0;
  for (int64_t i = 0; i < C; ++i) { sum += x[i]; sq += (int64_t)x[i] * x[i]; }
  const int64_t mu = round_half_even_div(sum, C);
  int64_t var = 0, ymax = 0;
  for (int64_t i = 0; i < C; ++i) {
    const int64_t y = x[i] - mu;
    var += y * y;
    ymax = y < 0 ? (-y > ymax ? -y : ymax) : (y > ymax ? y : ymax);
  }
  int64_t bad = layernorm_var(sum, sq, mu, C) != var;
  int64_t k = (int64_t)1 << 16;
  for (int i = 0; i < iters; ++i) k = (k + var / k) / 2;
  return bad + (k < ymax);
}

// layernorm_factor32 against layernorm_factor for var in [lo, hi], every iteration count.
int64_t ek_check_layernorm_factor32(int64_t lo, int64_t hi) {
  if (lo < 0 || hi < lo) return -1;
  int64_t bad = 0;
  for (int64_t v = lo; v <= hi; ++v)
    for (int iters = 0; iters <= 16; ++iters) bad += layernorm_factor32(v, iters) != layernorm_factor(v, iters);
  return bad;
}

// row_split over rows rows of length L: every row covered exactly once, chunks on the g0 grid.
int64_t ek_check_row_split(int64_t rows, int64_t L, int g0, int vec) {
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t count = 0, sum = 0;
    bad += !for_row(r, L, g0, vec, [&](int64_t i) { ++count; sum += i; });
    bad += count != L || sum != L * (L - 1) / 2;
  }
  return bad;
}

}  // extern "C"
