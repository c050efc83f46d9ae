// Binary-hash attention kernels (EcoFormer / ShiftAddViT linear attention from
// packed codes).  Two or three launches on the caller's stream:
//   pass 1 binary_kv_kernel: one warp per item (head, token split, kKvBits code bits),
//     kKvWarps per block of kKvBlock, grid min(ceil(items / kKvWarps), kMaxGrid),
//     grid-strided; with one split (N <= kKvMinChunk) it writes KV and ksum.
//   pass 1b binary_kv_reduce_kernel (more than one split): the splits' partials
//     summed in ascending split order, 4 floats per thread (no atomics).
//   pass 2 binary_out_kernel: grid min(BH * ceil(N / kTokensPerBlock),
//     kMaxGrid) blocks of kBlock, one warp per token, grid-strided.
// The per-thread code is in binary_attention.cuh (shared with host_check.cpp).
#include "kernels/binary_hash/binary_attention.cuh"
#include "kernels/binary_hash/binary_hash_launch.h"
#include "kernels/common/launch_error.cuh"

namespace effkern {
namespace binary_hash {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kKvBlock, kKvMinBlocks)
    binary_kv_kernel(const typename T::storage* __restrict__ v,
                     const int32_t* __restrict__ k_codes, float* __restrict__ kv_out,
                     float* __restrict__ cnt_out, int64_t BH, int64_t N, int64_t nbits,
                     int64_t chunk, int64_t splits, bool is_signed, bool vec_ok) {
  using L = KvLayout<D>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total = kv_items(BH, nbits, splits);
  for (int64_t item = (int64_t)blockIdx.x * kKvWarps + warp; item < total;
       item += (int64_t)gridDim.x * kKvWarps) {  // uniform over the warp
    const KvItem it = kv_item(item, N, nbits, chunk, splits);
    float acc[kKvCols][kKvBits];
    int32_t cnt[L::kCounted];
    kv_accumulate<T, D>(v, k_codes, it, lane, N, nbits, is_signed, vec_ok, acc, cnt);
#pragma unroll
    for (int off = L::kColGroups; off < 32; off <<= 1) {  // over the token slots
#pragma unroll
      for (int e = 0; e < kKvCols; ++e) {
#pragma unroll
        for (int k = 0; k < kKvBits; ++k) acc[e][k] += __shfl_xor_sync(0xffffffffu, acc[e][k], off);
      }
#pragma unroll
      for (int m = 0; m < L::kCounted; ++m) cnt[m] += __shfl_xor_sync(0xffffffffu, cnt[m], off);
    }
    kv_store<T, D>(kv_out, cnt_out, it, lane, BH, N, nbits, splits, is_signed, acc, cnt);
  }
}

template <int D>
__global__ void __launch_bounds__(kBlock)
    binary_kv_reduce_kernel(const float* __restrict__ part_kv, const float* __restrict__ part_cnt,
                            float* __restrict__ kv, float* __restrict__ ksum, int64_t BH,
                            int64_t N, int64_t nbits, int64_t splits, bool is_signed) {
  const int64_t total = kv_reduce_units(BH, nbits, D);
  for (int64_t t = (int64_t)blockIdx.x * kBlock + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * kBlock) {
    kv_reduce(part_kv, part_cnt, kv, ksum, t, BH, N, nbits, D, splits, is_signed);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBlock)
    binary_out_kernel(const typename T::storage* __restrict__ v,
                      const int32_t* __restrict__ q_codes, const float* __restrict__ kv,
                      const float* __restrict__ ksum, typename T::storage* __restrict__ out,
                      int64_t BH, int64_t N, int64_t nbits, bool ecoformer) {
  const int64_t tiles = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  const int64_t total = BH * tiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t bh = blk / tiles;
    const int64_t n0 = (blk % tiles) * kTokensPerBlock + (int64_t)warp * kTokensPerWarp;
    for (int s = 0; s < kTokensPerWarp; ++s) {
      const int64_t n = n0 + s;
      if (n >= N) break;  // uniform over the warp
      float val[Layout<D>::kColsPerLane];
      float sq = token_partial<T, D>(v, q_codes, kv, ksum, bh, n, lane, N, nbits, ecoformer, val);
      if (!ecoformer) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
      }
      token_store<T, D>(out, bh, n, lane, N, ecoformer, sq, val);
    }
  }
}

template <typename T, int D>
const char* launch_typed(const void* v, const int32_t* q_codes, const int32_t* k_codes,
                         bool ecoformer, int64_t nbits, float* workspace, void* out, int64_t BH,
                         int64_t N, cudaStream_t s) {
  using S = typename T::storage;
  const int64_t chunk = kv_chunk(N), splits = kv_splits(N);
  const KvWorkspace w = kv_workspace(workspace, BH, nbits, D, splits);
  const int64_t g1 = kv_grid(kv_items(BH, nbits, splits), kMaxGrid);
  binary_kv_kernel<T, D><<<(unsigned)g1, kKvBlock, 0, s>>>(
      static_cast<const S*>(v), k_codes, splits > 1 ? w.part_kv : w.kv,
      splits > 1 ? w.part_cnt : w.ksum, BH, N, nbits, chunk, splits, ecoformer,
      vec16_aligned(v));
  if (const char* err = last_launch_error()) return err;
  if (splits > 1) {
    const int64_t units = kv_reduce_units(BH, nbits, D);
    const int64_t blocks = (units + kBlock - 1) / kBlock;
    binary_kv_reduce_kernel<D><<<(unsigned)(blocks < kMaxGrid ? blocks : kMaxGrid), kBlock, 0, s>>>(
        w.part_kv, w.part_cnt, w.kv, w.ksum, BH, N, nbits, splits, ecoformer);
    if (const char* err = last_launch_error()) return err;
  }
  const int64_t tiles = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  const int64_t g2 = BH * tiles < kMaxGrid ? BH * tiles : kMaxGrid;
  binary_out_kernel<T, D><<<(unsigned)g2, kBlock, 0, s>>>(static_cast<const S*>(v), q_codes, w.kv,
                                                          w.ksum, static_cast<S*>(out), BH, N,
                                                          nbits, ecoformer);
  return last_launch_error();
}

template <typename T>
const char* launch_d(const void* v, const int32_t* q_codes, const int32_t* k_codes,
                     bool ecoformer, int64_t nbits, float* workspace, void* out, int64_t BH,
                     int64_t N, int64_t d, cudaStream_t s) {
  switch (d) {
    case 32: return launch_typed<T, 32>(v, q_codes, k_codes, ecoformer, nbits, workspace, out, BH, N, s);
    case 64: return launch_typed<T, 64>(v, q_codes, k_codes, ecoformer, nbits, workspace, out, BH, N, s);
    case 128: return launch_typed<T, 128>(v, q_codes, k_codes, ecoformer, nbits, workspace, out, BH, N, s);
    default: return "head dim d must be 32, 64 or 128";
  }
}

}  // namespace

const char* launch_binary_attention(const void* v, const int32_t* q_codes, const int32_t* k_codes,
                                    FloatType type, Form form, int64_t nbits, float* workspace,
                                    void* out, int64_t BH, int64_t N, int64_t d, void* stream) {
  if (!supported_head_dim(d)) return "head dim d must be 32, 64 or 128";
  if (nbits < 1 || nbits > 1024) return "nbits must be in [1, 1024]";
  if (form != Form::Ecoformer && form != Form::ShiftAdd) return "form must be 0 or 1";
  if (BH <= 0 || N <= 0) return nullptr;
  const bool eco = form == Form::Ecoformer;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case FloatType::F16: return launch_d<F16>(v, q_codes, k_codes, eco, nbits, workspace, out, BH, N, d, s);
    case FloatType::BF16: return launch_d<BF16>(v, q_codes, k_codes, eco, nbits, workspace, out, BH, N, d, s);
    case FloatType::F32: return launch_d<F32>(v, q_codes, k_codes, eco, nbits, workspace, out, BH, N, d, s);
  }
  return "bad float type";
}

}  // namespace binary_hash
}  // namespace effkern
