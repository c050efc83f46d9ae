// Host-callable launchers for the integer (I-ViT) row kernels.
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (compiled by the
// host compiler against torch's stable ABI) and kernels/ (compiled by nvcc
// against CUDA only) meet here.  Every launcher runs one thread block per
// row of a contiguous [rows, L] matrix on `stream` (a cudaStream_t) and
// returns nullptr on success or the CUDA error string of the launch.
#pragma once

#include <stdint.h>

#include "kernels/common/dtypes.h"

namespace effkern {
namespace integer {

using effkern::IntType;  // kernels/common/dtypes.h

// x: [rows, L] of in_type (I8/I16/I32); y: [rows, L] int8 if out_bits == 8,
// int16 if out_bits == 16.
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
