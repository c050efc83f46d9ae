// The element types the launchers of every family take (kernels/<family>/<family>_launch.h).
//
// Plain C++ (no CUDA, no torch): csrc/ maps torch dtypes onto these
// (csrc/common/dtypes.h) and kernels/ dispatches on them.  The values are
// also the `type` codes of the host checks' C functions
// (kernels/<family>/host_check.cpp), so they never change.
#pragma once

namespace effkern {

enum class FloatType : int { F16 = 0, BF16 = 1, F32 = 2 };
enum class IntType : int { I8 = 0, I16 = 1, I32 = 2 };
enum class IndexType : int { I32 = 0, I64 = 1 };

}  // namespace effkern
