// Host transcription of the integer row kernels, for checking their math
// without a GPU.  It runs the exact integer_math.cuh helpers the kernels run, in
// the kernels' order of passes (max / saturating sum / write), on one row at
// a time; reductions are exact, so only their order differs from the GPU.
// tests/test_integer_cuda.py compiles this with the host C++ compiler into a
// small shared library and compares it, via ctypes, with the torch reference
// in effkern/ops/integer.py.  Not part of effkern/_C*.so.
//
// Inputs are int32 (any int8/int16/int32 row widened); outputs are int64
// holding the value after the kernel's cast to its output type.
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
}  // namespace

extern "C" {

void ek_int_softmax_rows(const int32_t* x, int64_t rows, int64_t L, int64_t x0, int n,
                         int out_bits, int64_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * L;
    int64_t* yr = y + r * L;
    const int64_t m = row_max(xr, L);
    int64_t s = 0;
    for (int64_t i = 0; i < L; ++i) s = sat_add(s, clamp_one(shift_exp_nonpos(xr[i] - m, x0, n)));
    const int64_t f = kOne / s;
    for (int64_t i = 0; i < L; ++i)
      yr[i] = cast_to_bits(softmax_out(shift_exp_nonpos(xr[i] - m, x0, n), f, out_bits), out_bits);
  }
}

void ek_int_gelu_rows(const int32_t* x, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
                      int64_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * L;
    int64_t* yr = y + r * L;
    const int64_t m = row_max(xr, L);
    const int64_t em = shift_exp(-m, x0, n);
    for (int64_t i = 0; i < L; ++i)
      yr[i] = cast_to_bits(gelu_out(xr[i], shift_exp_nonpos(xr[i] - m, x0, n), em, out_bits), 32);
  }
}

void ek_int_layernorm_rows(const int32_t* x, const int32_t* bias, int64_t rows, int64_t C,
                           int iters, int64_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* xr = x + r * C;
    int64_t* yr = y + r * C;
    int64_t sum = 0;
    for (int64_t i = 0; i < C; ++i) sum += xr[i];
    const int64_t mu = round_half_even_div(sum, C);
    int64_t var = 0;
    for (int64_t i = 0; i < C; ++i) var += (xr[i] - mu) * (xr[i] - mu);
    const int64_t f = layernorm_factor(var, iters);
    for (int64_t i = 0; i < C; ++i) yr[i] = cast_to_bits(layernorm_out(xr[i] - mu, f, bias[i]), 32);
  }
}

}  // extern "C"
