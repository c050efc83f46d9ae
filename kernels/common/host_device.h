// Macros for the device code that is also compiled for the host: every helper
// marked EK_HD is __host__ __device__ under nvcc and a plain inline function
// otherwise, so the kernels and their host transcriptions
// (kernels/<family>/host_check.cpp, driven by tests/test_cuda_<family>.py) run
// the exact same code.  Depends on nothing.
#pragma once

#if defined(__CUDACC__)
#define EK_HD __host__ __device__ __forceinline__
#else
#define EK_HD inline
#endif

#if defined(__CUDA_ARCH__)  // device pass only: host compilers do not know the pragma
#define EK_UNROLL _Pragma("unroll")
#else
#define EK_UNROLL
#endif
