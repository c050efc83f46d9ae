// Host transcription of the token gather/scatter launches, for checking them
// without a GPU.  It makes the launchers' plan (tokens_rows.cuh: vector width,
// lanes per row, grid) and then runs every thread of that grid in turn:
// the same thread -> row mapping (RowLoop) and the same row code
// (gather_row, scatter_replace_row, scatter_add_row) the kernels run.  Lanes
// write disjoint vectors, so running them one after the other is a faithful
// schedule.  tests/test_tokens_cuda.py compiles this with the host C++
// compiler into a small shared library and compares it, via ctypes, with the
// torch backend in effkern/ops/tokens.py.  Not part of effkern/_C*.so.
//
// Element types (type): 0 float16, 1 bfloat16, 2 float32 (kernels/common/dtypes.h'
// FloatType).  max_grid > 0 caps the grid below the launchers' kMaxGrid, so
// that small inputs exercise the grid-stride loop too.
#include <stdint.h>

#include "kernels/tokens/tokens_rows.cuh"

using namespace effkern::tokens;

namespace {

template <typename F>
bool dispatch_vec(int vb, F&& f) {
  switch (vb) {
    case 16: f(Vec<16>()); return true;
    case 8: f(Vec<8>()); return true;
    case 4: f(Vec<4>()); return true;
    case 2: f(Vec<2>()); return true;
    default: return false;
  }
}

// Runs body(r, lane, G) for every (thread, row) of the plan's grid.
template <typename Body>
void run_grid(const Plan& p, int64_t max_grid, Body&& body) {
  const int64_t grid = max_grid > 0 && max_grid < p.grid ? max_grid : p.grid;
  for (int64_t block = 0; block < grid; ++block) {
    for (int t = 0; t < kBlock; ++t) {
      const RowLoop L(block, t, grid, p.log2g);
      for (int64_t r = L.first; r < p.rows; r += L.stride) body(r, L.lane, L.G);
    }
  }
}

void write_info(const Plan& p, int64_t* info) {
  if (info == nullptr) return;
  info[0] = p.vb;
  info[1] = p.log2g;
  info[2] = p.nvec;
  info[3] = p.grid;
}

template <typename T, typename V>
void scatter_add(const Plan& p, const void* x, const void* y, const int64_t* order,
                 const int64_t* starts, void* out, int64_t N, int64_t K, int64_t max_grid) {
  if constexpr (sizeof(V) % sizeof(typename T::storage) == 0) {
    run_grid(p, max_grid, [&](int64_t r, int lane, int G) {
      scatter_add_row<T>(static_cast<const V*>(x), static_cast<const V*>(y), order, starts,
                         static_cast<V*>(out), r, N, K, p.nvec, lane, G);
    });
  }
}

}  // namespace

extern "C" {

// The plans (info = [vb, log2g, nvec, grid]); returns vb (0: not aligned enough).
int ek_token_gather_plan(const void* x, const void* out, int64_t B, int64_t K, int64_t row_bytes,
                         int64_t* info) {
  const Plan p = gather_launch_plan(x, out, B, K, row_bytes);
  write_info(p, info);
  return p.vb;
}

int ek_token_scatter_plan(const void* x, const void* y, const void* out, int64_t B, int64_t N,
                          int64_t K, int64_t C, int elem_bytes, int64_t* info) {
  const Plan p = scatter_launch_plan(x, y, out, B, N, K, C, elem_bytes);
  write_info(p, info);
  return p.vb;
}

// As launch_token_gather; returns 0, or 1 when not aligned enough.
int ek_token_gather(const void* x, const void* idx, int idx_i64, void* out, int64_t B, int64_t N,
                    int64_t K, int64_t row_bytes, int64_t max_grid) {
  if (B <= 0 || K <= 0 || row_bytes <= 0) return 0;
  const Plan p = gather_launch_plan(x, out, B, K, row_bytes);
  if (p.vb == 0) return 1;
  dispatch_vec(p.vb, [&](auto v) {
    using V = decltype(v);
    run_grid(p, max_grid, [&](int64_t r, int lane, int G) {
      if (idx_i64) {
        gather_row(static_cast<const V*>(x), static_cast<const int64_t*>(idx), static_cast<V*>(out),
                   r, N, K, p.nvec, lane, G);
      } else {
        gather_row(static_cast<const V*>(x), static_cast<const int32_t*>(idx), static_cast<V*>(out),
                   r, N, K, p.nvec, lane, G);
      }
    });
  });
  return 0;
}

// As launch_token_scatter; returns 0, 1 when not aligned enough, 2 for a bad type.
int ek_token_scatter(const void* x, const void* y, const int64_t* order, const int64_t* starts,
                     int type, int add, void* out, int64_t B, int64_t N, int64_t K, int64_t C,
                     int64_t max_grid) {
  if (B <= 0 || N <= 0 || C <= 0) return 0;
  if (type < 0 || type > 2) return 2;
  const int elem = type == 2 ? 4 : 2;
  const Plan p = scatter_launch_plan(x, y, out, B, N, K, C, elem);
  if (p.vb == 0) return 1;
  dispatch_vec(p.vb, [&](auto v) {
    using V = decltype(v);
    if (!add) {
      run_grid(p, max_grid, [&](int64_t r, int lane, int G) {
        scatter_replace_row(static_cast<const V*>(x), static_cast<const V*>(y), order, starts,
                            static_cast<V*>(out), r, N, K, p.nvec, lane, G);
      });
    } else if (type == 0) {
      scatter_add<F16, V>(p, x, y, order, starts, out, N, K, max_grid);
    } else if (type == 1) {
      scatter_add<BF16, V>(p, x, y, order, starts, out, N, K, max_grid);
    } else {
      scatter_add<F32, V>(p, x, y, order, starts, out, N, K, max_grid);
    }
  });
  return 0;
}

}  // extern "C"
