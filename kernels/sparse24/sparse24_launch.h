// Host-callable launcher of the 2:4-sparse int8 GEMM (effkern/ops/sparse24.py).
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (host compiler, torch's stable
// ABI) and kernels/ (nvcc, CUDA only) meet here.  Returns nullptr on success, an argument
// error, or the CUDA error string of the launch.
#pragma once

#include <stdint.h>

#include "kernels/sparse24/sparse24_gemm.cuh"

namespace effkern {
namespace sparse24 {

// The fused epilogue's operands (effkern/ops/sparse24.py specifies the float order).
struct Epilogue {
  OutKind kind;
  Activation act;
  const float* x_scale;          // [M] (per token) or [1]
  bool x_scale_per_token;
  const float* w_scale;          // [N]
  const float* bias_f32;         // [N] or null (float outputs)
  const int32_t* bias_i32;       // [N] or null (int32 output)
  const float* inv_out_scale;    // [N] or [1] (int8 output): float32(1 / out_scale)
  bool out_scale_per_channel;
};

// y [M, N] = epilogue(x [M, K] int8 @ W^T) with W given by values int8 [N, K/2] and meta uint8
// [N, K/8] (sparse24_gemm.cuh); K % 64 == 0, x and values 16-byte, meta 8-byte aligned.
// plan = make_plan(M, N, K, sms); workspace: int32 [plan.split_k, M, N] when plan.split_k > 1.
const char* launch_sparse24_int8_linear(const int8_t* x, const int8_t* values, const uint8_t* meta,
                                        const Epilogue& ep, void* y, int32_t* workspace, const Plan& plan,
                                        int64_t M, int64_t N, int64_t K, void* stream);

}  // namespace sparse24
}  // namespace effkern
