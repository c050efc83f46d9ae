// Constants and small formulas the CUDA side shares with the Python side
// (effkern/ops, effkern/triton), defined once for every family.  Host and
// device (EK_HD); no CUDA or torch dependency.
#pragma once

#include <stdint.h>

#include "kernels/common/host_device.h"

namespace effkern {

// t / max(||t||, eps) in the shiftadd form of binary-hash attention
// (effkern.ops.binary_hash.SHIFTADD_EPS).
constexpr float kShiftAddEps = 1e-12f;

// int32 words of a packed binary code of nbits bits (effkern.ops.binary_hash.num_words).
EK_HD int64_t num_words(int64_t nbits) { return (nbits + 31) / 32; }

}  // namespace effkern
