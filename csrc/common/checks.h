// Argument and launch checks shared by the host ops of every family
// (csrc/<family>/<family>_ops.cpp).  They raise through STD_TORCH_CHECK, which
// reaches Python as a RuntimeError naming the op and the argument.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

namespace effkern {

// `t` (argument `name`) lives on the CUDA device of `ref` (argument `ref_name`).
inline void check_same_device(const torch::stable::Tensor& t, const char* name,
                              const torch::stable::Tensor& ref, const char* ref_name,
                              const char* op) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == ref.get_device_index(), op, ": '", name,
                  "' must be on the same CUDA device as '", ref_name, "'");
}

// `err` is what a launcher (kernels/<family>/<family>_launch.h) returned: nullptr on success,
// else the CUDA error of the launch or the launcher's reason.
inline void check_launch(const char* op, const char* err) {
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}

}  // namespace effkern
