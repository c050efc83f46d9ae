// I-ViT integer LayerNorm (no affine scale; the bias is pre-quantised), T threads per row of C
// channels (integer_common.cuh: row layout, configurations).
//   mu = round-half-even(sum(I) / C); y = I - mu; var = sum(y^2) (int64);
//   k = 2^16, iters x: k = (k + var / k) / 2; f = (2^31-1) / k;
//   out = ((y * f) >> 1) + bias[c]  (int32 out).
// One pass gives sum(I) and sum(I^2) (var = sumsq - 2 mu sum + C mu^2, layernorm_var); the
// per-row scalar work (mu, the square-root iteration, f: 64-bit divides) is done once per row,
// by one thread, the rows of a block in parallel, and broadcast through shared memory.  The
// output is 32-bit (layernorm_out32: |y * f| <= 2^31 - 1, y * f = x * f - mu * f).
#include "kernels/integer/integer_common.cuh"

namespace effkern {
namespace integer {
namespace {

// sum and sum of squares of a chunk, added to s and q.  int8: four lanes per dp4a (a chunk's
// sums stay far inside int32); int16: squares up to 2^30, accumulated in int64.
template <typename TIn, int VEC>
__device__ __forceinline__ void chunk_sums(const Chunk<TIn, VEC>& ch, int64_t& s, int64_t& q) {
  if constexpr (sizeof(TIn) == 1) {
    int32_t cs = 0, cq = 0;
#pragma unroll
    for (int i = 0; i < Chunk<TIn, VEC>::kWords; ++i) {
      cs = __dp4a((int)ch.w[i], 0x01010101, cs);
      cq = __dp4a((int)ch.w[i], (int)ch.w[i], cq);
    }
    s += cs;
    q += cq;
  } else {
    int32_t cs = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int32_t v = ch.get(j);
      cs += v;
      q += (int64_t)(v * v);  // |v| <= 2^15: v * v <= 2^30
    }
    s += cs;
  }
}

template <typename TIn, int T, int NV, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinBlocks<BLOCK>)
    int_layernorm_kernel(const TIn* __restrict__ x, const int32_t* __restrict__ bias,
                         int32_t* __restrict__ out, int64_t rows, int64_t C, int g0, int iters) {
  constexpr int VEC = ChunkElems<TIn, int32_t>::value;
  // scalar (head + tail) slots per thread, kept in registers on the register path; the looped
  // path (long rows) reads its few scalar elements again in each pass (for_rest) instead
  constexpr int NS = NV > 0 ? (2 * (VEC - 1) + T - 1) / T : 0;
  constexpr int NSA = NS > 0 ? NS : 1;  // array extent
  constexpr int R = BLOCK / T;                     // rows per block
  __shared__ int64_t s_red[BLOCK / 32];
  __shared__ int64_t s_sum[R], s_sq[R];
  __shared__ int32_t s_mu[R], s_f[R];
  const int lane = threadIdx.x % T, rb = threadIdx.x / T;
  const int64_t row = (int64_t)blockIdx.x * R + rb;
  const bool valid = row < rows;  // rows past the end still join the reductions and barriers
  const RowSplit sp = row_split(valid ? row : 0, C, g0, VEC);
  const int64_t nc = valid ? sp.nc : 0, ns = valid ? sp.head + sp.tail : 0;
  const TIn* __restrict__ xr = x + (valid ? row : 0) * C;
  int32_t* __restrict__ outr = out + (valid ? row : 0) * C;
  const TIn* __restrict__ xc = xr + sp.head;  // chunk 0, 16-byte aligned
  int32_t* __restrict__ oc = outr + sp.head;
  const int32_t* __restrict__ bc = bias + sp.head;
  const bool bias_vec = reinterpret_cast<uintptr_t>(bc) % 16 == 0;  // per row: head varies

  int64_t is[NSA];  // scalar elements: index in the row, or -1
  int32_t xs[NSA];
  int64_t sum = 0, sq = 0;
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t u = lane + (int64_t)k * T;
    is[k] = u < ns ? scalar_index(u, sp, VEC) : -1;
    xs[k] = is[k] >= 0 ? (int32_t)xr[is[k]] : 0;
    sum += xs[k];
    sq += (int64_t)(xs[k] * xs[k]);
  }
  // scalar elements beyond the NS slots: only rows whose x and out admit no common 16-byte
  // phase (g0 < 0, every element scalar) have them; read again in each pass
  auto for_rest = [&](auto&& f) {
#pragma unroll 1
    for (int64_t u = lane + (int64_t)NS * T; u < ns; u += T) f(scalar_index(u, sp, VEC));
  };
  for_rest([&](int64_t i) {
    const int32_t v = xr[i];
    sum += v;
    sq += (int64_t)(v * v);
  });
  Chunk<TIn, VEC> in[NV > 0 ? NV : 1];
  if constexpr (NV > 0) {  // whole row in registers: one read of x
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t ci = lane + (int64_t)k * T;
      if (ci < nc) {
        in[k].load(xc + ci * VEC);
        chunk_sums(in[k], sum, sq);
      }
    }
  } else {
    for (int64_t ci = lane; ci < nc; ci += T) {
      in[0].load(xc + ci * VEC);
      chunk_sums(in[0], sum, sq);
    }
  }
  sum = group_allreduce<T, BLOCK>(sum, AddI64{}, s_red);
  sq = group_allreduce<T, BLOCK>(sq, AddI64{}, s_red);
  // once per row: thread rb of the block computes row rb's mu and f
  if (lane == 0) {
    s_sum[rb] = sum;
    s_sq[rb] = sq;
  }
  __syncthreads();
  if (threadIdx.x < R && (int64_t)blockIdx.x * R + threadIdx.x < rows) {
    const int64_t mu = round_half_even_div(s_sum[threadIdx.x], C);
    const int64_t var = layernorm_var(s_sum[threadIdx.x], s_sq[threadIdx.x], mu, C);
    s_mu[threadIdx.x] = (int32_t)mu;                            // |mu| <= 2^15
    s_f[threadIdx.x] = (int32_t)layernorm_factor32(var, iters);  // in [0, 2^31 - 1]
  }
  __syncthreads();
  const int32_t f = s_f[rb];
  const uint32_t muf = layernorm_muf(s_mu[rb], f);

  auto write_chunk = [&](const Chunk<TIn, VEC>& ch, int64_t ci) {
    Chunk<int32_t, VEC> b;
    if (bias_vec) {
      b.load(bc + ci * VEC);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b.w[j] = (uint32_t)__ldg(bc + ci * VEC + j);
    }
    OutChunk<int32_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.w[j] = (uint32_t)layernorm_out32(ch.get(j), muf, f, (int32_t)b.w[j]);
    o.store(oc + ci * VEC);
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
    if (is[k] >= 0) {
      outr[is[k]] = layernorm_out32(xs[k], muf, f, __ldg(bias + is[k]));
    }
  }
  for_rest([&](int64_t i) { outr[i] = layernorm_out32((int32_t)xr[i], muf, f, __ldg(bias + i)); });
}

template <typename TIn>
void run(const void* x, const int32_t* bias, int32_t* out, int64_t rows, int64_t C, int iters,
         cudaStream_t stream) {
  constexpr int VEC = ChunkElems<TIn, int32_t>::value;
  const void* ptrs[2] = {x, out};
  const int sizes[2] = {(int)sizeof(TIn), 4};
  const int g0 = chunk_phase(VEC, ptrs, sizes, 2);
  dispatch_rows(C, VEC, [&](auto t, auto nv, auto block) {
    constexpr int T = decltype(t)::value, NV = decltype(nv)::value, B = decltype(block)::value;
    int_layernorm_kernel<TIn, T, NV, B><<<row_blocks<T, B>(rows), B, 0, stream>>>(
        static_cast<const TIn*>(x), bias, out, rows, C, g0, iters);
  });
}

}  // namespace

const char* launch_int_layernorm(const void* x, IntType in_type, const int32_t* bias,
                                 int32_t* out, int64_t rows, int64_t C, int iters, void* stream) {
  if (rows <= 0 || C <= 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_type) {
    case IntType::I8: run<int8_t>(x, bias, out, rows, C, iters, s); break;
    case IntType::I16: run<int16_t>(x, bias, out, rows, C, iters, s); break;
    default: return "launch_int_layernorm: unsupported input type";
  }
  return last_launch_error();
}

}  // namespace integer
}  // namespace effkern
