// Shared device pieces of the integer row kernels: the row layout (T threads per row,
// BLOCK / T rows per block; each row's aligned middle moves as chunks of VEC elements in
// 16-byte vectors, row_split in integer_math.cuh, its unaligned head and tail, < VEC elements
// each, element by element), the all-reductions over a row's threads and the row-length ->
// launch-configuration rule (last_launch_error comes from kernels/common/launch_error.cuh).
// CUDA only (no torch).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kernels/common/launch_error.cuh"
#include "kernels/common/vec_rows.cuh"
#include "kernels/integer/integer_launch.h"
#include "kernels/integer/integer_math.cuh"

namespace effkern {
namespace integer {

// Combines the per-warp values v (each already reduced over its warp) over the block; every
// thread gets the result.  smem holds BLOCK / 32 values; the leading __syncthreads makes
// back-to-back calls on the same smem safe.
template <int BLOCK, typename V, typename Op>
__device__ __forceinline__ V block_allreduce_warps(V v, Op op, V* smem) {
  static_assert(BLOCK % 32 == 0 && BLOCK >= 32 && BLOCK <= 1024, "BLOCK must be a multiple of 32 in [32, 1024]");
  constexpr int kWarps = BLOCK / 32;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  V r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

// Elements per chunk: 16 bytes of the narrower of input and output, so both sides move in
// whole 16-byte vectors.
template <typename TIn, typename TOut>
struct ChunkElems {
  static constexpr int value = 16 / (int)(sizeof(TIn) < sizeof(TOut) ? sizeof(TIn) : sizeof(TOut));
};

// Bytes of w picked by the PTX prmt selector sel (default mode: a nibble 8 + k replicates the
// sign of byte k).
__device__ __forceinline__ int32_t prmt_sx(uint32_t w, uint32_t sel) {
  int32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(w), "r"(sel));
  return r;
}

// VEC elements of an integer type T held as 32-bit words, loaded / stored as 16-byte vectors.
template <typename T, int VEC>
struct Chunk {
  static_assert(VEC * sizeof(T) % 16 == 0, "a chunk is whole 16-byte vectors");
  static constexpr int kWords = VEC * (int)sizeof(T) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const T* p) {
    const Vec<16>* v = reinterpret_cast<const Vec<16>*>(p);
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const Vec<16> u = __ldg(v + i);
      w[4 * i] = u.x; w[4 * i + 1] = u.y; w[4 * i + 2] = u.z; w[4 * i + 3] = u.w;
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    // inline PTX: a plain uint4 store is sometimes split into four 4-byte stores by nvcc
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<char*>(p) + 16 * i),
                   "r"(w[4 * i]), "r"(w[4 * i + 1]), "r"(w[4 * i + 2]), "r"(w[4 * i + 3])
                   : "memory");
    }
  }
  // element j (a compile-time constant after unrolling), sign-extended by one byte permute:
  // PTX prmt, whose selector nibble 8 + k gives the sign of byte k (the __byte_perm intrinsic
  // keeps only 3 bits of each nibble, so it cannot sign-extend)
  __device__ __forceinline__ int32_t get(int j) const {
    if constexpr (sizeof(T) == 1) {
      const unsigned k = j % 4;
      return prmt_sx(w[j / 4], k | (8u + k) << 4 | (8u + k) << 8 | (8u + k) << 12);
    } else if constexpr (sizeof(T) == 2) {
      return prmt_sx(w[j / 2], j % 2 ? 0xBB32u : 0x9910u);
    } else {
      return (int32_t)w[j];
    }
  }
  // the maximum of the chunk's elements (int16: SIMD halfword max, native on sm_90; int8:
  // per element, which sm_90 folds into 3-way max instructions)
  __device__ __forceinline__ int32_t max() const {
    if constexpr (sizeof(T) == 2) {
      uint32_t m = w[0];
#pragma unroll
      for (int i = 1; i < kWords; ++i) m = __vmaxs2(m, w[i]);
      m = __vmaxs2(m, m >> 16);
      return prmt_sx(m, 0x9910u);
    } else {
      int32_t m = get(0);
#pragma unroll
      for (int j = 1; j < VEC; ++j) m = m > get(j) ? m : get(j);
      return m;
    }
  }
};

// Output chunk built from 32-bit values: element j gets the low bits of v (an int8/int16/int32
// conversion), or, with kHigh, the top sizeof(T) bytes of a value < 2^31 (a right shift by
// 32 - 8*sizeof(T) folded into the byte permutation).
template <typename T, int VEC>
struct OutChunk : Chunk<T, VEC> {
  template <bool kHigh = false>
  __device__ __forceinline__ void set_all(const uint32_t (&v)[VEC]) {
    if constexpr (sizeof(T) == 1) {
#pragma unroll
      for (int i = 0; i < VEC / 4; ++i) {
        const uint32_t lo = __byte_perm(v[4 * i], v[4 * i + 1], kHigh ? 0x0073 : 0x0040);
        const uint32_t hi = __byte_perm(v[4 * i + 2], v[4 * i + 3], kHigh ? 0x0073 : 0x0040);
        this->w[i] = __byte_perm(lo, hi, 0x5410);
      }
    } else if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int i = 0; i < VEC / 2; ++i) {
        this->w[i] = __byte_perm(v[2 * i], v[2 * i + 1], kHigh ? 0x7632 : 0x5410);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) this->w[i] = v[i];
    }
  }
};

struct MaxI32 {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};
struct SatAddU32 {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return sat_add32(a, b); }
};
struct AddI64 {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// All-reduce over the T threads of a row (T <= 32: an aligned group of lanes, shuffles only;
// T > 32: the whole block, T == BLOCK, through smem[BLOCK / 32]).  Every thread of the block
// must call it (rows past the end included).  Ops are exact and associative.
template <int T, int BLOCK, typename V, typename Op>
__device__ __forceinline__ V group_allreduce(V v, Op op, V* smem) {
  static_assert(T <= 32 ? (32 % T == 0) : T == BLOCK, "a row is a lane group or the whole block");
  constexpr int kLanes = T < 32 ? T : 32;
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (T > 32) {
    return block_allreduce_warps<BLOCK>(v, op, smem);
  } else {
    return v;
  }
}

// Launch configurations, chosen by the chunks per row nc = L / VEC.  Rows up to T * NV chunks
// keep their values in registers (one read of x); longer rows (NV == 0) loop over global
// memory, one pass per reduction (later passes mostly hit L2).  Short rows share a warp
// (T = 16: two rows), so that the lanes are busy on the arithmetic, which bounds these kernels.
constexpr int kRowsBlock = 128;   // threads per block for T <= 128
constexpr int kLoopBlock = 512;   // threads per block (= per row) of the looped path

// Blocks per SM the kernels are compiled for, i.e. at most 64 registers a thread (half the
// SM's warps resident): without it ptxas sizes the 512-thread looped kernels for three blocks
// (40 registers) and spills, and a bound of one block lets the 128-thread ones take 110.
template <int BLOCK>
constexpr int kMinBlocks = 1024 / BLOCK;

// Calls f(integral_constant T, integral_constant NV, integral_constant BLOCK).
template <typename F>
inline void dispatch_rows(int64_t L, int vec, F&& f) {
  const int64_t nc = L / vec;
  using std::integral_constant;
  if (nc <= 16) {
    f(integral_constant<int, 16>{}, integral_constant<int, 1>{}, integral_constant<int, kRowsBlock>{});
  } else if (nc <= 32) {
    f(integral_constant<int, 32>{}, integral_constant<int, 1>{}, integral_constant<int, kRowsBlock>{});
  } else if (nc <= 64) {
    f(integral_constant<int, 32>{}, integral_constant<int, 2>{}, integral_constant<int, kRowsBlock>{});
  } else if (nc <= 256) {
    f(integral_constant<int, 128>{}, integral_constant<int, 2>{}, integral_constant<int, kRowsBlock>{});
  } else {
    f(integral_constant<int, kLoopBlock>{}, integral_constant<int, 0>{}, integral_constant<int, kLoopBlock>{});
  }
}

// The chunk phase g0 (row_split) for 16-byte vectors of ChunkElems elements on every pointer
// in ptrs (element sizes sizes): the least g0 in [0, vec) with every ptr + g0 * size 16-byte
// aligned, or -1 (then every element goes the scalar way).
inline int chunk_phase(int vec, const void* const* ptrs, const int* sizes, int count) {
  for (int g0 = 0; g0 < vec; ++g0) {
    bool ok = true;
    for (int i = 0; i < count; ++i) {
      ok = ok && ((reinterpret_cast<uintptr_t>(ptrs[i]) + (uintptr_t)g0 * sizes[i]) % 16 == 0);
    }
    if (ok) return g0;
  }
  return -1;
}

// Blocks for rows rows, BLOCK / T rows per block.
template <int T, int BLOCK>
inline unsigned row_blocks(int64_t rows) {
  constexpr int R = BLOCK / T;
  return (unsigned)((rows + R - 1) / R);
}

}  // namespace integer
}  // namespace effkern
