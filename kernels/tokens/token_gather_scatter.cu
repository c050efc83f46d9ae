// Token gather / scatter kernels: contiguous row moves, one group of G lanes
// (1..32, a power of two) per output row, kBlock / G rows per block,
// grid-strided over the rows.  The row code, the thread -> row mapping and the
// launch plan are in tokens_rows.cuh (shared with the host check).
#include "kernels/common/launch_error.cuh"
#include "kernels/tokens/tokens_launch.h"
#include "kernels/tokens/tokens_rows.cuh"

namespace effkern {
namespace tokens {
namespace {

template <typename V, typename Idx>
__global__ void __launch_bounds__(kBlock)
    token_gather_kernel(const V* __restrict__ x, const Idx* __restrict__ idx,
                        V* __restrict__ out, int64_t rows, int64_t N, int64_t K, int64_t nvec,
                        int log2g) {
  const RowLoop L(blockIdx.x, threadIdx.x, gridDim.x, log2g);
  for (int64_t r = L.first; r < rows; r += L.stride) {
    gather_row(x, idx, out, r, N, K, nvec, L.lane, L.G);
  }
}

template <typename V>
__global__ void __launch_bounds__(kBlock)
    token_scatter_replace_kernel(const V* __restrict__ x, const V* __restrict__ y,
                                 const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ starts, V* __restrict__ out,
                                 int64_t rows, int64_t N, int64_t K, int64_t nvec, int log2g) {
  const RowLoop L(blockIdx.x, threadIdx.x, gridDim.x, log2g);
  for (int64_t r = L.first; r < rows; r += L.stride) {
    scatter_replace_row(x, y, order, starts, out, r, N, K, nvec, L.lane, L.G);
  }
}

template <typename T, typename V>
__global__ void __launch_bounds__(kBlock)
    token_scatter_add_kernel(const V* __restrict__ x, const V* __restrict__ y,
                             const int64_t* __restrict__ order,
                             const int64_t* __restrict__ starts, V* __restrict__ out,
                             int64_t rows, int64_t N, int64_t K, int64_t nvec, int log2g) {
  const RowLoop L(blockIdx.x, threadIdx.x, gridDim.x, log2g);
  for (int64_t r = L.first; r < rows; r += L.stride) {
    scatter_add_row<T>(x, y, order, starts, out, r, N, K, nvec, L.lane, L.G);
  }
}

// Calls f(VbTag<vb>{}) for vb in 16/8/4/2 (VbTag<vb>::V: the vector type); false otherwise.
template <int VB> struct VbTag { using V = Vec<VB>; };

template <typename F>
bool dispatch_vec(int vb, F&& f) {
  switch (vb) {
    case 16: f(VbTag<16>{}); return true;
    case 8: f(VbTag<8>{}); return true;
    case 4: f(VbTag<4>{}); return true;
    case 2: f(VbTag<2>{}); return true;
    default: return false;
  }
}

template <typename T>
void launch_add(const Plan& p, const void* x, const void* y, const int64_t* order,
                const int64_t* starts, void* out, int64_t N, int64_t K, cudaStream_t s) {
  dispatch_vec(p.vb, [&](auto tag) {
    using V = typename decltype(tag)::V;
    if constexpr (sizeof(V) % sizeof(typename T::storage) == 0) {  // else excluded by the plan
      token_scatter_add_kernel<T, V><<<(unsigned)p.grid, kBlock, 0, s>>>(
          static_cast<const V*>(x), static_cast<const V*>(y), order, starts, static_cast<V*>(out),
          p.rows, N, K, p.nvec, p.log2g);
    }
  });
}

}  // namespace

const char* launch_token_gather(const void* x, const void* idx, IndexType idx_type, void* out,
                                int64_t B, int64_t N, int64_t K, int64_t row_bytes,
                                void* stream) {
  if (B <= 0 || K <= 0 || row_bytes <= 0) return nullptr;
  if (idx_type != IndexType::I64 && idx_type != IndexType::I32) {
    return "launch_token_gather: unsupported index type";
  }
  const Plan p = gather_launch_plan(x, out, B, K, row_bytes);
  if (p.vb == 0) return "launch_token_gather: rows and pointers must be 2-byte aligned";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_vec(p.vb, [&](auto tag) {
    using V = typename decltype(tag)::V;
    if (idx_type == IndexType::I64) {
      token_gather_kernel<V, int64_t><<<(unsigned)p.grid, kBlock, 0, s>>>(
          static_cast<const V*>(x), static_cast<const int64_t*>(idx), static_cast<V*>(out),
          p.rows, N, K, p.nvec, p.log2g);
    } else {
      token_gather_kernel<V, int32_t><<<(unsigned)p.grid, kBlock, 0, s>>>(
          static_cast<const V*>(x), static_cast<const int32_t*>(idx), static_cast<V*>(out),
          p.rows, N, K, p.nvec, p.log2g);
    }
  });
  return last_launch_error();
}

const char* launch_token_scatter(const void* x, const void* y, const int64_t* order,
                                 const int64_t* starts, FloatType type, bool add, void* out,
                                 int64_t B, int64_t N, int64_t K, int64_t C, void* stream) {
  if (B <= 0 || N <= 0 || C <= 0) return nullptr;
  int elem = 0;
  switch (type) {
    case FloatType::F16: case FloatType::BF16: elem = 2; break;
    case FloatType::F32: elem = 4; break;
    default: return "launch_token_scatter: unsupported element type";
  }
  const Plan p = scatter_launch_plan(x, y, out, B, N, K, C, elem);
  if (p.vb == 0) {
    return "launch_token_scatter: rows and pointers must be aligned to the element size";
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (!add) {
    dispatch_vec(p.vb, [&](auto tag) {
      using V = typename decltype(tag)::V;
      token_scatter_replace_kernel<V><<<(unsigned)p.grid, kBlock, 0, s>>>(
          static_cast<const V*>(x), static_cast<const V*>(y), order, starts, static_cast<V*>(out),
          p.rows, N, K, p.nvec, p.log2g);
    });
  } else if (type == FloatType::F16) {
    launch_add<F16>(p, x, y, order, starts, out, N, K, s);
  } else if (type == FloatType::BF16) {
    launch_add<BF16>(p, x, y, order, starts, out, N, K, s);
  } else {
    launch_add<F32>(p, x, y, order, starts, out, N, K, s);
  }
  return last_launch_error();
}

}  // namespace tokens
}  // namespace effkern
