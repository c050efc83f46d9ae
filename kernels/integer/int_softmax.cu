// I-ViT integer softmax, one thread block per row.
//   m = max(row); e = shift_exp(I - m) (int64, >= 1); s = min(sum e, 2^31-1);
//   f = (2^31-1) / s; y = (e * f) >> (32 - out_bits)  (int8 or int16 out).
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

template <typename TIn, typename TOut, int BLOCK, int VPT>
__global__ void __launch_bounds__(BLOCK)
    int_softmax_kernel(const TIn* __restrict__ x, TOut* __restrict__ y, int64_t L,
                       int64_t x0, int n, int out_bits) {
  __shared__ int32_t s_max[BLOCK / 32];
  __shared__ int64_t s_sum[BLOCK / 32];
  const int64_t base = (int64_t)blockIdx.x * L;
  const TIn* __restrict__ xr = x + base;
  TOut* __restrict__ yr = y + base;
  const int tid = threadIdx.x;

  if constexpr (VPT > 0) {  // whole row in registers: one read of x
    int32_t v[VPT];
    int64_t e[VPT];
    int32_t m = INT32_MIN;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      v[k] = i < L ? (int32_t)xr[i] : INT32_MIN;
      m = v[k] > m ? v[k] : m;
    }
    m = block_allreduce<BLOCK>(m, MaxOp{}, s_max);
    int64_t s = 0;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      e[k] = 0;
      if (i < L) {
        e[k] = shift_exp_nonpos((int64_t)v[k] - m, x0, n);
        s = sat_add(s, clamp_one(e[k]));
      }
    }
    s = block_allreduce<BLOCK>(s, SatAddOp{}, s_sum);
    const int64_t f = kOne / s;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      if (i < L) yr[i] = (TOut)softmax_out(e[k], f, out_bits);
    }
  } else {  // long row: pass 1 max, pass 2 sum, pass 3 recompute e and write
    int32_t m = INT32_MIN;
    for (int64_t i = tid; i < L; i += BLOCK) {
      const int32_t v = (int32_t)xr[i];
      m = v > m ? v : m;
    }
    m = block_allreduce<BLOCK>(m, MaxOp{}, s_max);
    int64_t s = 0;
    for (int64_t i = tid; i < L; i += BLOCK) {
      s = sat_add(s, clamp_one(shift_exp_nonpos((int64_t)xr[i] - m, x0, n)));
    }
    s = block_allreduce<BLOCK>(s, SatAddOp{}, s_sum);
    const int64_t f = kOne / s;
    for (int64_t i = tid; i < L; i += BLOCK) {
      yr[i] = (TOut)softmax_out(shift_exp_nonpos((int64_t)xr[i] - m, x0, n), f, out_bits);
    }
  }
}

template <typename TIn, typename TOut>
void run(const void* x, void* y, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
         cudaStream_t stream) {
  dispatch_row_config(L, [&](auto block, auto vpt) {
    constexpr int B = decltype(block)::value, V = decltype(vpt)::value;
    int_softmax_kernel<TIn, TOut, B, V><<<(unsigned)rows, B, 0, stream>>>(
        static_cast<const TIn*>(x), static_cast<TOut*>(y), L, x0, n, out_bits);
  });
}

template <typename TIn>
void run_out(const void* x, void* y, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
             cudaStream_t stream) {
  if (out_bits == 8) {
    run<TIn, int8_t>(x, y, rows, L, x0, n, out_bits, stream);
  } else {
    run<TIn, int16_t>(x, y, rows, L, x0, n, out_bits, stream);
  }
}

}  // namespace

const char* launch_int_softmax(const void* x, IntType in_type, void* y, int64_t rows, int64_t L,
                               int64_t x0, int n, int out_bits, void* stream) {
  if (rows <= 0 || L <= 0) return nullptr;
  if (out_bits != 8 && out_bits != 16) return "launch_int_softmax: out_bits must be 8 or 16";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run_out<int8_t>(x, y, rows, L, x0, n, out_bits, s); break;
    case IntType::I16: run_out<int16_t>(x, y, rows, L, x0, n, out_bits, s); break;
    case IntType::I32: run_out<int32_t>(x, y, rows, L, x0, n, out_bits, s); break;
    default: return "launch_int_softmax: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
