// Host transcription of the binary-hash attention launches, for checking them
// without a GPU: pass 1 runs kv_thread for every (block, thread) of its grid,
// pass 2 token_partial for the 32 lanes of each token's warp, the same xor
// butterfly as the kernel's __shfl_xor_sync reduction, then token_store.
// Threads write disjoint outputs, so running them one after the other is a
// faithful schedule.  tests/test_binary_hash_cuda.py compiles this with the
// host C++ compiler and compares it, via ctypes, with the torch backend in
// effkern/ops/binary_hash.py.  Not part of effkern/_C*.so.
//
// type: 0 float16, 1 bfloat16, 2 float32; form: 0 ecoformer, 1 shiftadd
// (kernels/common/dtypes.h' FloatType, binary_hash_launch.h's Form).
#include <stdint.h>

#include "kernels/binary_hash/binary_attention.cuh"

using namespace effkern::binary_hash;

namespace {

template <typename T, int D>
void run(const void* v, const int32_t* q, const int32_t* k, bool eco, int64_t nbits, float* ws,
         void* out, int64_t BH, int64_t N) {
  using S = typename T::storage;
  const S* vs = static_cast<const S*>(v);
  float* kv = ws;
  float* ksum = ws + BH * nbits * D;
  const int64_t W = num_words(nbits);
  for (int64_t blk = 0; blk < BH * W; ++blk) {
    for (int t = 0; t < kBlock; ++t) {
      kv_thread<T, D>(vs, k, kv, ksum, blk / W, (int)(blk % W), t, N, nbits, eco);
    }
  }
  constexpr int C = Layout<D>::kColsPerLane;
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t n = 0; n < N; ++n) {
      float val[32][C];
      float sq[32];
      for (int l = 0; l < 32; ++l) {
        sq[l] = token_partial<T, D>(vs, q, kv, ksum, bh, n, l, N, nbits, eco, val[l]);
      }
      if (!eco) {
        for (int off = 16; off > 0; off >>= 1) {
          float nx[32];
          for (int l = 0; l < 32; ++l) nx[l] = sq[l] + sq[l ^ off];
          for (int l = 0; l < 32; ++l) sq[l] = nx[l];
        }
      }
      for (int l = 0; l < 32; ++l) {
        token_store<T, D>(static_cast<S*>(out), bh, n, l, N, eco, sq[l], val[l]);
      }
    }
  }
}

template <typename T>
int run_d(const void* v, const int32_t* q, const int32_t* k, bool eco, int64_t nbits, float* ws,
          void* out, int64_t BH, int64_t N, int64_t d) {
  switch (d) {
    case 32: run<T, 32>(v, q, k, eco, nbits, ws, out, BH, N); return 0;
    case 64: run<T, 64>(v, q, k, eco, nbits, ws, out, BH, N); return 0;
    case 128: run<T, 128>(v, q, k, eco, nbits, ws, out, BH, N); return 0;
    default: return 3;
  }
}

}  // namespace

extern "C" {

// The constants the kernels share with the Python side (kernels/common/constants.h).
float ek_shiftadd_eps() { return kShiftAddEps; }
int64_t ek_num_words(int64_t nbits) { return num_words(nbits); }

// As launch_binary_attention (ws: binary_attention_workspace_elems floats); returns 0, 2 for a
// bad type / form / nbits, 3 for an unsupported d.
int ek_binary_attention(const void* v, const int32_t* q, const int32_t* k, int type, int form,
                        int64_t nbits, float* ws, void* out, int64_t BH, int64_t N, int64_t d) {
  if (type < 0 || type > 2 || form < 0 || form > 1 || nbits < 1 || nbits > 1024) return 2;
  if (BH <= 0 || N <= 0) return 0;
  const bool eco = form == 0;
  if (type == 0) return run_d<F16>(v, q, k, eco, nbits, ws, out, BH, N, d);
  if (type == 1) return run_d<BF16>(v, q, k, eco, nbits, ws, out, BH, N, d);
  return run_d<F32>(v, q, k, eco, nbits, ws, out, BH, N, d);
}

}  // extern "C"
