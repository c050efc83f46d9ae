// Host-callable launchers of the shift family (effkern/ops/shift.py).
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (compiled by the host compiler
// against torch's stable ABI) and kernels/ (nvcc, CUDA only) meet here.  Every launcher works
// on contiguous row-major matrices on `stream` (a cudaStream_t) and returns nullptr on
// success, an argument error, or the CUDA error string of the launch.
#pragma once

#include <stdint.h>

#include "kernels/common/dtypes.h"
#include "kernels/shift/shift_gemm.cuh"

namespace effkern {
namespace shift {

using effkern::FloatType;  // kernels/common/dtypes.h

// x [M, K] (type F16/BF16, K % 8 == 0, 16-byte aligned) @ W^T + bias [N] (x's type, or null)
// -> y [M, N] (x's type).  codes [N, code_cols] uint8 (bits 5: code_cols = K, K % 16 == 0;
// bits 4: 32 * ceil(K / 64)), 16-byte aligned; base [N] int32 in [-126, 127 - 2^(bits-1) + 2].
// plan = make_plan(M, N, K, sms); workspace: float32 [plan.split_k, M, N] when
// plan.split_k > 1, else unused.
const char* launch_shift_linear(const void* x, FloatType type, const uint8_t* codes,
                                const int32_t* base, const void* bias, void* y, float* workspace,
                                const Plan& plan, int64_t M, int64_t N, int64_t K, int64_t code_cols,
                                int bits, void* stream);

// y [M, N] int32 = saturate(bias + sum_k s * (x >> -p)) for x [M, K] int32 (16.16 fixed point)
// and codes / base as above (every exponent <= 0; no alignment needed); bias int32 or null.
const char* launch_deepshift_linear(const int32_t* x, const uint8_t* codes, const int32_t* base,
                                    const int32_t* bias, int32_t* y, int64_t M, int64_t N,
                                    int64_t K, int64_t code_cols, int bits, void* stream);

}  // namespace shift
}  // namespace effkern
