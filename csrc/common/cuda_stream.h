// Current CUDA stream through the stable C shim, without linking libtorch_cuda.
//
// aoti_torch_get_current_cuda_stream lives in libtorch_cuda.so, which a CPU
// build of torch does not have; linking it would make effkern/_C*.so
// unloadable there (CI builds and loads the library on CPU torch).  So the
// symbol is resolved at first use from the already loaded torch libraries.
// (torch >= 2.13 offers Stream::nativeHandle(); we target the 2.10 stable ABI.)
#pragma once

#include <dlfcn.h>
#include <stdint.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/Exception.h>

namespace effkern {

inline void* current_cuda_stream(int32_t device_index) {
  using Fn = AOTITorchError (*)(int32_t, void**);
  static const Fn fn = []() -> Fn {
    const char* name = "aoti_torch_get_current_cuda_stream";
    void* sym = dlsym(RTLD_DEFAULT, name);
    if (sym == nullptr) {
      // torch loads its libraries RTLD_LOCAL: look inside libtorch_cuda itself.
      if (void* h = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(h, name);
    }
    return reinterpret_cast<Fn>(sym);
  }();
  STD_TORCH_CHECK(fn != nullptr,
                  "effkern: aoti_torch_get_current_cuda_stream not found in the loaded torch "
                  "(is this a CUDA build of torch?)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "effkern: could not get the current CUDA stream of device ", device_index);
  return stream;
}

}  // namespace effkern
