// How the tensor-core GEMMs (kernels/shift, kernels/sparse24) split K when their output tiles
// alone would leave the GPU idle: the rule of effkern/triton/gemm.py's split_k_count, so every
// backend splits alike.  Plain C++ (EK_HD): the host checks run it too.
#pragma once

#include <stdint.h>

#include "kernels/common/host_device.h"

namespace effkern {

constexpr int kMaxSplitK = 8;

struct SplitK {
  int split_k;          // K ranges (grid.z); > 1: partials summed by a second kernel
  int steps_per_split;  // K steps per range; no range is empty
};

// Enough blocks to fill the SMs when the tiles alone fill less than half of them, at most
// kMaxSplitK ranges, at least one K step per range.
EK_HD SplitK split_k_plan(int64_t tiles, int steps, int sms) {
  int split = 1;
  if (tiles < sms / 2 && steps >= 2) {
    const int64_t want = (sms + tiles - 1) / tiles;
    split = static_cast<int>(want < kMaxSplitK ? want : kMaxSplitK);
    if (split > steps) split = steps;
  }
  SplitK s;
  s.steps_per_split = (steps + split - 1) / split;
  s.split_k = steps == 0 ? 1 : (steps + s.steps_per_split - 1) / s.steps_per_split;
  return s;
}

}  // namespace effkern
