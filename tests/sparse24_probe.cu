// The one-warp probe of the sparse tensor-core instruction (tests/test_sparse24_cuda.py builds
// it with nvcc and runs it first on a GPU): one mma.sp m16n8k64 s8 on registers given per lane,
// so that the lane layout of tests/sparse_mma_emulation.py is checked on the hardware itself
// before any kernel built on it.  Not part of the library.
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/sparse24/sparse24_mma.cuh"

namespace {

__global__ void probe_kernel(const uint32_t* a, const uint32_t* b, const int32_t* c, const uint32_t* e, int32_t* d) {
  const int lane = threadIdx.x;
  uint32_t ra[4], rb[4];
  int32_t rc[4];
  for (int i = 0; i < 4; ++i) {
    ra[i] = a[4 * lane + i];
    rb[i] = b[4 * lane + i];
    rc[i] = c[4 * lane + i];
  }
  effkern::sparse24::mma_sp_16864(rc, ra, rb, e[lane]);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = rc[i];
}

}  // namespace

// Device pointers: a, b, c, d [32][4], e [32].  Returns the CUDA error code (0: success).
extern "C" int sparse24_probe(const uint32_t* a, const uint32_t* b, const int32_t* c, const uint32_t* e, int32_t* d) {
  probe_kernel<<<1, 32>>>(a, b, c, e, d);
  const cudaError_t err = cudaDeviceSynchronize();
  return err == cudaSuccess ? static_cast<int>(cudaGetLastError()) : static_cast<int>(err);
}
