// deepshift_linear on CUDA cores: y = bias + sum_k s * (x >> -p), DeepShift's integer shift-add
// on 16.16 fixed-point int32 inputs, exact (int64 sums, saturated to int32 at the end), zero
// weights contributing nothing.  The baseline that shows why shift_linear's tensor-core path is
// the default: one shift and one 64-bit add per weight and row, no tensor cores.
//
// A block computes a 32 x 64 tile of y with 256 threads (2 x 4 outputs each) over K steps of
// 32: x through shared memory as int32, each weight decoded once per block (deepshift_pack).
#include "kernels/common/launch_error.cuh"
#include "kernels/shift/shift_gemm.cuh"
#include "kernels/shift/shift_launch.h"

namespace effkern {
namespace shift {
namespace {

constexpr int kDsBlockM = 32, kDsBlockN = 64, kDsStepK = 32, kDsThreads = 256;

__global__ void __launch_bounds__(kDsThreads, 1)
deepshift_linear_kernel(const int32_t* __restrict__ x, const uint8_t* __restrict__ codes,
                        const int32_t* __restrict__ base, const int32_t* __restrict__ bias,
                        int32_t* __restrict__ y, int64_t M, int N, int K, int code_cols, int bits) {
  __shared__ int32_t xs[kDsBlockM][kDsStepK + 1];
  __shared__ uint32_t ws[kDsBlockN][kDsStepK + 1];
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;  // rows tm, tm + 16; columns tn + 16c
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDsBlockM;
  const int n0 = blockIdx.y * kDsBlockN;
  int64_t acc[2][4] = {};
  for (int k0 = 0; k0 < K; k0 += kDsStepK) {
    for (int i = tid; i < kDsBlockM * kDsStepK; i += kDsThreads) {
      const int r = i / kDsStepK, k = k0 + i % kDsStepK;
      xs[r][i % kDsStepK] = m0 + r < M && k < K ? x[(m0 + r) * K + k] : 0;
    }
    for (int i = tid; i < kDsBlockN * kDsStepK; i += kDsThreads) {
      const int r = i / kDsStepK, k = k0 + i % kDsStepK, n = n0 + r;
      // outside the weight: a zero code, which contributes nothing
      ws[r][i % kDsStepK] = n < N && k < K ? deepshift_pack(code_at(codes, n, k, code_cols, bits), base[n], bits)
                                           : deepshift_pack(0, 0, bits);
    }
    __syncthreads();
    EK_UNROLL
    for (int kk = 0; kk < kDsStepK; ++kk) {
      EK_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int32_t xv = xs[tm + 16 * r][kk];
        EK_UNROLL
        for (int c = 0; c < 4; ++c) acc[r][c] += deepshift_term(xv, ws[tn + 16 * c][kk]);
      }
    }
    __syncthreads();
  }
  EK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t m = m0 + tm + 16 * r;
    EK_UNROLL
    for (int c = 0; c < 4; ++c) {
      const int n = n0 + tn + 16 * c;
      if (m >= M || n >= N) continue;
      int64_t v = acc[r][c] + (bias != nullptr ? bias[n] : 0);
      v = v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v);
      y[m * N + n] = static_cast<int32_t>(v);
    }
  }
}

}  // namespace

const char* launch_deepshift_linear(const int32_t* x, const uint8_t* codes, const int32_t* base,
                                    const int32_t* bias, int32_t* y, int64_t M, int64_t N,
                                    int64_t K, int64_t code_cols, int bits, void* stream) {
  if (bits != 4 && bits != 5) return "bits must be 4 or 5";
  if (N > (1 << 30) || K > (1 << 30)) return "N and K must be below 2^30";
  const int64_t m_tiles = (M + kDsBlockM - 1) / kDsBlockM;
  const int64_t n_tiles = (N + kDsBlockN - 1) / kDsBlockN;
  if (m_tiles > INT32_MAX || n_tiles > 65535) return "the grid is too large";
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  deepshift_linear_kernel<<<grid, kDsThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, codes, base, bias, y, M, static_cast<int>(N), static_cast<int>(K),
      static_cast<int>(code_cols), bits);
  return last_launch_error();
}

}  // namespace shift
}  // namespace effkern
