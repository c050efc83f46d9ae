// I-ViT integer GELU (x * sigmoid(1.702 x) through the shift-exponential), T threads per row
// (integer_common.cuh: row layout, configurations).
//   m = max(row); e = shift_exp(I - m); em = shift_exp(-m) (2^31 if its shift
//   is >= 32); s = min(e + em, 2^31-1); f = (2^31-1) / s;
//   sig = (e * f) >> (32 - out_bits); y = I * sig  (int32 out).
// 32-bit arithmetic (integer_math.cuh): the exponent split uses a host-computed multiplier for
// the division by x0 (inputs are int8/int16, so P + 1 <= 94209); when K = -x0 * 2^n <= 2^31-1
// (kNarrow) every e fits 32 bits (gelu_out32), otherwise e is formed in 64 bits and only its
// clamp and the low word of e >> (32 - out_bits) are used (gelu_out32_wide).  em is computed
// once per row (int64 shift_exp).  The division (2^31-1) / s is per element by nature.
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

template <bool kNarrow>
__device__ __forceinline__ uint32_t gelu_elem(int32_t v, int32_t m, uint32_t em_c, const ShiftExp32& c,
                                              int out_bits) {
  const uint32_t b = exp_arg<false>(m, v, c);  // m - v in [0, 2^16)
  if constexpr (kNarrow) {
    return (uint32_t)gelu_out32(v, shift_exp32(b, c), em_c, out_bits);
  } else {
    return (uint32_t)gelu_out32_wide(v, shift_exp32_wide(b, c), em_c, out_bits);
  }
}

template <typename TIn, int T, int NV, int BLOCK, bool kNarrow>
__global__ void __launch_bounds__(BLOCK, kMinBlocks<BLOCK>)
    int_gelu_kernel(const TIn* __restrict__ x, int32_t* __restrict__ y, int64_t rows, int64_t L, int g0,
                    const ShiftExp32 c, int64_t x0, int n, int out_bits) {
  constexpr int VEC = ChunkElems<TIn, int32_t>::value;
  // scalar (head + tail) slots per thread, kept in registers on the register path; the looped
  // path (long rows) reads its few scalar elements again in each pass (for_rest) instead
  constexpr int NS = NV > 0 ? (2 * (VEC - 1) + T - 1) / T : 0;
  constexpr int NSA = NS > 0 ? NS : 1;  // array extent
  __shared__ int32_t s_max[BLOCK / 32];
  const int lane = threadIdx.x % T;
  const int64_t row = (int64_t)blockIdx.x * (BLOCK / T) + threadIdx.x / T;
  const bool valid = row < rows;  // rows past the end still join the reductions
  const RowSplit sp = row_split(valid ? row : 0, L, g0, VEC);
  const int64_t nc = valid ? sp.nc : 0, ns = valid ? sp.head + sp.tail : 0;
  const TIn* __restrict__ xr = x + (valid ? row : 0) * L;
  int32_t* __restrict__ yr = y + (valid ? row : 0) * L;
  const TIn* __restrict__ xc = xr + sp.head;  // chunk 0, 16-byte aligned
  int32_t* __restrict__ yc = yr + sp.head;

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
  // phase (g0 < 0, every element scalar) have them; read again in each pass
  auto for_rest = [&](auto&& f) {
#pragma unroll 1
    for (int64_t u = lane + (int64_t)NS * T; u < ns; u += T) f(scalar_index(u, sp, VEC));
  };
  for_rest([&](int64_t i) { m = max(m, (int32_t)xr[i]); });
  Chunk<TIn, VEC> in[NV > 0 ? NV : 1];
  if constexpr (NV > 0) {  // whole row in registers: one read of x
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t ci = lane + (int64_t)k * T;
      if (ci < nc) {
        in[k].load(xc + ci * VEC);
        const int32_t cm = in[k].max();
        m = cm > m ? cm : m;
      }
    }
  } else {
    for (int64_t ci = lane; ci < nc; ci += T) {
      in[0].load(xc + ci * VEC);
      const int32_t cm = in[0].max();
      m = cm > m ? cm : m;
    }
  }
  m = group_allreduce<T, BLOCK>(m, MaxI32{}, s_max);
  const int64_t em = shift_exp(-(int64_t)m, x0, n);  // once per row
  const uint32_t em_c = em < (int64_t)kOne32 ? (uint32_t)em : kOne32;

  auto write_chunk = [&](const Chunk<TIn, VEC>& ch, int64_t ci) {
    uint32_t v[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu_elem<kNarrow>(ch.get(j), m, em_c, c, out_bits);
    OutChunk<int32_t, VEC> o;
    o.set_all(v);
    o.store(yc + ci * VEC);
  };
  if constexpr (NV > 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t ci = lane + (int64_t)k * T;
      if (ci < nc) write_chunk(in[k], ci);
    }
  } else {
    for (int64_t ci = lane; ci < nc; ci += T) {
      in[0].load(xc + ci * VEC);
      write_chunk(in[0], ci);
    }
  }
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    if (is[k] >= 0) yr[is[k]] = (int32_t)gelu_elem<kNarrow>(xs[k], m, em_c, c, out_bits);
  }
  for_rest([&](int64_t i) { yr[i] = (int32_t)gelu_elem<kNarrow>((int32_t)xr[i], m, em_c, c, out_bits); });
}

template <typename TIn, bool kNarrow>
void run(const void* x, int32_t* y, int64_t rows, int64_t L, const ShiftExp32& c, int64_t x0, int n,
         int out_bits, cudaStream_t stream) {
  constexpr int VEC = ChunkElems<TIn, int32_t>::value;
  const void* ptrs[2] = {x, y};
  const int sizes[2] = {(int)sizeof(TIn), 4};
  const int g0 = chunk_phase(VEC, ptrs, sizes, 2);
  dispatch_rows(L, VEC, [&](auto t, auto nv, auto block) {
    constexpr int T = decltype(t)::value, NV = decltype(nv)::value, B = decltype(block)::value;
    int_gelu_kernel<TIn, T, NV, B, kNarrow><<<row_blocks<T, B>(rows), B, 0, stream>>>(
        static_cast<const TIn*>(x), y, rows, L, g0, c, x0, n, out_bits);
  });
}

template <typename TIn>
void run_regime(const void* x, int32_t* y, int64_t rows, int64_t L, const ShiftExp32& c, int64_t x0, int n,
                int out_bits, cudaStream_t stream) {
  if (c.narrow) {
    run<TIn, true>(x, y, rows, L, c, x0, n, out_bits, stream);
  } else {
    run<TIn, false>(x, y, rows, L, c, x0, n, out_bits, stream);
  }
}

}  // namespace

const char* launch_int_gelu(const void* x, IntType in_type, int32_t* y, int64_t rows, int64_t L,
                            int64_t x0, int n, int out_bits, void* stream) {
  if (rows <= 0 || L <= 0) return nullptr;
  ShiftExp32 c;
  if (!make_shift_exp32(x0, n, &c)) return "launch_int_gelu: x0 must be in [-2^30, -1] and n in [0, 31]";
  if (out_bits < 1 || out_bits > 31) return "launch_int_gelu: out_bits must be in [1, 31]";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run_regime<int8_t>(x, y, rows, L, c, x0, n, out_bits, s); break;
    case IntType::I16: run_regime<int16_t>(x, y, rows, L, c, x0, n, out_bits, s); break;
    default: return "launch_int_gelu: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
