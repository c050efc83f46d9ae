// Binary-hash attention kernels (EcoFormer / ShiftAddViT linear attention from
// packed codes).  Two launches on the caller's stream:
//   pass 1 binary_kv_kernel:  grid min(BH * W, kMaxGrid) blocks of kBlock, one
//     block per (bh, code word), grid-strided; each thread loops over all N
//     tokens (no token split, so no second stage and no atomics).
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
__global__ void __launch_bounds__(kBlock)
    binary_kv_kernel(const typename T::storage* __restrict__ v,
                     const int32_t* __restrict__ k_codes, float* __restrict__ kv,
                     float* __restrict__ ksum, int64_t BH, int64_t N, int64_t nbits,
                     bool is_signed) {
  const int64_t W = num_words(nbits);
  const int64_t total = BH * W;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    kv_thread<T, D>(v, k_codes, kv, ksum, blk / W, (int)(blk % W), threadIdx.x, N, nbits,
                    is_signed);
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
  float* kv = workspace;
  float* ksum = workspace + BH * nbits * D;
  const int64_t W = num_words(nbits);
  const int64_t g1 = BH * W < kMaxGrid ? BH * W : kMaxGrid;
  binary_kv_kernel<T, D><<<(unsigned)g1, kBlock, 0, s>>>(static_cast<const S*>(v), k_codes, kv,
                                                         ksum, BH, N, nbits, ecoformer);
  if (const char* err = last_launch_error()) return err;
  const int64_t tiles = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  const int64_t g2 = BH * tiles < kMaxGrid ? BH * tiles : kMaxGrid;
  binary_out_kernel<T, D><<<(unsigned)g2, kBlock, 0, s>>>(static_cast<const S*>(v), q_codes, kv,
                                                          ksum, static_cast<S*>(out), BH, N,
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
