// I-ViT integer softmax, T threads per row (integer_common.cuh: row layout, configurations).
//   m = max(row); e = shift_exp(I - m) (>= 1); s = min(sum e, 2^31-1);
//   f = (2^31-1) / s; y = (e * f) >> (32 - out_bits)  (int8 or int16 out).
// All in 32 bits (integer_math.cuh, shift_exp32): the launcher requires K = -x0 * 2^n <= 2^31-1
// (as effkern.ops.integer does), so every e <= K fits, e + s < 2^32 before the saturation, and
// e * f <= 2^31 - 1 (e <= s, or s saturated and f = 1).  The division by x0 is a host-computed
// multiplier (make_shift_exp32); the one division left is (2^31-1) / s, once per row.
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

template <typename TIn, typename TOut, int T, int NV, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinBlocks<BLOCK>)
    int_softmax_kernel(const TIn* __restrict__ x, TOut* __restrict__ y, int64_t rows, int64_t L,
                       int g0, const ShiftExp32 c) {
  constexpr int VEC = ChunkElems<TIn, TOut>::value;
  // scalar (head + tail) slots per thread, kept in registers on the register path; the looped
  // path (long rows) reads its few scalar elements again in each pass (for_rest) instead
  constexpr int NS = NV > 0 ? (2 * (VEC - 1) + T - 1) / T : 0;
  constexpr int NSA = NS > 0 ? NS : 1;  // array extent
  constexpr bool kClampA = sizeof(TIn) == 4;      // m - x may exceed 2^16
  __shared__ int32_t s_max[BLOCK / 32];
  __shared__ uint32_t s_sum[BLOCK / 32];
  const int lane = threadIdx.x % T;
  const int64_t row = (int64_t)blockIdx.x * (BLOCK / T) + threadIdx.x / T;
  const bool valid = row < rows;  // rows past the end still join the reductions
  const RowSplit sp = row_split(valid ? row : 0, L, g0, VEC);
  const int64_t nc = valid ? sp.nc : 0, ns = valid ? sp.head + sp.tail : 0;
  const TIn* __restrict__ xr = x + (valid ? row : 0) * L;
  TOut* __restrict__ yr = y + (valid ? row : 0) * L;
  const TIn* __restrict__ xc = xr + sp.head;  // chunk 0, 16-byte aligned
  TOut* __restrict__ yc = yr + sp.head;

  int64_t is[NSA];  // scalar elements: index in the row, or -1
  int32_t xs[NSA];
  int32_t m = INT32_MIN;
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t u = lane + (int64_t)k * T;
    is[k] = u < ns ? scalar_index(u, sp, VEC) : -1;
    xs[k] = is[k] >= 0 ? (int32_t)xr[is[k]] : INT32_MIN;
    m = xs[k] > m ? xs[k] : m;
  }
  // scalar elements beyond the NS slots: only rows whose x and y admit no common 16-byte
  // phase (g0 < 0, every element scalar) have them; recomputed in each pass
  auto for_rest = [&](auto&& f) {
#pragma unroll 1
    for (int64_t u = lane + (int64_t)NS * T; u < ns; u += T) f(scalar_index(u, sp, VEC));
  };
  for_rest([&](int64_t i) { m = max(m, (int32_t)xr[i]); });
  auto e_at = [&](int64_t i) { return shift_exp32(exp_arg<kClampA>(m, (int32_t)xr[i], c), c); };
  uint32_t es[NSA];

  if constexpr (NV > 0) {  // whole row in registers: one read of x
    Chunk<TIn, VEC> in[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t ci = lane + (int64_t)k * T;
      if (ci < nc) {
        in[k].load(xc + ci * VEC);
        const int32_t cm = in[k].max();
        m = cm > m ? cm : m;
      }
    }
    m = group_allreduce<T, BLOCK>(m, MaxI32{}, s_max);
    uint32_t e[NV][VEC];
    uint32_t s = 0;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (lane + (int64_t)k * T < nc) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          e[k][j] = shift_exp32(exp_arg<kClampA>(m, in[k].get(j), c), c);
          s = sat_add32(s, e[k][j]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      es[k] = is[k] >= 0 ? shift_exp32(exp_arg<kClampA>(m, xs[k], c), c) : 0;
      s = sat_add32(s, es[k]);
    }
    for_rest([&](int64_t i) { s = sat_add32(s, e_at(i)); });
    s = group_allreduce<T, BLOCK>(s, SatAddU32{}, s_sum);
    const uint32_t f = kOne32 / (s > 0 ? s : 1);  // s >= 1 on every valid row
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t ci = lane + (int64_t)k * T;
      if (ci < nc) {
        uint32_t p[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) p[j] = e[k][j] * f;  // < 2^31: (p >> (32-bits)) = top bytes
        OutChunk<TOut, VEC> o;
        o.template set_all<true>(p);
        o.store(yc + ci * VEC);
      }
    }
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      if (is[k] >= 0) yr[is[k]] = (TOut)softmax_out32(es[k], f, 8 * sizeof(TOut));
    }
    for_rest([&](int64_t i) { yr[i] = (TOut)softmax_out32(e_at(i), f, 8 * sizeof(TOut)); });
  } else {  // long row: pass 1 max, pass 2 sum, pass 3 recompute e and write
    for (int64_t ci = lane; ci < nc; ci += T) {
      Chunk<TIn, VEC> in;
      in.load(xc + ci * VEC);
      const int32_t cm = in.max();
      m = cm > m ? cm : m;
    }
    m = group_allreduce<T, BLOCK>(m, MaxI32{}, s_max);
    uint32_t s = 0;
    for (int64_t ci = lane; ci < nc; ci += T) {
      Chunk<TIn, VEC> in;
      in.load(xc + ci * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s = sat_add32(s, shift_exp32(exp_arg<kClampA>(m, in.get(j), c), c));
    }
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      es[k] = is[k] >= 0 ? shift_exp32(exp_arg<kClampA>(m, xs[k], c), c) : 0;
      s = sat_add32(s, es[k]);
    }
    for_rest([&](int64_t i) { s = sat_add32(s, e_at(i)); });
    s = group_allreduce<T, BLOCK>(s, SatAddU32{}, s_sum);
    const uint32_t f = kOne32 / (s > 0 ? s : 1);
    for (int64_t ci = lane; ci < nc; ci += T) {
      Chunk<TIn, VEC> in;
      in.load(xc + ci * VEC);
      uint32_t p[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) p[j] = shift_exp32(exp_arg<kClampA>(m, in.get(j), c), c) * f;
      OutChunk<TOut, VEC> o;
      o.template set_all<true>(p);
      o.store(yc + ci * VEC);
    }
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      if (is[k] >= 0) yr[is[k]] = (TOut)softmax_out32(es[k], f, 8 * sizeof(TOut));
    }
    for_rest([&](int64_t i) { yr[i] = (TOut)softmax_out32(e_at(i), f, 8 * sizeof(TOut)); });
  }
}

template <typename TIn, typename TOut>
void run(const void* x, void* y, int64_t rows, int64_t L, const ShiftExp32& c, cudaStream_t stream) {
  constexpr int VEC = ChunkElems<TIn, TOut>::value;
  const void* ptrs[2] = {x, y};
  const int sizes[2] = {(int)sizeof(TIn), (int)sizeof(TOut)};
  const int g0 = chunk_phase(VEC, ptrs, sizes, 2);
  dispatch_rows(L, VEC, [&](auto t, auto nv, auto block) {
    constexpr int T = decltype(t)::value, NV = decltype(nv)::value, B = decltype(block)::value;
    int_softmax_kernel<TIn, TOut, T, NV, B><<<row_blocks<T, B>(rows), B, 0, stream>>>(
        static_cast<const TIn*>(x), static_cast<TOut*>(y), rows, L, g0, c);
  });
}

template <typename TIn>
void run_out(const void* x, void* y, int64_t rows, int64_t L, const ShiftExp32& c, int out_bits,
             cudaStream_t stream) {
  if (out_bits == 8) {
    run<TIn, int8_t>(x, y, rows, L, c, stream);
  } else {
    run<TIn, int16_t>(x, y, rows, L, c, stream);
  }
}

}  // namespace

const char* launch_int_softmax(const void* x, IntType in_type, void* y, int64_t rows, int64_t L,
                               int64_t x0, int n, int out_bits, void* stream) {
  if (rows <= 0 || L <= 0) return nullptr;
  if (out_bits != 8 && out_bits != 16) return "launch_int_softmax: out_bits must be 8 or 16";
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c)) return "launch_int_softmax: x0 must be in [-2^30, -1] and n in [0, 31]";
  if (!c.narrow) return "launch_int_softmax: -x0 * 2^n must be at most 2^31 - 1";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run_out<int8_t>(x, y, rows, L, c, out_bits, s); break;
    case IntType::I16: run_out<int16_t>(x, y, rows, L, c, out_bits, s); break;
    case IntType::I32: run_out<int32_t>(x, y, rows, L, c, out_bits, s); break;
    default: return "launch_int_softmax: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
