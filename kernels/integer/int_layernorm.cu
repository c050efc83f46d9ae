// I-ViT integer LayerNorm (no affine scale; the bias is pre-quantised),
// one thread block per row of C channels.
//   mu = round-half-even(sum(I) / C); y = I - mu; var = sum(y^2) (int64);
//   k = 2^16, iters x: k = (k + var / k) / 2; f = (2^31-1) / k;
//   out = ((y * f) >> 1) + bias[c]  (int32 out).
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

template <typename TIn, int BLOCK, int VPT>
__global__ void __launch_bounds__(BLOCK)
    int_layernorm_kernel(const TIn* __restrict__ x, const int32_t* __restrict__ bias,
                         int32_t* __restrict__ out, int64_t C, int iters) {
  __shared__ int64_t s_red[BLOCK / 32];
  const int64_t base = (int64_t)blockIdx.x * C;
  const TIn* __restrict__ xr = x + base;
  int32_t* __restrict__ outr = out + base;
  const int tid = threadIdx.x;

  if constexpr (VPT > 0) {  // whole row in registers
    int32_t v[VPT];
    int64_t sum = 0;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      v[k] = i < C ? (int32_t)xr[i] : 0;
      sum += v[k];
    }
    sum = block_allreduce<BLOCK>(sum, AddOp{}, s_red);
    const int64_t mu = round_half_even_div(sum, C);
    int64_t var = 0;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      if (i < C) {
        const int64_t y = v[k] - mu;
        var += y * y;
      }
    }
    var = block_allreduce<BLOCK>(var, AddOp{}, s_red);
    const int64_t f = layernorm_factor(var, iters);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t i = tid + (int64_t)k * BLOCK;
      if (i < C) outr[i] = (int32_t)layernorm_out(v[k] - mu, f, bias[i]);
    }
  } else {  // long row: pass 1 sum, pass 2 variance, pass 3 write
    int64_t sum = 0;
    for (int64_t i = tid; i < C; i += BLOCK) sum += xr[i];
    sum = block_allreduce<BLOCK>(sum, AddOp{}, s_red);
    const int64_t mu = round_half_even_div(sum, C);
    int64_t var = 0;
    for (int64_t i = tid; i < C; i += BLOCK) {
      const int64_t y = xr[i] - mu;
      var += y * y;
    }
    var = block_allreduce<BLOCK>(var, AddOp{}, s_red);
    const int64_t f = layernorm_factor(var, iters);
    for (int64_t i = tid; i < C; i += BLOCK) {
      outr[i] = (int32_t)layernorm_out(xr[i] - mu, f, bias[i]);
    }
  }
}

template <typename TIn>
void run(const void* x, const int32_t* bias, int32_t* out, int64_t rows, int64_t C, int iters,
         cudaStream_t stream) {
  dispatch_row_config(C, [&](auto block, auto vpt) {
    constexpr int B = decltype(block)::value, V = decltype(vpt)::value;
    int_layernorm_kernel<TIn, B, V><<<(unsigned)rows, B, 0, stream>>>(static_cast<const TIn*>(x),
                                                                       bias, out, C, iters);
  });
}

}  // namespace

const char* launch_int_layernorm(const void* x, IntType in_type, const int32_t* bias,
                                 int32_t* out, int64_t rows, int64_t C, int iters, void* stream) {
  if (rows <= 0 || C <= 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run<int8_t>(x, bias, out, rows, C, iters, s); break;
    case IntType::I16: run<int16_t>(x, bias, out, rows, C, iters, s); break;
    default: return "launch_int_layernorm: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
