// The sparse tensor-core instruction of the 2:4 GEMM, in one place: the GEMM kernel
// (sparse24_int8_linear.cu) and the one-warp probe the GPU tests run first
// (tests/sparse24_probe.cu) both issue it through this function.  Device code only.
#pragma once

#include <stdint.h>

namespace effkern {
namespace sparse24 {

// d = A B + c for one 16 x 8 x 64 tile: A 2:4-sparse s8 (four registers of kept values, the
// metadata word e, sparsity selector 0), B s8, int32 accumulators (wrapping; no .satfinite).
// The operands' lane layout: sparse24_gemm.cuh and tests/sparse_mma_emulation.py.
__device__ __forceinline__ void mma_sp_16864(int32_t c[4], const uint32_t a[4], const uint32_t b[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

}  // namespace sparse24
}  // namespace effkern
