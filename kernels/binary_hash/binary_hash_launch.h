// Host-callable launcher for the binary-hash attention kernels (the CUDA
// backend of effkern.ops.binary_hash's binary_attention_fwd).
//
// Plain C++ interface: no CUDA and no torch types, so csrc/ (compiled by the
// host compiler against torch's stable ABI) and kernels/ (compiled by nvcc
// against CUDA only) meet here.  All tensors are contiguous.  The launcher
// runs on `stream` (a cudaStream_t), launches nothing for BH == 0 or N == 0,
// and returns nullptr on success or an error string (unsupported d, bad
// nbits / form, or the CUDA error of a launch).
#pragma once

#include <stdint.h>

#include "kernels/common/dtypes.h"

namespace effkern {
namespace binary_hash {

using effkern::FloatType;  // kernels/common/dtypes.h
enum class Form : int { Ecoformer = 0, ShiftAdd = 1 };

// Head dims the kernels are instantiated for (d is a template parameter).
inline bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// Pass 1's split of a head's N tokens: chunks of kv_chunk(N) tokens (at least kKvMinChunk, a
// multiple of 32, so that at most kKvMaxSplits chunks cover N), kv_splits(N) of them, each
// non-empty.  A function of N alone: a head's sums do not depend on B, H or the GPU.
constexpr int64_t kKvMinChunk = 256;
constexpr int64_t kKvMaxSplits = 16;

inline int64_t kv_chunk(int64_t N) {
  const int64_t c = ((N + kKvMaxSplits - 1) / kKvMaxSplits + 31) / 32 * 32;
  return c > kKvMinChunk ? c : kKvMinChunk;
}

inline int64_t kv_splits(int64_t N) { return N <= 0 ? 1 : (N + kv_chunk(N) - 1) / kv_chunk(N); }

// float32 elements of the workspace launch_binary_attention needs: KV [BH, nbits, d], then with
// more than one split the partial sums [splits, BH, nbits, d]; ksum [BH, nbits], then with more
// than one split the partial counts [splits, BH, nbits] (int32 bits).
inline int64_t binary_attention_workspace_elems(int64_t BH, int64_t N, int64_t nbits, int64_t d) {
  const int64_t S = kv_splits(N);
  return BH * nbits * (d + 1) * (S > 1 ? S + 1 : 1);
}

// out [BH, N, d] (type) from v [BH, N, d] (type) and packed codes q_codes, k_codes int32
// [BH, N, ceil(nbits / 32)] (bit i: bit i % 32 of word i / 32; bits beyond nbits ignored).
// Two passes: (1) KV [BH, nbits, d] = sum_j h_k[j] v_j and ksum [BH, nbits] = sum_j h_k[j]
// into `workspace` (binary_attention_workspace_elems floats), split over tokens (with more than
// one split, a second small launch sums the splits' partials in a fixed order); (2) each
// token's output from its q code, KV, ksum and v_n.  form Ecoformer: codes {-1, +1}, out = (h_q.KV + c v_n) /
// (h_q.ksum + N c), c = nbits + 1.  ShiftAdd: codes {0, 1}, t = v_n / 2 + h_q.KV / pi,
// out = t / max(||t||, 1e-12).  float32 accumulation in a fixed order (binary_attention.cuh), no atomics.
const char* launch_binary_attention(const void* v, const int32_t* q_codes, const int32_t* k_codes,
                                    FloatType type, Form form, int64_t nbits, float* workspace,
                                    void* out, int64_t BH, int64_t N, int64_t d, void* stream);

}  // namespace binary_hash
}  // namespace effkern
