// Host transcription of the 2:4-sparse int8 GEMM (sparse24_int8_linear.cu), for checking it
// without a GPU.  It lays each pipeline stage out in "shared memory" with the kernel's swizzles,
// builds every lane's A, B and metadata registers as the kernel's ldmatrix and 32-bit loads do
// (sparse24_gemm.cuh; ldmatrix .m8n8.x4 .b16: matrix q's row r comes from the address of lane
// 8q + r, and lane l receives bytes 4 (l % 4) .. + 3 of row l / 4 of matrix q in register q),
// runs mma.sp m16n8k64 on them as the PTX ISA specifies (the model of
// tests/sparse_mma_emulation.py, which pins it to torch's CUTLASS-layout conversion), stages
// the accumulators through the epilogue tile and applies the epilogue with the kernel's own
// functions.  tests/test_sparse24_cuda.py compiles this with the host C++ compiler and drives
// it through ctypes.  What it cannot show: the pipeline's synchronisation and the hardware.
#include <stdint.h>
#include <string.h>

#include <vector>

#include "kernels/sparse24/sparse24_gemm.cuh"

using namespace effkern::sparse24;

namespace {

struct Operands {
  const int8_t* x;
  const int8_t* values;
  const uint8_t* meta;
  int64_t M, N, K;
};

// The stage images of one block at one K step, as load_stage fills them (zeros past the edges).
struct Stage {
  std::vector<uint8_t> v, m, x;
};

Stage load_stage(const Operands& o, int block_tokens, int64_t tok0, int row0, int step) {
  Stage s{std::vector<uint8_t>(kBlockRows * kValueBytes), std::vector<uint8_t>(kBlockRows * kMetaBytes),
          std::vector<uint8_t>(block_tokens * kXBytes)};
  const int k0 = step * kStepK;
  const int64_t kv = o.K / 2, km = o.K / 8;
  for (int c = 0; c < kBlockRows * 2; ++c) {
    const int r = c / 2, chunk = c % 2, n = row0 + r;
    const int64_t col = k0 / 2 + 16 * chunk;
    const bool ok = n < o.N && col < kv;
    for (int e = 0; e < 16; ++e) s.v[16 * value_chunk_slot(r, chunk) + e] = ok ? o.values[n * kv + col + e] : 0;
  }
  for (int r = 0; r < kBlockRows; ++r) {
    const int n = row0 + r;
    for (int e = 0; e < 8; ++e) {
      s.m[kMetaBytes * r + e] = n < o.N ? o.meta[n * km + k0 / 8 + e] : static_cast<uint8_t>(kPaddingMeta >> (8 * e));
    }
  }
  for (int c = 0; c < block_tokens * 4; ++c) {
    const int r = c / 4, chunk = c % 4;
    const int64_t m = tok0 + r, k = k0 + 16 * chunk;
    const bool ok = m < o.M && k < o.K;
    for (int e = 0; e < 16; ++e) s.x[16 * x_chunk_slot(r, chunk) + e] = ok ? o.x[m * o.K + k + e] : 0;
  }
  return s;
}

uint32_t word_at(const std::vector<uint8_t>& smem, int offset) {
  uint32_t w;
  memcpy(&w, &smem[offset], 4);
  return w;
}

// ldmatrix.x4 of the 16-row A tile at row0 (a_ldmatrix_source) and of the 8 tokens at tok0
// (b_ldmatrix_source); the metadata word by meta_source.
void fragment_registers(const Stage& s, int row0, int tok0, uint32_t a[32][4], uint32_t b[32][4], uint32_t e[32]) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int q = 0; q < 4; ++q) {
      int r, chunk;
      a_ldmatrix_source(row0, 8 * q + lane / 4, &r, &chunk);
      a[lane][q] = word_at(s.v, 16 * value_chunk_slot(r, chunk) + 4 * (lane % 4));
      b_ldmatrix_source(tok0, 8 * q + lane / 4, &r, &chunk);
      b[lane][q] = word_at(s.x, 16 * x_chunk_slot(r, chunk) + 4 * (lane % 4));
    }
    int r, byte;
    meta_source(row0, lane, &r, &byte);
    e[lane] = word_at(s.m, kMetaBytes * r + byte);
  }
}

int8_t byte_of(uint32_t w, int y) { return static_cast<int8_t>((w >> (8 * y)) & 0xFF); }

// mma.sp::ordered_metadata m16n8k64 s8: row r's chunk c (4 dense k) is the two values of bytes
// 2 (c % 2), + 1 of register (r / 8) + 2 (c / 8) of lane 4 (r % 8) + (c % 8) / 2, at the
// positions i0 < i1 of the nibble at bits 4 (c % 8) of the e of lane 4 (r % 8) + (r / 8) + 2 (c / 8);
// B[k, n] is byte k % 4 of register k / 16 of lane 4 n + (k % 16) / 4; C/D (g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1).  Returns false on a nibble the instruction leaves undefined.
bool mma_sp(const uint32_t a[32][4], const uint32_t b[32][4], const uint32_t e[32], int32_t c[32][4]) {
  int32_t A[16][64] = {}, B[64][8];
  for (int r = 0; r < 16; ++r) {
    for (int ch = 0; ch < 16; ++ch) {
      const uint32_t w = a[4 * (r % 8) + (ch % 8) / 2][(r / 8) + 2 * (ch / 8)];
      const uint32_t nib = (e[4 * (r % 8) + (r / 8) + 2 * (ch / 8)] >> (4 * (ch % 8))) & 0xF;
      const int i0 = nib & 3, i1 = nib >> 2;
      if (i0 >= i1) return false;
      A[r][4 * ch + i0] = byte_of(w, 2 * (ch % 2));
      A[r][4 * ch + i1] = byte_of(w, 2 * (ch % 2) + 1);
    }
  }
  for (int k = 0; k < 64; ++k) {
    for (int n = 0; n < 8; ++n) B[k][n] = byte_of(b[4 * n + (k % 16) / 4][k / 16], k % 4);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      int64_t sum = c[lane][i];
      for (int k = 0; k < 64; ++k) sum += static_cast<int64_t>(A[row][k]) * B[k][col];
      c[lane][i] = static_cast<int32_t>(static_cast<uint32_t>(sum));  // wraps, as without .satfinite
    }
  }
  return true;
}

struct HostEpilogue {
  int kind, act;
  const float* x_scale;
  int x_scale_per_token;
  const float* w_scale;
  const float* bias_f32;
  const int32_t* bias_i32;
  const float* inv_out_scale;
  int out_scale_per_channel;
};

// finish() of the kernel: y is int32 / float (bf16/fp16 outputs before their rounding) / int8.
void finish(const HostEpilogue& ep, void* y, int64_t m, int n, int64_t N, int32_t acc) {
  const int64_t i = m * N + n;
  const OutKind kind = static_cast<OutKind>(ep.kind);
  if (kind == OutKind::I32) {
    static_cast<int32_t*>(y)[i] = ep.bias_i32 ? saturating_add(acc, ep.bias_i32[n]) : acc;
    return;
  }
  const float v = epilogue_value(acc, ep.x_scale[ep.x_scale_per_token ? m : 0], ep.w_scale[n],
                                 ep.bias_f32 ? ep.bias_f32[n] : 0.f, static_cast<Activation>(ep.act));
  if (kind == OutKind::I8) {
    static_cast<int8_t*>(y)[i] = requantize_int8(v, ep.inv_out_scale[ep.out_scale_per_channel ? n : 0]);
  } else {
    static_cast<float*>(y)[i] = v;
  }
}

template <int kBlockTokens>
int emulate(const Operands& o, const HostEpilogue& ep, void* y, const Plan& p) {
  using W = WarpTile<kBlockTokens>;
  const int steps = static_cast<int>((o.K + kStepK - 1) / kStepK);
  std::vector<int32_t> partials(p.split_k > 1 ? static_cast<size_t>(p.split_k) * o.M * o.N : 0);
  for (int bz = 0; bz < p.split_k; ++bz) {
    for (int by = 0; by < p.row_tiles; ++by) {
      for (int64_t bx = 0; bx < p.tok_tiles; ++bx) {
        const int64_t tok0 = bx * kBlockTokens;
        const int row0 = by * kBlockRows;
        const int step_begin = bz * p.steps_per_split;
        const int step_end = steps < step_begin + p.steps_per_split ? steps : step_begin + p.steps_per_split;
        // acc[warp][i][j][lane][4]
        std::vector<int32_t> acc(4 * W::kFragsRow * W::kFragsTok * 32 * 4, 0);
        auto acc_at = [&](int warp, int i, int j) {
          return reinterpret_cast<int32_t(*)[4]>(&acc[(((warp * W::kFragsRow + i) * W::kFragsTok + j) * 32) * 4]);
        };
        for (int step = step_begin; step < step_end; ++step) {
          const Stage s = load_stage(o, kBlockTokens, tok0, row0, step);
          for (int warp = 0; warp < 4; ++warp) {
            for (int i = 0; i < W::kFragsRow; ++i) {
              for (int j = 0; j < W::kFragsTok; ++j) {
                uint32_t a[32][4], b[32][4], e[32];
                fragment_registers(s, W::row0(warp) + 16 * i, W::tok0(warp) + 8 * j, a, b, e);
                if (!mma_sp(a, b, e, acc_at(warp, i, j))) return 1;
              }
            }
          }
        }
        // the epilogue tile, pass by pass, as the kernel stages it
        constexpr int kPassTokens = W::kTokens, kPitch = kBlockRows + 4;
        std::vector<int32_t> tile(kPassTokens * kPitch);
        for (int pass = 0; pass < W::kWarpsTok; ++pass) {
          for (int warp = 0; warp < 4; ++warp) {
            if (W::tok0(warp) != pass * kPassTokens) continue;
            for (int lane = 0; lane < 32; ++lane) {
              const int g = lane / 4, t = lane % 4;
              for (int i = 0; i < W::kFragsRow; ++i) {
                for (int j = 0; j < W::kFragsTok; ++j) {
                  for (int c = 0; c < 4; ++c) {
                    const int row = W::row0(warp) + 16 * i + g + 8 * (c >> 1), tok = 8 * j + 2 * t + (c & 1);
                    tile[tok * kPitch + row] = acc_at(warp, i, j)[lane][c];
                  }
                }
              }
            }
          }
          for (int idx = 0; idx < kPassTokens * kBlockRows; ++idx) {
            const int row = idx % kBlockRows, tok = idx / kBlockRows;
            const int n = row0 + row;
            const int64_t m = tok0 + pass * kPassTokens + tok;
            if (n >= o.N || m >= o.M) continue;
            const int32_t a = tile[tok * kPitch + row];
            if (p.split_k > 1) {
              partials[(static_cast<int64_t>(bz) * o.M + m) * o.N + n] = a;
            } else {
              finish(ep, y, m, n, o.N, a);
            }
          }
        }
      }
    }
  }
  if (p.split_k > 1) {  // sparse24_int8_linear_split_k_kernel
    for (int64_t i = 0; i < o.M * o.N; ++i) {
      int32_t a = 0;
      for (int s = 0; s < p.split_k; ++s) a += partials[s * o.M * o.N + i];
      finish(ep, y, i / o.N, static_cast<int>(i % o.N), o.N, a);
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// make_plan's (block_tokens, tok_tiles, row_tiles, split_k, steps_per_split) into plan[5].
void sparse24_plan(int64_t M, int64_t N, int64_t K, int sms, int64_t* plan) {
  const Plan p = make_plan(M, N, K, sms);
  plan[0] = p.block_tokens, plan[1] = p.tok_tiles, plan[2] = p.row_tiles, plan[3] = p.split_k;
  plan[4] = p.steps_per_split;
}

// The registers of fragment (row0, tok0) of a block at (row tile origin, token tile origin,
// step), as the kernel loads them: a, b [32][4], e [32].
void sparse24_fragment(const int8_t* x, const int8_t* values, const uint8_t* meta, int64_t M, int64_t N, int64_t K,
                       int block_tokens, int64_t block_tok0, int block_row0, int step, int row0, int tok0,
                       uint32_t* a, uint32_t* b, uint32_t* e) {
  const Operands o{x, values, meta, M, N, K};
  const Stage s = load_stage(o, block_tokens, block_tok0, block_row0, step);
  fragment_registers(s, row0, tok0, reinterpret_cast<uint32_t(*)[4]>(a), reinterpret_cast<uint32_t(*)[4]>(b), e);
}

// One mma.sp on given registers (c updated in place); returns 0, or 1 on an undefined nibble.
int sparse24_mma(const uint32_t* a, const uint32_t* b, const uint32_t* e, int32_t* c) {
  return mma_sp(reinterpret_cast<const uint32_t(*)[4]>(a), reinterpret_cast<const uint32_t(*)[4]>(b), e,
                reinterpret_cast<int32_t(*)[4]>(c)) ? 0 : 1;
}

// The whole kernel (plan for `sms` SMs) and its epilogue; returns the split count, or -1 on an
// undefined metadata nibble.
int sparse24_emulate(const int8_t* x, const int8_t* values, const uint8_t* meta, int64_t M, int64_t N, int64_t K,
                     int kind, int act, const float* x_scale, int x_scale_per_token, const float* w_scale,
                     const float* bias_f32, const int32_t* bias_i32, const float* inv_out_scale,
                     int out_scale_per_channel, void* y, int sms) {
  const Operands o{x, values, meta, M, N, K};
  const HostEpilogue ep{kind, act, x_scale, x_scale_per_token, w_scale, bias_f32, bias_i32, inv_out_scale,
                        out_scale_per_channel};
  const Plan p = make_plan(M, N, K, sms);
  const int bad = p.block_tokens == 16 ? emulate<16>(o, ep, y, p) : emulate<64>(o, ep, y, p);
  return bad ? -1 : p.split_k;
}

}  // extern "C"
