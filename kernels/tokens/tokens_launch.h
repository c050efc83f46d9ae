// Host-callable launchers for the token gather/scatter kernels (the CUDA
// backend of effkern.ops.tokens' gather_rows / scatter_rows).
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (compiled by the
// host compiler against torch's stable ABI) and kernels/ (compiled by nvcc
// against CUDA only) meet here.  All tensors are contiguous; rows are moved
// as 16/8/4/2-byte vectors, the widest that the row size and every pointer
// allow.  Each output row is written once, by one group of lanes, with no
// atomics.  Launchers run on `stream` (a cudaStream_t), launch nothing for an
// empty output, and return nullptr on success or an error string (bad
// alignment, or the CUDA error of the launch).
#pragma once

#include <stdint.h>

#include "kernels/common/dtypes.h"

namespace effkern {
namespace tokens {

using effkern::FloatType;  // kernels/common/dtypes.h
using effkern::IndexType;

// out[b, k, :] = x[b, idx[b, k], :], a zero row where idx[b, k] is outside
// [0, N).  x: [B, N, row_bytes] bytes; idx: [B, K] of idx_type; out: [B, K,
// row_bytes].  Any element type: row_bytes = C * element size (even).
const char* launch_token_gather(const void* x, const void* idx, IndexType idx_type, void* out,
                                int64_t B, int64_t N, int64_t K, int64_t row_bytes,
                                void* stream);

// Out-of-place row scatter of y [B, K, C] into x [B, N, C] (both of `type`)
// along the plan order [B, K], starts [B, N + 1] (effkern.ops.tokens.scatter_plan;
// segment of row j: s in [starts[b, j], starts[b, j + 1]), clamped to [0, K]).
// add == false: out[b, j] = y[b, order[b, s1 - 1]] for a non-empty segment,
// else x[b, j].  add == true: x[b, j] + the segment's y rows, accumulated in
// float32 in ascending s, rounded once.  Order entries outside [0, K) are
// skipped (replace: fall back to x).  out: [B, N, C].
const char* launch_token_scatter(const void* x, const void* y, const int64_t* order,
                                 const int64_t* starts, FloatType type, bool add, void* out,
                                 int64_t B, int64_t N, int64_t K, int64_t C, void* stream);

}  // namespace tokens
}  // namespace effkern
