// Shared device pieces of the integer row kernels: block-wide all-reduce and
// the row-length -> launch-configuration rule (last_launch_error comes from
// kernels/common/launch_error.cuh).  CUDA only (no torch).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kernels/common/launch_error.cuh"
#include "kernels/integer/integer_launch.h"
#include "kernels/integer/integer_math.cuh"

namespace effkern {
namespace integer {

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct AddOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct SatAddOp {  // min(a + b, 2^31 - 1) for a, b in [0, 2^31 - 1]
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return sat_add(a, b); }
};

// Reduces v over the whole block; every thread gets the result.  smem must
// hold BLOCK / 32 elements; the leading __syncthreads makes back-to-back
// calls on the same smem safe.  Ops are exact and associative, so the result
// does not depend on the reduction order.
template <int BLOCK, typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T* smem) {
  static_assert(BLOCK % 32 == 0 && BLOCK >= 32 && BLOCK <= 1024, "BLOCK must be a multiple of 32 in [32, 1024]");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  constexpr int kWarps = BLOCK / 32;
  if constexpr (kWarps == 1) {
    return v;
  } else {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    T r = smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
    return r;
  }
}

// Launch configurations, one block per row.  Rows of up to BLOCK * VPT
// elements are read once into registers (VPT per thread, strided by BLOCK so
// loads coalesce); longer rows (VPT == 0) loop over global memory in several
// passes (second and later reads mostly hit L2).
constexpr int kSmallBlock = 128, kSmallVpt = 8;  // L <= 1024
constexpr int kLargeBlock = 512, kLargeVpt = 8;  // L <= 4096, else looped

// Calls f(std::integral_constant<int, BLOCK>, std::integral_constant<int, VPT>).
template <typename F>
inline void dispatch_row_config(int64_t L, F&& f) {
  if (L <= (int64_t)kSmallBlock * kSmallVpt) {
    f(std::integral_constant<int, kSmallBlock>{}, std::integral_constant<int, kSmallVpt>{});
  } else if (L <= (int64_t)kLargeBlock * kLargeVpt) {
    f(std::integral_constant<int, kLargeBlock>{}, std::integral_constant<int, kLargeVpt>{});
  } else {
    f(std::integral_constant<int, kLargeBlock>{}, std::integral_constant<int, 0>{});
  }
}

}  // namespace integer
}  // namespace effkern
