// Host-callable launchers for the integer (I-ViT) row kernels.
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (compiled by the
// host compiler against torch's stable ABI) and kernels/ (compiled by nvcc
// against CUDA only) meet here.  Every launcher works row by row on a
// contiguous [rows, L] matrix (a warp, part of one or a block per row, by
// row length: integer_common.cuh) on `stream` (a cudaStream_t) and returns
// nullptr on success, an argument error, or the CUDA error string of the launch.
#pragma once

#include <stdint.h>

#include "kernels/common/dtypes.h"

namespace effkern {
namespace integer {

using effkern::IntType;  // kernels/common/dtypes.h

// x: [rows, L] of in_type (I8/I16/I32); y: [rows, L] int8 if out_bits == 8,
// int16 if out_bits == 16.  Needs -x0 * 2^n <= 2^31 - 1 (32-bit exp terms).
const char* launch_int_softmax(const void* x, IntType in_type, void* y,
                               int64_t rows, int64_t L, int64_t x0, int n,
                               int out_bits, void* stream);

// x: [rows, L] of in_type (I8/I16); y: [rows, L] int32.
const char* launch_int_gelu(const void* x, IntType in_type, int32_t* y,
                            int64_t rows, int64_t L, int64_t x0, int n,
                            int out_bits, void* stream);

// x: [rows, C] of in_type (I8/I16); bias: [C] int32; y: [rows, C] int32.
const char* launch_int_layernorm(const void* x, IntType in_type,
                                 const int32_t* bias, int32_t* y, int64_t rows,
                                 int64_t C, int iters, void* stream);

}  // namespace integer
}  // namespace effkern
