// Host transcription of the shift kernels (shift_linear.cu, deepshift_linear.cu), for checking
// them without a GPU.  It runs the launch plan and every block, warp and lane of the grid in
// turn with the same helpers the kernels use (shift_gemm.cuh: the shared-memory swizzles, the
// fragment assembly, the code decoding, the epilogue's 2^base, DeepShift's packed shifts), and
// emulates mma.sync m16n8k16 with the fragment layout the PTX ISA specifies (row g / g + 8,
// k 2t.. / 2t+8.. for A; k 2t.. / 2t+8.. and column g for B; row g / g + 8, columns 2t, 2t+1
// for the accumulators).  What it cannot show: the cp.async pipeline's synchronisation and the
// hardware's own MMA.  tests/test_shift_cuda.py compiles this with the host C++ compiler and
// compares it, via ctypes, with the torch references in effkern/ops/shift.py.
//
// x holds the raw 16-bit patterns of bf16 (bf16 != 0) or fp16 values; bias is given as float
// values (the kernel widens the output-dtype bias to float); y receives the epilogue's float32
// values before the final rounding to x's dtype.
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "kernels/shift/shift_gemm.cuh"

using namespace effkern::shift;

namespace {

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

float fp16_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  float v = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
                     : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(static_cast<float>(man | 1024), exp - 25);
  return sign ? -v : v;
}

template <bool kBf16>
float half_value(uint32_t word, int which) {
  const uint16_t h = static_cast<uint16_t>(which ? word >> 16 : word & 0xFFFF);
  return kBf16 ? bf16_to_float(h) : fp16_to_float(h);
}

// D = A B + C for one warp, each lane's registers laid out as the PTX ISA specifies for
// mma.m16n8k16 with 16-bit A/B and float32 C/D.  Products summed in double, rounded once.
template <bool kBf16>
void mma_emulate(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {  // a0a1, a2a3, a4a5, a6a7
      const int row = g + 8 * (r & 1), k = 2 * t + 8 * (r >> 1);
      A[row][k] = half_value<kBf16>(a[lane][r], 0);
      A[row][k + 1] = half_value<kBf16>(a[lane][r], 1);
    }
    for (int r = 0; r < 2; ++r) {  // b0b1, b2b3
      const int k = 2 * t + 8 * r;
      B[k][g] = half_value<kBf16>(b[lane][r], 0);
      B[k + 1][g] = half_value<kBf16>(b[lane][r], 1);
    }
  }
  float D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) D[g + 8 * (r >> 1)][2 * t + (r & 1)] = c[lane][r];
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double s = D[i][j];
      for (int k = 0; k < 16; ++k) s += static_cast<double>(A[i][k]) * B[k][j];
      D[i][j] = static_cast<float>(s);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) c[lane][r] = D[g + 8 * (r >> 1)][2 * t + (r & 1)];
  }
}

template <bool kBf16, int kBits, int kBlockM>
void emulate_shift_linear(const uint16_t* x, const uint8_t* codes, const int32_t* base, const float* bias,
                          float* y, const Plan& p, int64_t M, int N, int K, int code_cols) {
  using W = WarpTile<kBlockM>;
  constexpr int kWarps = kThreads / 32;
  const bool partial = p.split_k > 1;
  std::vector<float> partials(partial ? static_cast<size_t>(p.split_k) * M * N : 0);
  std::vector<uint16_t> xs(kBlockM * kStepK);
  std::vector<uint8_t> cs(kBlockN * kCodeBytes<kBits>);
  const int steps = (K + kStepK - 1) / kStepK;
  for (int bz = 0; bz < p.split_k; ++bz) {
    for (int by = 0; by < p.n_tiles; ++by) {
      for (int64_t bx = 0; bx < p.m_tiles; ++bx) {
        const int64_t m0 = bx * kBlockM;
        const int n0 = by * kBlockN;
        const int step_begin = bz * p.steps_per_split;
        const int step_end = steps < step_begin + p.steps_per_split ? steps : step_begin + p.steps_per_split;
        std::vector<float> acc(static_cast<size_t>(kWarps) * 32 * W::kFragsM * W::kFragsN * 4, 0.f);
        auto acc_at = [&](int warp, int lane, int i, int j) {
          return &acc[((((static_cast<size_t>(warp) * 32 + lane) * W::kFragsM + i) * W::kFragsN) + j) * 4];
        };
        for (int step = step_begin; step < step_end; ++step) {
          const int k0 = step * kStepK;
          for (int c = 0; c < kBlockM * 8; ++c) {  // load_stage, x
            const int row = c / 8, chunk = c % 8;
            const int64_t m = m0 + row;
            const int k = k0 + 8 * chunk;
            const bool ok = m < M && k < K;
            for (int e = 0; e < 8; ++e) xs[8 * x_chunk_slot(row, chunk) + e] = ok ? x[m * K + k + e] : 0;
          }
          constexpr int kChunks = kCodeBytes<kBits> / 16;
          for (int c = 0; c < kBlockN * kChunks; ++c) {  // load_stage, codes
            const int row = c / kChunks, chunk = c % kChunks;
            const int n = n0 + row;
            const int64_t col = kBits == 5 ? static_cast<int64_t>(k0) + 16 * chunk : (k0 / 2) + 16 * chunk;
            const bool ok = n < N && (kBits == 4 || col < K);
            for (int e = 0; e < 16; ++e) {
              cs[16 * code_chunk_slot(row, chunk, kBits) + e] = ok ? codes[static_cast<int64_t>(n) * code_cols + col + e] : 0;
            }
          }
          for (int warp = 0; warp < kWarps; ++warp) {
            // every lane's x words of the step: [lane][i][row g / g + 8][half] -> 4 words
            std::vector<uint32_t> aw(32 * W::kFragsM * 16);
            auto a_rows = [&](int lane, int i) { return reinterpret_cast<uint32_t(*)[2][4]>(&aw[(lane * W::kFragsM + i) * 16]); };
            for (int lane = 0; lane < 32; ++lane) {
              const int g = lane / 4, t = lane % 4;
              for (int i = 0; i < W::kFragsM; ++i) {
                for (int r = 0; r < 2; ++r) {
                  const int row = W::row0(warp) + 16 * i + 8 * r + g;
                  for (int h = 0; h < 2; ++h) memcpy(a_rows(lane, i)[r][h], &xs[8 * x_chunk_slot(row, 4 * h + t)], 16);
                }
              }
            }
            for (int j = 0; j < W::kFragsN; ++j) {
              for (int h = 0; h < 2; ++h) {
                for (int s = 0; s < 2; ++s) {
                  uint32_t b[32][2];
                  for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane / 4, t = lane % 4;
                    uint32_t words[2];
                    memcpy(words, &cs[code_read_offset(W::col0(warp) + 8 * j + g, t, h, kBits)], 8);
                    b_fragment<kBf16, kBits>(words, h, s, b[lane]);
                  }
                  for (int i = 0; i < W::kFragsM; ++i) {
                    uint32_t a[32][4];
                    float c[32][4];
                    for (int lane = 0; lane < 32; ++lane) {
                      a_fragment(a_rows(lane, i), h, s, a[lane]);
                      memcpy(c[lane], acc_at(warp, lane, i, j), 16);
                    }
                    mma_emulate<kBf16>(a, b, c);
                    for (int lane = 0; lane < 32; ++lane) memcpy(acc_at(warp, lane, i, j), c[lane], 16);
                  }
                }
              }
            }
          }
        }
        for (int warp = 0; warp < kWarps; ++warp) {  // the epilogue
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            for (int j = 0; j < W::kFragsN; ++j) {
              const int n = n0 + W::col0(warp) + 8 * j + 2 * t;
              for (int i = 0; i < W::kFragsM; ++i) {
                for (int r = 0; r < 2; ++r) {
                  const int64_t m = m0 + W::row0(warp) + 16 * i + 8 * r + g;
                  for (int c = 0; c < 2; ++c) {
                    if (m >= M || n + c >= N) continue;
                    const float v = acc_at(warp, lane, i, j)[2 * r + c] * exp2_int(base[n + c]) +
                                    (bias != nullptr && !partial ? bias[n + c] : 0.f);
                    (partial ? &partials[(static_cast<int64_t>(bz) * M + m) * N] : &y[m * N])[n + c] = v;
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  if (partial) {  // split_k_sum_kernel
    for (int64_t e = 0; e < M * N; ++e) {
      float v = 0.f;
      for (int s = 0; s < p.split_k; ++s) v += partials[s * M * N + e];
      y[e] = bias != nullptr ? v + bias[e % N] : v;
    }
  }
}

template <bool kBf16, int kBits>
void emulate_typed(const uint16_t* x, const uint8_t* codes, const int32_t* base, const float* bias, float* y,
                   const Plan& p, int64_t M, int N, int K, int code_cols) {
  if (p.block_m == 16) {
    emulate_shift_linear<kBf16, kBits, 16>(x, codes, base, bias, y, p, M, N, K, code_cols);
  } else {
    emulate_shift_linear<kBf16, kBits, 64>(x, codes, base, bias, y, p, M, N, K, code_cols);
  }
}

}  // namespace

extern "C" {

// make_plan's (block_m, m_tiles, n_tiles, split_k, steps_per_split) into plan[5].
void shift_plan(int64_t M, int64_t N, int64_t K, int sms, int64_t* plan) {
  const Plan p = make_plan(M, N, K, sms);
  plan[0] = p.block_m, plan[1] = p.m_tiles, plan[2] = p.n_tiles, plan[3] = p.split_k, plan[4] = p.steps_per_split;
}

// decode_pair on one code per 16-bit half: the two 16-bit patterns (bf16 or fp16).
uint32_t shift_decode_pair(uint32_t pair, int bf16, int bits) {
  if (bf16) return bits == 5 ? decode_pair<true, 5>(pair) : decode_pair<true, 4>(pair);
  return bits == 5 ? decode_pair<false, 5>(pair) : decode_pair<false, 4>(pair);
}

// The shift_linear kernel's grid for a GPU of `sms` SMs; returns the split count it ran.
int shift_linear_emulate(const uint16_t* x, int bf16, const uint8_t* codes, const int32_t* base, const float* bias,
                         float* y, int64_t M, int64_t N, int64_t K, int64_t code_cols, int bits, int sms) {
  const Plan p = make_plan(M, N, K, sms);
  const int n = static_cast<int>(N), k = static_cast<int>(K), cc = static_cast<int>(code_cols);
  if (bf16 && bits == 5) emulate_typed<true, 5>(x, codes, base, bias, y, p, M, n, k, cc);
  else if (bf16) emulate_typed<true, 4>(x, codes, base, bias, y, p, M, n, k, cc);
  else if (bits == 5) emulate_typed<false, 5>(x, codes, base, bias, y, p, M, n, k, cc);
  else emulate_typed<false, 4>(x, codes, base, bias, y, p, M, n, k, cc);
  return p.split_k;
}

// deepshift_linear_kernel's arithmetic: int64 sums of deepshift_term, saturated to int32.
void deepshift_linear_emulate(const int32_t* x, const uint8_t* codes, const int32_t* base, const int32_t* bias,
                              int32_t* y, int64_t M, int64_t N, int64_t K, int64_t code_cols, int bits) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        acc += deepshift_term(x[m * K + k], deepshift_pack(code_at(codes, n, k, code_cols, bits), base[n], bits));
      }
      int64_t v = acc + (bias != nullptr ? bias[n] : 0);
      v = v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v);
      y[m * N + n] = static_cast<int32_t>(v);
    }
  }
}

}  // extern "C"
