// shift_linear on tensor cores: y = x W^T + bias with W[n, k] = (-1)^sign * 2^(base[n] + mag - 1)
// stored as 4- or 5-bit codes (effkern/ops/shift.py).  x (bf16/fp16) and the compressed codes
// stream through a 3-stage cp.async pipeline (16-byte copies); each lane decodes its codes in
// registers into bf16/fp16 B fragments, exact (2^(mag-1) <= 2^14), for mma.sync m16n8k16 with
// float32 accumulators; the epilogue scales column n by 2^base[n] (exact), adds the bias and
// rounds once.  At small M the K range is split over grid.z (make_plan) and a second kernel
// sums the float32 partials in split order (deterministic).  The fragment layout and the
// decoding are in shift_gemm.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/common/cp_async.cuh"
#include "kernels/common/launch_error.cuh"
#include "kernels/shift/shift_gemm.cuh"
#include "kernels/shift/shift_launch.h"

namespace effkern {
namespace shift {
namespace {

template <bool kBf16>
using Elem = typename std::conditional<kBf16, __nv_bfloat16, __half>::type;

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <bool kBf16>
__device__ __forceinline__ void store_pair(Elem<kBf16>* y, float v0, float v1) {
  if constexpr (kBf16) {
    *reinterpret_cast<__nv_bfloat162*>(y) = __floats2bfloat162_rn(v0, v1);
  } else {
    *reinterpret_cast<__half2*>(y) = __floats2half2_rn(v0, v1);
  }
}

template <bool kBf16>
__device__ __forceinline__ Elem<kBf16> to_elem(float v) {
  if constexpr (kBf16) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

template <bool kBf16>
__device__ __forceinline__ float from_elem(Elem<kBf16> v) {
  if constexpr (kBf16) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// One block: a block_m x 128 tile of y over the K steps of split blockIdx.z.  Requirements
// (checked by the launcher): K % 8 == 0 (16-byte rows of x), 5-bit: K % 16 == 0, x and codes
// 16-byte aligned.  out: y (split_k == 1) or the float32 partials [split_k, M, N].
template <bool kBf16, int kBits, int kBlockM>
__global__ void __launch_bounds__(kThreads, 1)
shift_linear_kernel(const Elem<kBf16>* __restrict__ x, const uint8_t* __restrict__ codes,
                    const int32_t* __restrict__ base, const Elem<kBf16>* __restrict__ bias,
                    void* __restrict__ out, int64_t M, int N, int K, int code_cols,
                    int steps_per_split, bool partial) {
  using W = WarpTile<kBlockM>;
  constexpr int kXStage = kBlockM * kStepK;                   // elements
  constexpr int kCodeStage = kBlockN * kCodeBytes<kBits>;     // bytes
  __shared__ __align__(16) Elem<kBf16> x_smem[kStages][kXStage];
  __shared__ __align__(16) uint8_t code_smem[kStages][kCodeStage];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int n0 = blockIdx.y * kBlockN;
  const int steps = (K + kStepK - 1) / kStepK;
  const int step_begin = blockIdx.z * steps_per_split;
  const int step_end = min(steps, step_begin + steps_per_split);

  // Copies of one stage: x rows of 8 chunks, code rows of kCodeBytes / 16 chunks.
  auto load_stage = [&](int stage, int step) {
    const int k0 = step * kStepK;
    for (int c = tid; c < kBlockM * 8; c += kThreads) {
      const int row = c / 8, chunk = c % 8;
      const int64_t m = m0 + row;
      const int k = k0 + 8 * chunk;
      const bool ok = m < M && k < K;
      cp_async_16(&x_smem[stage][8 * x_chunk_slot(row, chunk)], ok ? x + m * K + k : x, ok);
    }
    constexpr int kChunks = kCodeBytes<kBits> / 16;
    for (int c = tid; c < kBlockN * kChunks; c += kThreads) {
      const int row = c / kChunks, chunk = c % kChunks;
      const int n = n0 + row;
      // 5-bit: a byte per k (K % 16 == 0: a chunk is all in or all out); 4-bit: the step's
      // 32 bytes, zero-padded up to whole groups in the weight itself
      const int64_t col = kBits == 5 ? static_cast<int64_t>(k0) + 16 * chunk : (k0 / 2) + 16 * chunk;
      const bool ok = n < N && (kBits == 4 || col < K);
      cp_async_16(&code_smem[stage][16 * code_chunk_slot(row, chunk, kBits)],
                  ok ? codes + static_cast<int64_t>(n) * code_cols + col : codes, ok);
    }
  };

  float acc[W::kFragsM][W::kFragsN][4] = {};
  for (int s = 0; s < kStages - 1; ++s) {
    if (step_begin + s < step_end) load_stage(s, step_begin + s);
    cp_async_commit();
  }
  for (int step = step_begin; step < step_end; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the stage is in; the stage the next copy overwrites is no longer read
    const int next = step + kStages - 1;
    if (next < step_end) load_stage((next - step_begin) % kStages, next);
    cp_async_commit();

    const int stage = (step - step_begin) % kStages;
    // A fragments of the whole step: [m-fragment][row g or g + 8][half h] -> 4 words (8 k)
    uint32_t a[W::kFragsM][2][2][4];
    EK_UNROLL
    for (int i = 0; i < W::kFragsM; ++i) {
      EK_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int row = W::row0(warp) + 16 * i + 8 * r + g;
        EK_UNROLL
        for (int h = 0; h < 2; ++h) {
          const uint4 v = *reinterpret_cast<const uint4*>(&x_smem[stage][8 * x_chunk_slot(row, 4 * h + t)]);
          a[i][r][h][0] = v.x, a[i][r][h][1] = v.y, a[i][r][h][2] = v.z, a[i][r][h][3] = v.w;
        }
      }
    }
    EK_UNROLL
    for (int j = 0; j < W::kFragsN; ++j) {
      const int n = W::col0(warp) + 8 * j + g;
      EK_UNROLL
      for (int h = 0; h < 2; ++h) {
        const uint2 cw = *reinterpret_cast<const uint2*>(&code_smem[stage][code_read_offset(n, t, h, kBits)]);
        const uint32_t words[2] = {cw.x, cw.y};
        EK_UNROLL
        for (int s = 0; s < 2; ++s) {
          uint32_t b[2];
          b_fragment<kBf16, kBits>(words, h, s, b);
          EK_UNROLL
          for (int i = 0; i < W::kFragsM; ++i) {
            uint32_t af[4];
            a_fragment(a[i], h, s, af);
            mma_16816<kBf16>(acc[i][j], af, b);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: accumulator (row g / g + 8, columns 2t, 2t + 1) of each fragment.
  EK_UNROLL
  for (int j = 0; j < W::kFragsN; ++j) {
    const int n = n0 + W::col0(warp) + 8 * j + 2 * t;
    float scale[2], add[2];
    EK_UNROLL
    for (int c = 0; c < 2; ++c) {
      const bool ok = n + c < N;
      scale[c] = ok ? exp2_int(base[n + c]) : 0.f;
      add[c] = ok && bias != nullptr && !partial ? from_elem<kBf16>(bias[n + c]) : 0.f;
    }
    EK_UNROLL
    for (int i = 0; i < W::kFragsM; ++i) {
      EK_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int64_t m = m0 + W::row0(warp) + 16 * i + 8 * r + g;
        if (m >= M) continue;
        const float v0 = acc[i][j][2 * r] * scale[0] + add[0];
        const float v1 = acc[i][j][2 * r + 1] * scale[1] + add[1];
        if (partial) {
          float* p = static_cast<float*>(out) + (static_cast<int64_t>(blockIdx.z) * M + m) * N + n;
          if (n < N) p[0] = v0;
          if (n + 1 < N) p[1] = v1;
        } else {
          Elem<kBf16>* p = static_cast<Elem<kBf16>*>(out) + m * N + n;
          if (n + 1 < N && N % 2 == 0) {
            store_pair<kBf16>(p, v0, v1);
          } else {
            if (n < N) p[0] = to_elem<kBf16>(v0);
            if (n + 1 < N) p[1] = to_elem<kBf16>(v1);
          }
        }
      }
    }
  }
}

// y = sum over splits, in split order, of the partials + bias, rounded once.
template <bool kBf16>
__global__ void __launch_bounds__(256)
split_k_sum_kernel(const float* __restrict__ partials, const Elem<kBf16>* __restrict__ bias,
                   Elem<kBf16>* __restrict__ y, int64_t M, int N, int split_k) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * 256ll + threadIdx.x; i < total; i += static_cast<int64_t>(gridDim.x) * 256) {
    float v = 0.f;
    for (int s = 0; s < split_k; ++s) v += partials[s * total + i];
    if (bias != nullptr) v += from_elem<kBf16>(bias[i % N]);
    y[i] = to_elem<kBf16>(v);
  }
}

template <bool kBf16, int kBits>
const char* launch_typed(const void* x, const uint8_t* codes, const int32_t* base, const void* bias,
                         void* y, float* workspace, const Plan& p, int64_t M, int N, int K,
                         int code_cols, cudaStream_t stream) {
  using T = Elem<kBf16>;
  const bool partial = p.split_k > 1;
  void* out = partial ? static_cast<void*>(workspace) : y;
  const dim3 grid(static_cast<unsigned>(p.m_tiles), p.n_tiles, p.split_k);
  const auto* xb = static_cast<const T*>(x);
  const auto* bb = static_cast<const T*>(bias);
  if (p.block_m == 16) {
    shift_linear_kernel<kBf16, kBits, 16><<<grid, kThreads, 0, stream>>>(
        xb, codes, base, bb, out, M, N, K, code_cols, p.steps_per_split, partial);
  } else {
    shift_linear_kernel<kBf16, kBits, 64><<<grid, kThreads, 0, stream>>>(
        xb, codes, base, bb, out, M, N, K, code_cols, p.steps_per_split, partial);
  }
  if (const char* err = last_launch_error()) return err;
  if (partial) {
    const int64_t blocks = (M * N + 255) / 256;
    split_k_sum_kernel<kBf16><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(
        workspace, bb, static_cast<T*>(y), M, N, p.split_k);
  }
  return last_launch_error();
}

}  // namespace

const char* launch_shift_linear(const void* x, FloatType type, const uint8_t* codes,
                                const int32_t* base, const void* bias, void* y, float* workspace,
                                const Plan& plan, int64_t M, int64_t N, int64_t K, int64_t code_cols,
                                int bits, void* stream) {
  if (type == FloatType::F32) return "float32 is not supported by the CUDA kernel";
  if (bits != 4 && bits != 5) return "bits must be 4 or 5";
  if (K % 8 != 0 || (bits == 5 && K % 16 != 0)) return "K must be a multiple of 8 (16 at bits=5)";
  if (N > (1 << 30) || K > (1 << 30)) return "N and K must be below 2^30";
  const auto s = static_cast<cudaStream_t>(stream);
  const int n = static_cast<int>(N), k = static_cast<int>(K), cc = static_cast<int>(code_cols);
  const bool bf16 = type == FloatType::BF16;
  if (bf16 && bits == 5) return launch_typed<true, 5>(x, codes, base, bias, y, workspace, plan, M, n, k, cc, s);
  if (bf16) return launch_typed<true, 4>(x, codes, base, bias, y, workspace, plan, M, n, k, cc, s);
  if (bits == 5) return launch_typed<false, 5>(x, codes, base, bias, y, workspace, plan, M, n, k, cc, s);
  return launch_typed<false, 4>(x, codes, base, bias, y, workspace, plan, M, n, k, cc, s);
}

}  // namespace shift
}  // namespace effkern
