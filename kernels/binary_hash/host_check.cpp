// Host transcription of the binary-hash attention launches, for checking them
// without a GPU.  It makes the launcher's plan (kv_chunk / kv_splits, the
// workspace layout, the grids) and runs:
//   pass 1: every warp of its grid, through the grid-stride loop over items
//     (kv_item), each of the 32 lanes' kv_accumulate, the same xor butterfly
//     over the token slots as the kernel's __shfl_xor_sync, then kv_store;
//   pass 1b (more than one split): kv_reduce for every unit;
//   pass 2: token_partial for the 32 lanes of each token's warp, the same xor
//     butterfly as the kernel's norm, then token_store.
// Warps (and pass-2 threads) write disjoint outputs, so running them one after
// the other is a faithful schedule.  tests/test_binary_hash_cuda.py compiles
// this with the host C++ compiler and compares it, via ctypes, with the torch
// backend in effkern/ops/binary_hash.py.  Not part of effkern/_C*.so.
//
// type: 0 float16, 1 bfloat16, 2 float32; form: 0 ecoformer, 1 shiftadd
// (kernels/common/dtypes.h' FloatType, binary_hash_launch.h's Form).
// max_grid > 0 caps pass 1's grid below kMaxGrid, so that small inputs run
// its grid-stride loop too.
#include <stdint.h>
#include <string.h>

#include "kernels/binary_hash/binary_attention.cuh"
#include "kernels/binary_hash/binary_hash_launch.h"

using namespace effkern::binary_hash;

namespace {

template <typename T, int D>
void run_kv(const typename T::storage* v, const int32_t* k, bool eco, int64_t nbits,
            const KvWorkspace& ws, int64_t BH, int64_t N, int64_t max_grid) {
  using L = KvLayout<D>;
  const int64_t chunk = kv_chunk(N), splits = kv_splits(N);
  const int64_t total = kv_items(BH, nbits, splits);
  const int64_t grid = kv_grid(total, max_grid > 0 && max_grid < kMaxGrid ? max_grid : kMaxGrid);
  float* kv_out = splits > 1 ? ws.part_kv : ws.kv;
  float* cnt_out = splits > 1 ? ws.part_cnt : ws.ksum;
  float acc[32][kKvCols][kKvBits];
  int32_t cnt[32][L::kCounted];
  for (int64_t blk = 0; blk < grid; ++blk) {
    for (int warp = 0; warp < kKvWarps; ++warp) {
      for (int64_t item = blk * kKvWarps + warp; item < total; item += grid * kKvWarps) {
        const KvItem it = kv_item(item, N, nbits, chunk, splits);
        for (int l = 0; l < 32; ++l) {
          kv_accumulate<T, D>(v, k, it, l, N, nbits, eco, vec16_aligned(v), acc[l], cnt[l]);
        }
        for (int off = L::kColGroups; off < 32; off <<= 1) {  // the kernel's butterfly
          float nacc[32][kKvCols][kKvBits];
          int32_t ncnt[32][L::kCounted];
          for (int l = 0; l < 32; ++l) {
            for (int e = 0; e < kKvCols; ++e) {
              for (int b = 0; b < kKvBits; ++b) nacc[l][e][b] = acc[l][e][b] + acc[l ^ off][e][b];
            }
            for (int m = 0; m < L::kCounted; ++m) ncnt[l][m] = cnt[l][m] + cnt[l ^ off][m];
          }
          memcpy(acc, nacc, sizeof(acc));
          memcpy(cnt, ncnt, sizeof(cnt));
        }
        for (int l = 0; l < 32; ++l) {
          kv_store<T, D>(kv_out, cnt_out, it, l, BH, N, nbits, splits, eco, acc[l], cnt[l]);
        }
      }
    }
  }
  if (splits > 1) {
    const int64_t units = kv_reduce_units(BH, nbits, D);
    for (int64_t t = 0; t < units; ++t) {
      kv_reduce(ws.part_kv, ws.part_cnt, ws.kv, ws.ksum, t, BH, N, nbits, D, splits, eco);
    }
  }
}

template <typename T, int D>
void run(const void* v, const int32_t* q, const int32_t* k, bool eco, int64_t nbits, float* ws,
         void* out, int64_t BH, int64_t N, int64_t max_grid) {
  using S = typename T::storage;
  const S* vs = static_cast<const S*>(v);
  const KvWorkspace w = kv_workspace(ws, BH, nbits, D, kv_splits(N));
  run_kv<T, D>(vs, k, eco, nbits, w, BH, N, max_grid);
  constexpr int C = Layout<D>::kColsPerLane;
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t n = 0; n < N; ++n) {
      float val[32][C];
      float sq[32];
      for (int l = 0; l < 32; ++l) {
        sq[l] = token_partial<T, D>(vs, q, w.kv, w.ksum, bh, n, l, N, nbits, eco, val[l]);
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
          void* out, int64_t BH, int64_t N, int64_t d, int64_t max_grid) {
  switch (d) {
    case 32: run<T, 32>(v, q, k, eco, nbits, ws, out, BH, N, max_grid); return 0;
    case 64: run<T, 64>(v, q, k, eco, nbits, ws, out, BH, N, max_grid); return 0;
    case 128: run<T, 128>(v, q, k, eco, nbits, ws, out, BH, N, max_grid); return 0;
    default: return 3;
  }
}

}  // namespace

extern "C" {

// The constants the kernels share with the Python side (kernels/common/constants.h).
float ek_shiftadd_eps() { return kShiftAddEps; }
int64_t ek_num_words(int64_t nbits) { return num_words(nbits); }

// The launcher's plan: pass 1's split of N tokens, its items and grid, the workspace size.
int64_t ek_kv_chunk(int64_t N) { return kv_chunk(N); }
int64_t ek_kv_splits(int64_t N) { return kv_splits(N); }
int64_t ek_kv_bits() { return kKvBits; }
int64_t ek_kv_items(int64_t BH, int64_t N, int64_t nbits) { return kv_items(BH, nbits, kv_splits(N)); }
int64_t ek_kv_grid(int64_t BH, int64_t N, int64_t nbits) {
  return kv_grid(kv_items(BH, nbits, kv_splits(N)), kMaxGrid);
}
int64_t ek_workspace_elems(int64_t BH, int64_t N, int64_t nbits, int64_t d) {
  return binary_attention_workspace_elems(BH, N, nbits, d);
}

// Offsets (floats) of KV, the partial sums, ksum and the partial counts in the workspace
// (-1: none, one split), into offsets[4].
void ek_workspace_layout(int64_t BH, int64_t N, int64_t nbits, int64_t d, int64_t* offsets) {
  int64_t off[4];
  kv_workspace_offsets(BH, nbits, d, kv_splits(N), off);
  for (int i = 0; i < 4; ++i) offsets[i] = off[i];
}

// Pass 1's index walk alone: for every (item, lane, token) kv_accumulate visits, hits[(bh * N +
// j) * G * kColGroups + g * kColGroups + cg] += 1 (G = ceil(nbits / kKvBits)): every entry must
// end at exactly 1.  Returns 3 for an unsupported d.
int ek_kv_token_hits(int64_t BH, int64_t N, int64_t nbits, int64_t d, int64_t max_grid,
                     int32_t* hits) {
  const int64_t cg_count = d / kKvCols, slots = 32 / cg_count;
  if (d != 32 && d != 64 && d != 128) return 3;
  const int64_t chunk = kv_chunk(N), splits = kv_splits(N), G = kv_groups(nbits);
  const int64_t total = kv_items(BH, nbits, splits);
  const int64_t grid = kv_grid(total, max_grid > 0 && max_grid < kMaxGrid ? max_grid : kMaxGrid);
  for (int64_t blk = 0; blk < grid; ++blk) {
    for (int warp = 0; warp < kKvWarps; ++warp) {
      for (int64_t item = blk * kKvWarps + warp; item < total; item += grid * kKvWarps) {
        const KvItem it = kv_item(item, N, nbits, chunk, splits);
        for (int l = 0; l < 32; ++l) {
          const int64_t cg = l % cg_count, slot = l / cg_count;
          // kv_accumulate's loop: tokens j0 + slot + slots * m, m = 0, 1, ..., below j1
          for (int64_t j = it.j0 + slot; j < it.j1; j += slots) {
            ++hits[(it.bh * N + j) * G * cg_count + it.g * cg_count + cg];
          }
        }
      }
    }
  }
  return 0;
}

// As launch_binary_attention (ws: ek_workspace_elems floats); returns 0, 2 for a bad type /
// form / nbits, 3 for an unsupported d.
int ek_binary_attention(const void* v, const int32_t* q, const int32_t* k, int type, int form,
                        int64_t nbits, float* ws, void* out, int64_t BH, int64_t N, int64_t d,
                        int64_t max_grid) {
  if (type < 0 || type > 2 || form < 0 || form > 1 || nbits < 1 || nbits > 1024) return 2;
  if (BH <= 0 || N <= 0) return 0;
  const bool eco = form == 0;
  if (type == 0) return run_d<F16>(v, q, k, eco, nbits, ws, out, BH, N, d, max_grid);
  if (type == 1) return run_d<BF16>(v, q, k, eco, nbits, ws, out, BH, N, d, max_grid);
  return run_d<F32>(v, q, k, eco, nbits, ws, out, BH, N, d, max_grid);
}

}  // extern "C"
