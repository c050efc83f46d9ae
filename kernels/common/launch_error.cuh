// Error reporting shared by the kernel launchers of every family.  CUDA only (no torch).
#pragma once

#include <cuda_runtime.h>

namespace effkern {

// The error of the last launch (cudaGetLastError, which also clears it), or
// nullptr when it succeeded: what the launchers return to the host ops.
inline const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace effkern
