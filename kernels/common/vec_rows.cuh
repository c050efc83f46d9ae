// Vector-row helpers shared by the kernel families that move rows of float
// elements (tokens, binary_hash): the element types F16 / BF16 / F32 (storage
// bits <-> float, round to nearest even), and the 2/4/8/16-byte vectors rows
// are moved in (Vec<VB>, load_vec / store_vec / zero_vec).
//
// Depends on nothing but CUDA's fp16/bf16 headers under nvcc, and on nothing
// at all otherwise: every helper is __host__ __device__ under nvcc and plain
// C++ elsewhere (EK_HD), so the kernels and the host checks
// (kernels/<family>/host_check.cpp) run the exact same arithmetic.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "kernels/common/host_device.h"

namespace effkern {

// ---- vectors ---------------------------------------------------------------------------------

#if defined(__CUDACC__)
template <int VB> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
#else
template <int VB> struct alignas(VB) HostVec { unsigned char b[VB]; };
template <int VB> struct VecOf { using type = HostVec<VB>; };
#endif
template <int VB> using Vec = typename VecOf<VB>::type;

template <typename V>
EK_HD V load_vec(const V* p) {
#if defined(__CUDA_ARCH__)
  return *p;
#else
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <typename V>
EK_HD void store_vec(V* p, const V& v) {
#if defined(__CUDA_ARCH__)
  *p = v;
#else
  memcpy(p, &v, sizeof(V));
#endif
}

template <typename V>
EK_HD V zero_vec() {
  return V();
}

// ---- element types: storage bits <-> float -------------------------------------------------

EK_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

EK_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

struct F32 {
  using storage = float;
  static EK_HD float load(float v) { return v; }
  static EK_HD float store(float f) { return f; }
};

struct BF16 {
  using storage = uint16_t;
  static EK_HD float load(uint16_t v) { return f32_from_bits((uint32_t)v << 16); }
  static EK_HD uint16_t store(float f) {  // round to nearest even
#if defined(__CUDACC__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    const uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  }
};

struct F16 {
  using storage = uint16_t;
  static EK_HD float load(uint16_t v) {
#if defined(__CUDACC__)
    return __half2float(__ushort_as_half(v));
#else
    const uint32_t sign = (uint32_t)(v & 0x8000u) << 16;
    const uint32_t e = (v >> 10) & 0x1fu, m = v & 0x3ffu;
    if (e == 0x1f) return f32_from_bits(sign | 0x7f800000u | (m << 13));  // inf / NaN
    if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
    const float sub = (float)m * (1.0f / 16777216.0f);  // m * 2^-24, exact
    return sign ? -sub : sub;
#endif
  }
  static EK_HD uint16_t store(float f) {  // round to nearest even
#if defined(__CUDACC__)
    return __half_as_ushort(__float2half_rn(f));
#else
    // F. Giesen's float_to_half_fast3_rtne.
    uint32_t u = f32_to_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t o;
    if (u >= (uint32_t)(127 + 16) << 23) {  // |f| >= 2^16: inf or NaN
      o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (u < (uint32_t)113 << 23) {  // half subnormal or zero
      const uint32_t magic_u = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
      const float r = f32_from_bits(u) + f32_from_bits(magic_u);
      o = f32_to_bits(r) - magic_u;
    } else {
      const uint32_t mant_odd = (u >> 13) & 1u;
      u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
      u += mant_odd;
      o = u >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
#endif
  }
};

}  // namespace effkern
