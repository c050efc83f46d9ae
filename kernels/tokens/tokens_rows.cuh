// Row-level device code of the token gather/scatter kernels, the thread -> row
// mapping, and the launch plan (vector width, lanes per row, grid) they share
// with their launchers.
//
// Depends on nothing but CUDA's fp16/bf16 headers under nvcc, and on nothing
// at all otherwise: every helper is __host__ __device__ under nvcc and plain
// C++ elsewhere, so the exact same row code runs in the kernels
// (token_gather_scatter.cu) and on the host (host_check.cpp, driven by
// tests/test_tokens_cuda.py), where each "lane" of a row is run in turn.
//
// A row of C elements is moved as `nvec` vectors of VB bytes (VB in 16, 8, 4,
// 2: the widest dividing the row's byte size and every base pointer, so every
// row of every tensor is VB-aligned).  A row is handled by G lanes (G a power
// of two <= 32, several rows per block): lane l takes vectors l, l + G, ...,
// kUnroll of them per step (loads first, then stores: kUnroll * VB bytes in
// flight per thread).  Indices (row ids, offsets) are int64 throughout.
#pragma once

#include <stdint.h>

#include "kernels/common/host_device.h"
#include "kernels/common/vec_rows.cuh"

namespace effkern {
namespace tokens {

using effkern::BF16;
using effkern::F16;
using effkern::F32;
using effkern::Vec;

constexpr int kBlock = 256;       // threads per block
constexpr int kUnroll = 4;        // vectors per lane per step
constexpr int kMaxLanes = 32;     // lanes per row: 1 .. 32 (never more than a warp)
constexpr int64_t kMaxGrid = 65536;  // blocks; more rows are grid-strided

// ---- the launch plan (host) ------------------------------------------------------------------

// Widest vector (16, 8, 4 or 2 bytes) dividing row_bytes and the three
// addresses (pass 0 for an unused one); 0 when even 2 does not.
inline int vector_bytes(int64_t row_bytes, uintptr_t a, uintptr_t b, uintptr_t c) {
  const uint64_t m = (uint64_t)row_bytes | (uint64_t)a | (uint64_t)b | (uint64_t)c;
  for (int vb = 16; vb >= 2; vb >>= 1) {
    if (m % (uint64_t)vb == 0) return vb;
  }
  return 0;
}

// log2 of the lanes per row for rows of nvec >= 1 vectors: the next power of
// two for rows of up to 32 vectors; otherwise the one of 32, 16, 8 lanes that
// leaves the fewest idle lane slots (ceil(nvec / G) * G), the wider on ties
// (e.g. 48 vectors: 16 lanes x 3; 96: 32 x 3; 128: 32 x 4).
inline int lanes_log2(int64_t nvec) {
  if (nvec <= kMaxLanes) {
    int l = 0;
    while (((int64_t)1 << l) < nvec) ++l;
    return l;
  }
  int best = 5;
  int64_t best_slots = (nvec + 31) / 32 * 32;
  for (int l = 4; l >= 3; --l) {
    const int64_t g = (int64_t)1 << l;
    const int64_t slots = (nvec + g - 1) / g * g;
    if (slots < best_slots) {
      best = l;
      best_slots = slots;
    }
  }
  return best;
}

// Blocks for `rows` rows at 2^log2g lanes per row (kBlock >> log2g rows per block).
inline int64_t grid_blocks(int64_t rows, int log2g) {
  const int64_t per_block = kBlock >> log2g;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  return blocks < kMaxGrid ? blocks : kMaxGrid;
}

// What a launcher launches: `rows` output rows of `nvec` vectors of `vb` bytes,
// 2^log2g lanes per row, `grid` blocks of kBlock threads.  vb == 0: the row
// size or a pointer is not aligned enough (error); rows == 0: nothing to launch.
struct Plan {
  int vb = 0, log2g = 0;
  int64_t rows = 0, nvec = 0, grid = 0;
};

inline Plan make_plan(int64_t rows, int64_t row_bytes, int min_vb, uintptr_t a, uintptr_t b,
                      uintptr_t c) {
  Plan p;
  p.vb = vector_bytes(row_bytes, a, b, c);
  if (p.vb < min_vb) p.vb = 0;
  if (p.vb == 0 || rows <= 0 || row_bytes <= 0) return p;
  p.rows = rows;
  p.nvec = row_bytes / p.vb;
  p.log2g = lanes_log2(p.nvec);
  p.grid = grid_blocks(rows, p.log2g);
  return p;
}

// Gather: B*K output rows; any element type (vectors of >= 2 bytes).
inline Plan gather_launch_plan(const void* x, const void* out, int64_t B, int64_t K,
                               int64_t row_bytes) {
  return make_plan(B * K, row_bytes, 2, (uintptr_t)x, (uintptr_t)out, 0);
}

// Scatter: B*N output rows; vectors hold whole elements of elem_bytes.  y is
// not read when K == 0, so its address does not count then.
inline Plan scatter_launch_plan(const void* x, const void* y, const void* out, int64_t B,
                                int64_t N, int64_t K, int64_t C, int elem_bytes) {
  return make_plan(B * N, C * elem_bytes, elem_bytes, (uintptr_t)x, K > 0 ? (uintptr_t)y : 0,
                   (uintptr_t)out);
}

// The rows of one thread: lane `lane` of G in rows first, first + stride, ...
// (block, thread: blockIdx.x, threadIdx.x of a grid of `grid` blocks).
struct RowLoop {
  int lane, G;
  int64_t first, stride;
  EK_HD RowLoop(int64_t block, int thread, int64_t grid, int log2g) {
    G = 1 << log2g;
    lane = thread & (G - 1);
    const int64_t per_block = kBlock >> log2g;
    first = block * per_block + (thread >> log2g);
    stride = grid * per_block;
  }
};

// ---- rows ------------------------------------------------------------------------------------

// d[i] = s[i] for the vectors i of lane `lane` (of G); all loads of a step before its stores.
template <typename V>
EK_HD void copy_row(const V* __restrict__ s, V* __restrict__ d, int64_t nvec, int lane,
                        int G) {
  const int64_t step = (int64_t)G * kUnroll;
  for (int64_t v0 = lane; v0 < nvec; v0 += step) {
    V t[kUnroll];
    EK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = v0 + (int64_t)u * G;
      t[u] = i < nvec ? load_vec(s + i) : zero_vec<V>();
    }
    EK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = v0 + (int64_t)u * G;
      if (i < nvec) store_vec(d + i, t[u]);
    }
  }
}

template <typename V>
EK_HD void zero_row(V* __restrict__ d, int64_t nvec, int lane, int G) {
  for (int64_t i = lane; i < nvec; i += G) store_vec(d + i, zero_vec<V>());
}

// a / b for a >= 0, b > 0, through the cheaper 32-bit divide when both fit.
EK_HD int64_t udiv(int64_t a, int64_t b) {
  if ((((uint64_t)a | (uint64_t)b) >> 32) == 0) return (int64_t)((uint32_t)a / (uint32_t)b);
  return a / b;
}

// Gather, output row r in [0, B*K) (rows of nvec vectors): out[r] = x[b, idx[r]], b = r / K;
// a zero row when idx[r] is outside [0, N) (x is then not read).
template <typename V, typename Idx>
EK_HD void gather_row(const V* __restrict__ x, const Idx* __restrict__ idx,
                          V* __restrict__ out, int64_t r, int64_t N, int64_t K, int64_t nvec,
                          int lane, int G) {
  const int64_t b = udiv(r, K);
  const int64_t i = (int64_t)idx[r];
  V* d = out + r * nvec;
  if (i >= 0 && i < N) {
    copy_row(x + (b * N + i) * nvec, d, nvec, lane, G);
  } else {
    zero_row(d, nvec, lane, G);
  }
}

// The scatter segment of output row j of batch b: [s0, s1) into order[b], from
// starts[b, j], starts[b, j + 1], clamped to 0 <= s0 <= s1 <= K (so a malformed
// plan never makes a kernel read outside order or y).
struct Segment {
  int64_t b, j, s0, s1;
};

EK_HD Segment scatter_segment(const int64_t* __restrict__ starts, int64_t r, int64_t N,
                                  int64_t K) {
  Segment g;
  g.b = udiv(r, N);
  g.j = r - g.b * N;
  const int64_t* st = starts + g.b * (N + 1) + g.j;
  int64_t s0 = st[0], s1 = st[1];
  s1 = s1 < 0 ? 0 : (s1 > K ? K : s1);
  s0 = s0 < 0 ? 0 : (s0 > s1 ? s1 : s0);
  g.s0 = s0;
  g.s1 = s1;
  return g;
}

// Scatter (replace), output row r in [0, B*N): y[b, order[b, s1 - 1]] when the
// segment is not empty (x is then not read), else x[b, j].
template <typename V>
EK_HD void scatter_replace_row(const V* __restrict__ x, const V* __restrict__ y,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ starts, V* __restrict__ out,
                                   int64_t r, int64_t N, int64_t K, int64_t nvec, int lane,
                                   int G) {
  const Segment g = scatter_segment(starts, r, N, K);
  const V* src = x + r * nvec;
  if (g.s1 > g.s0) {
    const int64_t k = order[g.b * K + g.s1 - 1];
    if (k >= 0 && k < K) src = y + (g.b * K + k) * nvec;
  }
  copy_row(src, out + r * nvec, nvec, lane, G);
}

// acc[e] (+)= the E elements of vector v.
template <typename T, typename V, int E>
EK_HD void unpack(const V& v, float (&acc)[E], bool add) {
  using S = typename T::storage;
  union {
    V v;
    S e[E];
  } p;
  p.v = v;
  EK_UNROLL
  for (int e = 0; e < E; ++e) acc[e] = add ? acc[e] + T::load(p.e[e]) : T::load(p.e[e]);
}

template <typename T, typename V, int E>
EK_HD V pack(const float (&acc)[E]) {
  using S = typename T::storage;
  union {
    V v;
    S e[E];
  } p;
  EK_UNROLL
  for (int e = 0; e < E; ++e) p.e[e] = T::store(acc[e]);
  return p.v;
}

// Scatter (add), output row r in [0, B*N): x[b, j] + sum over s in [s0, s1) of
// y[b, order[b, s]] (an order entry outside [0, K) is skipped), accumulated in
// float32 in ascending s and rounded once.  Needs sizeof(V) % sizeof(T::storage) == 0.
template <typename T, typename V>
EK_HD void scatter_add_row(const V* __restrict__ x, const V* __restrict__ y,
                               const int64_t* __restrict__ order,
                               const int64_t* __restrict__ starts, V* __restrict__ out,
                               int64_t r, int64_t N, int64_t K, int64_t nvec, int lane, int G) {
  using S = typename T::storage;
  static_assert(sizeof(V) % sizeof(S) == 0, "vector narrower than an element");
  constexpr int E = (int)(sizeof(V) / sizeof(S));
  const Segment g = scatter_segment(starts, r, N, K);
  const V* xr = x + r * nvec;
  const V* yb = y + g.b * K * nvec;
  const int64_t* ob = order + g.b * K;
  V* d = out + r * nvec;
  const int64_t step = (int64_t)G * kUnroll;
  for (int64_t v0 = lane; v0 < nvec; v0 += step) {
    float acc[kUnroll][E];
    EK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = v0 + (int64_t)u * G;
      unpack<T>(i < nvec ? load_vec(xr + i) : zero_vec<V>(), acc[u], false);
    }
    for (int64_t s = g.s0; s < g.s1; ++s) {
      const int64_t k = ob[s];
      if (k < 0 || k >= K) continue;
      const V* yr = yb + k * nvec;
      V t[kUnroll];
      EK_UNROLL
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = v0 + (int64_t)u * G;
        t[u] = i < nvec ? load_vec(yr + i) : zero_vec<V>();
      }
      EK_UNROLL
      for (int u = 0; u < kUnroll; ++u) unpack<T>(t[u], acc[u], true);
    }
    EK_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = v0 + (int64_t)u * G;
      if (i < nvec) store_vec(d + i, pack<T, V>(acc[u]));
    }
  }
}

}  // namespace tokens
}  // namespace effkern
