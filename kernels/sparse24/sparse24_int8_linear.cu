// sparse24_int8_linear on sparse tensor cores (mma.sp m16n8k64 s8, sm_80 and sm_90): the
// compressed weight values, its metadata and x stream through a 3-stage cp.async pipeline in
// 16-byte copies; ldmatrix feeds the A (weight) and B (x) fragments from swizzled shared
// memory, each lane's metadata word is one 32-bit shared load (sparse24_gemm.cuh); int32
// accumulators, then the fused epilogue (scales, bias, activation; bf16/fp16/fp32, int8 or int32 out).
// Few tokens: K is split over grid.z and a second kernel sums the exact int32 partials before
// the same epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/common/cp_async.cuh"
#include "kernels/common/launch_error.cuh"
#include "kernels/sparse24/sparse24_gemm.cuh"
#include "kernels/sparse24/sparse24_launch.h"
#include "kernels/sparse24/sparse24_mma.cuh"

namespace effkern {
namespace sparse24 {
namespace {

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void store_out(void* y, int64_t i, float v, int32_t acc_sat, OutKind kind, float inv) {
  switch (kind) {
    case OutKind::I32: static_cast<int32_t*>(y)[i] = acc_sat; break;
    case OutKind::BF16: static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v); break;
    case OutKind::F16: static_cast<__half*>(y)[i] = __float2half_rn(v); break;
    case OutKind::I8: static_cast<int8_t*>(y)[i] = requantize_int8(v, inv); break;
    case OutKind::F32: static_cast<float*>(y)[i] = v; break;
  }
}

// y[m, n] from the (exact) int32 product acc: the epilogue of effkern/ops/sparse24.py.
__device__ __forceinline__ void finish(const Epilogue& ep, void* y, int64_t m, int n, int N, int32_t acc) {
  const int64_t i = m * N + n;
  if (ep.kind == OutKind::I32) {
    store_out(y, i, 0.f, ep.bias_i32 ? saturating_add(acc, ep.bias_i32[n]) : acc, ep.kind, 0.f);
    return;
  }
  const float v = epilogue_value(acc, ep.x_scale[ep.x_scale_per_token ? m : 0], ep.w_scale[n],
                                 ep.bias_f32 ? ep.bias_f32[n] : 0.f, ep.act);
  store_out(y, i, v, 0, ep.kind, ep.kind == OutKind::I8 ? ep.inv_out_scale[ep.out_scale_per_channel ? n : 0] : 0.f);
}

// One block: 128 output channels x kBlockTokens tokens over the K steps of split blockIdx.z.
// Requirements (checked by the launcher): K % 64 == 0 (each step's 16-byte copies of values and x
// and 8-byte copy of meta start aligned), x and values 16-byte, meta 8-byte aligned.
template <int kBlockTokens>
__global__ void __launch_bounds__(kThreads, 1)
sparse24_int8_linear_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ values, const uint8_t* __restrict__ meta,
                Epilogue ep, void* __restrict__ y, int32_t* __restrict__ partials, int64_t M, int N, int K,
                int steps_per_split) {
  using W = WarpTile<kBlockTokens>;
  constexpr int kVBytes = kBlockRows * kValueBytes, kMBytes = kBlockRows * kMetaBytes;
  constexpr int kStageBytes = kVBytes + kMBytes + kBlockTokens * kXBytes;
  // the pipeline's stages, then (after the main loop) the epilogue's int32 tile
  __shared__ __align__(16) uint8_t smem[kStages * kStageBytes];
  auto v_smem = [&](int stage) { return smem + stage * kStageBytes; };
  auto m_smem = [&](int stage) { return smem + stage * kStageBytes + kVBytes; };
  auto x_smem = [&](int stage) { return smem + stage * kStageBytes + kVBytes + kMBytes; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * kBlockTokens;
  const int row0 = blockIdx.y * kBlockRows;
  const int steps = (K + kStepK - 1) / kStepK;
  const int step_begin = blockIdx.z * steps_per_split;
  const int step_end = min(steps, step_begin + steps_per_split);
  const int64_t kv = K / 2, km = K / 8;  // row pitches of values and meta

  auto load_stage = [&](int stage, int step) {
    const int k0 = step * kStepK;
    for (int c = tid; c < kBlockRows * 2; c += kThreads) {  // values: 2 chunks per row
      const int r = c / 2, chunk = c % 2, n = row0 + r;
      const int64_t col = k0 / 2 + 16 * chunk;
      const bool ok = n < N && col < kv;
      cp_async_16(v_smem(stage) + 16 * value_chunk_slot(r, chunk), ok ? values + n * kv + col : values, ok);
    }
    for (int r = tid; r < kBlockRows; r += kThreads) {  // meta: 8 bytes per row
      const int n = row0 + r;
      if (n < N) {
        cp_async_8(m_smem(stage) + kMetaBytes * r, meta + n * km + k0 / 8, true);
      } else {  // past the last row: zero values, but still valid nibbles (0 is undefined)
        *reinterpret_cast<uint64_t*>(m_smem(stage) + kMetaBytes * r) = kPaddingMeta;
      }
    }
    for (int c = tid; c < kBlockTokens * 4; c += kThreads) {  // x: 4 chunks per token
      const int r = c / 4, chunk = c % 4;
      const int64_t m = tok0 + r;
      const int64_t k = k0 + 16 * chunk;
      const bool ok = m < M && k < K;
      cp_async_16(x_smem(stage) + 16 * x_chunk_slot(r, chunk), ok ? x + m * K + k : x, ok);
    }
  };

  int32_t acc[W::kFragsRow][W::kFragsTok][4] = {};
  for (int s = 0; s < kStages - 1; ++s) {
    if (step_begin + s < step_end) load_stage(s, step_begin + s);
    cp_async_commit();
  }
  for (int step = step_begin; step < step_end; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = step + kStages - 1;
    if (next < step_end) load_stage((next - step_begin) % kStages, next);
    cp_async_commit();

    const int stage = (step - step_begin) % kStages;
    uint32_t b[W::kFragsTok][4];
    EK_UNROLL
    for (int j = 0; j < W::kFragsTok; ++j) {
      int r, chunk;
      b_ldmatrix_source(W::tok0(warp) + 8 * j, lane, &r, &chunk);
      ldmatrix_x4(b[j], x_smem(stage) + 16 * x_chunk_slot(r, chunk));
    }
    EK_UNROLL
    for (int i = 0; i < W::kFragsRow; ++i) {
      int r, chunk, byte;
      uint32_t a[4];
      a_ldmatrix_source(W::row0(warp) + 16 * i, lane, &r, &chunk);
      ldmatrix_x4(a, v_smem(stage) + 16 * value_chunk_slot(r, chunk));
      meta_source(W::row0(warp) + 16 * i, lane, &r, &byte);
      const uint32_t e = *reinterpret_cast<const uint32_t*>(m_smem(stage) + kMetaBytes * r + byte);
      EK_UNROLL
      for (int j = 0; j < W::kFragsTok; ++j) mma_sp_16864(acc[i][j], a, b[j], e);
    }
  }
  cp_async_wait<0>();

  // Epilogue through shared memory, kPassTokens tokens at a time: the warps holding them write
  // their accumulators into an int32 [token][row] tile (row-contiguous like y, padded: no bank
  // conflicts), then all threads finish it with consecutive threads on consecutive columns of y
  // (coalesced stores).
  constexpr int kPassTokens = W::kTokens, kPitch = kBlockRows + 4;
  static_assert(kPassTokens * kPitch * 4 <= kStages * kStageBytes, "epilogue tile exceeds shared memory");
  int32_t* tile = reinterpret_cast<int32_t*>(smem);
  const int g = lane / 4, t = lane % 4;
  for (int pass = 0; pass < W::kWarpsTok; ++pass) {
    __syncthreads();  // the stages (or the previous pass) are no longer read
    if (W::tok0(warp) == pass * kPassTokens) {
      EK_UNROLL
      for (int i = 0; i < W::kFragsRow; ++i) {
        EK_UNROLL
        for (int j = 0; j < W::kFragsTok; ++j) {
          EK_UNROLL
          for (int c = 0; c < 4; ++c) {  // (row g / g + 8, token 2t / 2t + 1)
            const int row = W::row0(warp) + 16 * i + g + 8 * (c >> 1), tok = 8 * j + 2 * t + (c & 1);
            tile[tok * kPitch + row] = acc[i][j][c];
          }
        }
      }
    }
    __syncthreads();
    for (int idx = tid; idx < kPassTokens * kBlockRows; idx += kThreads) {
      const int row = idx % kBlockRows, tok = idx / kBlockRows;
      const int n = row0 + row;
      const int64_t m = tok0 + pass * kPassTokens + tok;
      if (n >= N || m >= M) continue;
      const int32_t a = tile[tok * kPitch + row];
      if (partials != nullptr) {
        partials[(static_cast<int64_t>(blockIdx.z) * M + m) * N + n] = a;
      } else {
        finish(ep, y, m, n, N, a);
      }
    }
  }
}

// The int32 partials of the K ranges summed (exact: |sum| <= K * 2^14 < 2^31), then the epilogue.
__global__ void __launch_bounds__(256)
sparse24_int8_linear_split_k_kernel(const int32_t* __restrict__ partials, Epilogue ep, void* __restrict__ y, int64_t M, int N,
                        int split_k) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * 256ll + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * 256) {
    int32_t acc = 0;
    for (int s = 0; s < split_k; ++s) acc += partials[s * total + i];
    finish(ep, y, i / N, static_cast<int>(i % N), N, acc);
  }
}

}  // namespace

const char* launch_sparse24_int8_linear(const int8_t* x, const int8_t* values, const uint8_t* meta,
                                        const Epilogue& ep, void* y, int32_t* workspace, const Plan& plan,
                                        int64_t M, int64_t N, int64_t K, void* stream) {
  if (K % kStepK != 0) return "K must be a multiple of 64";
  if (N > (1 << 30) || K > (1 << 17)) return "N must be below 2^30 and K at most 2^17";
  const auto s = static_cast<cudaStream_t>(stream);
  const bool split = plan.split_k > 1;
  const dim3 grid(static_cast<unsigned>(plan.tok_tiles), plan.row_tiles, plan.split_k);
  const int n = static_cast<int>(N), k = static_cast<int>(K);
  int32_t* partials = split ? workspace : nullptr;
  if (plan.block_tokens == 16) {
    sparse24_int8_linear_kernel<16><<<grid, kThreads, 0, s>>>(x, values, meta, ep, y, partials, M, n, k, plan.steps_per_split);
  } else {
    sparse24_int8_linear_kernel<64><<<grid, kThreads, 0, s>>>(x, values, meta, ep, y, partials, M, n, k, plan.steps_per_split);
  }
  if (const char* err = last_launch_error()) return err;
  if (split) {
    const int64_t blocks = (M * N + 255) / 256;
    sparse24_int8_linear_split_k_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, s>>>(
        workspace, ep, y, M, n, plan.split_k);
  }
  return last_launch_error();
}

}  // namespace sparse24
}  // namespace effkern
