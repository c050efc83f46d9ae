// I-ViT integer GELU (x * sigmoid(1.702 x) through the shift-exponential),
// one thread block per row.
//   m = max(row); e = shift_exp(I - m); em = shift_exp(-m) (2^31 if its shift
//   is >= 32); s = min(e + em, 2^31-1); f = (2^31-1) / s;
//   sig = (e * f) >> (32 - out_bits); y = I * sig  (int32 out).
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

template <typename TIn, int BLOCK, int VPT>
__global__ void __launch_bounds__(BLOCK)
    int_gelu_kernel(const TIn* __restrict__ x, int32_t* __restrict__ y, int64_t L, int64_t x0,
                    int n, int out_bits) {
  __shared__ int32_t s_max[BLOCK / 32];
  const int64_t base = (int64_t)blockIdx.x * L;
  const TIn* __restrict__ xr = x + base;
  int32_t* __restrict__ yr = y + base;
  const int tid = threadIdx.x;

  if constexpr (VPT > 0) {  // whole row in registers
    int32_t v[VPT];
    int32_t m = INT32_MIN;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      v[k] = i < L ? (int32_t)xr[i] : INT32_MIN;
      m = v[k] > m ? v[k] : m;
    }
    m = block_allreduce<BLOCK>(m, MaxOp{}, s_max);
    const int64_t em = shift_exp(-(int64_t)m, x0, n);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      if (i < L) {
        const int64_t e = shift_exp_nonpos((int64_t)v[k] - m, x0, n);
        yr[i] = (int32_t)gelu_out(v[k], e, em, out_bits);
      }
    }
  } else {  // long row: pass 1 max, pass 2 write
    int32_t m = INT32_MIN;
    for (int64_t i = tid; i < L; i += BLOCK) {
      const int32_t v = (int32_t)xr[i];
      m = v > m ? v : m;
    }
    m = block_allreduce<BLOCK>(m, MaxOp{}, s_max);
    const int64_t em = shift_exp(-(int64_t)m, x0, n);
    for (int64_t i = tid; i < L; i += BLOCK) {
      const int64_t v = xr[i];
      yr[i] = (int32_t)gelu_out(v, shift_exp_nonpos(v - m, x0, n), em, out_bits);
    }
  }
}

template <typename TIn>
void run(const void* x, int32_t* y, int64_t rows, int64_t L, int64_t x0, int n, int out_bits,
         cudaStream_t stream) {
  dispatch_row_config(L, [&](auto block, auto vpt) {
    constexpr int B = decltype(block)::value, V = decltype(vpt)::value;
    int_gelu_kernel<TIn, B, V><<<(unsigned)rows, B, 0, stream>>>(static_cast<const TIn*>(x), y, L,
                                                                  x0, n, out_bits);
  });
}

}  // namespace

const char* launch_int_gelu(const void* x, IntType in_type, int32_t* y, int64_t rows, int64_t L,
                            int64_t x0, int n, int out_bits, void* stream) {
  if (rows <= 0 || L <= 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run<int8_t>(x, y, rows, L, x0, n, out_bits, s); break;
    case IntType::I16: run<int16_t>(x, y, rows, L, x0, n, out_bits, s); break;
    default: return "launch_int_gelu: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
