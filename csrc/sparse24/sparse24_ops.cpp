// Host side of the 2:4-sparse int8 GEMM through PyTorch's stable ABI: the CUDA backend of
// effkern.ops.sparse24's sparse24_int8_linear (its schema: the registration block at the end).
//
// On the row matrices and per-row scales effkern/ops/sparse24.py hands its backends; the
// output dtype and the activation arrive as the codes of kernels/sparse24/sparse24_gemm.cuh
// (OutKind, Activation).  Device code: kernels/sparse24/; the exact semantics and the torch
// reference: effkern/ops/sparse24.py.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <vector>

#include "csrc/common/checks.h"
#include "csrc/common/cuda_stream.h"
#include "csrc/common/dtypes.h"
#include "csrc/common/registration.h"
#include "kernels/common/sm_count.h"
#include "kernels/sparse24/sparse24_launch.h"

namespace effkern {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace k24 = effkern::sparse24;

void check_operand(const char* op, const Tensor& t, const char* name, const Tensor& x, ScalarType type,
                   int64_t rows, int64_t cols) {
  check_same_device(t, name, x, "x", op);
  STD_TORCH_CHECK(t.scalar_type() == type && t.is_contiguous(), op, ": '", name, "' must be a contiguous ",
                  dtype_name(type), " tensor");
  STD_TORCH_CHECK(t.dim() == (cols < 0 ? 1 : 2) && t.size(0) == rows && (cols < 0 || t.size(1) == cols), op,
                  ": '", name, "' has the wrong shape");
}

Tensor cuda_sparse24_int8_linear(const Tensor& x, const Tensor& values, const Tensor& meta, const Tensor& scale,
                                 const std::optional<Tensor>& bias, const Tensor& x_scale,
                                 const std::optional<Tensor>& inv_out, int64_t in_features, int64_t out_kind,
                                 int64_t activation) {
  const char* op = "effkern::cuda_sparse24_int8_linear";
  STD_TORCH_CHECK(x.is_cuda(), op, ": 'x' must be a CUDA tensor");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Char && x.dim() == 2 && x.is_contiguous(), op,
                  ": 'x' must be a contiguous 2-D int8 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  STD_TORCH_CHECK(in_features == K && K % k24::kStepK == 0 && K <= (1 << 17), op,
                  ": K must equal in_features, be a multiple of 64 and at most 2^17, got ", K);
  STD_TORCH_CHECK(out_kind >= 0 && out_kind <= 4 && activation >= 0 && activation <= 2, op,
                  ": bad out_kind ", out_kind, " or activation ", activation);
  check_operand(op, values, "values", x, ScalarType::Char, N, K / 2);
  check_operand(op, meta, "meta", x, ScalarType::Byte, N, K / 8);
  check_operand(op, scale, "scale", x, ScalarType::Float, N, -1);
  check_operand(op, x_scale, "x_scale", x, ScalarType::Float, M, -1);
  const auto kind = static_cast<k24::OutKind>(out_kind);
  if (bias.has_value()) {
    check_operand(op, *bias, "bias", x, kind == k24::OutKind::I32 ? ScalarType::Int : ScalarType::Float, N, -1);
  }
  const bool int8_out = kind == k24::OutKind::I8;
  STD_TORCH_CHECK(inv_out.has_value() == int8_out, op, ": 'inv_out' is given exactly for int8 output");
  if (int8_out) {
    STD_TORCH_CHECK(inv_out->numel() == 1 || inv_out->numel() == N, op, ": 'inv_out' must have 1 or N values");
    check_operand(op, *inv_out, "inv_out", x, ScalarType::Float, inv_out->numel(), -1);
  }
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(values.const_data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(meta.const_data_ptr()) % 8 == 0,
                  op, ": 'x' and 'values' must be 16-byte aligned, 'meta' 8-byte aligned");
  STD_TORCH_CHECK(N < (int64_t(1) << 30), op, ": N must be below 2^30");
  static const ScalarType kOut[] = {ScalarType::Int, ScalarType::BFloat16, ScalarType::Half, ScalarType::Char,
                                    ScalarType::Float};
  const std::vector<int64_t> sizes{M, N};
  Tensor y = torch::stable::new_empty(x, sizes, kOut[out_kind]);
  if (M == 0 || N == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const k24::Epilogue ep{kind,
                         static_cast<k24::Activation>(activation),
                         static_cast<const float*>(x_scale.const_data_ptr()),
                         true,  // one scale per row (the op expands a per-tensor one)
                         static_cast<const float*>(scale.const_data_ptr()),
                         bias.has_value() && kind != k24::OutKind::I32 ? static_cast<const float*>(bias->const_data_ptr())
                                                                       : nullptr,
                         bias.has_value() && kind == k24::OutKind::I32
                             ? static_cast<const int32_t*>(bias->const_data_ptr())
                             : nullptr,
                         int8_out ? static_cast<const float*>(inv_out->const_data_ptr()) : nullptr,
                         int8_out && inv_out->numel() > 1};
  const k24::Plan plan = k24::make_plan(M, N, K, sm_count(x.get_device_index()));
  std::optional<Tensor> workspace;
  if (plan.split_k > 1) {
    const std::vector<int64_t> ws_sizes{plan.split_k, M, N};
    workspace = torch::stable::new_empty(x, ws_sizes, ScalarType::Int);
  }
  check_launch(op, k24::launch_sparse24_int8_linear(
                       static_cast<const int8_t*>(x.const_data_ptr()), static_cast<const int8_t*>(values.const_data_ptr()),
                       static_cast<const uint8_t*>(meta.const_data_ptr()), ep, y.mutable_data_ptr(),
                       workspace.has_value() ? static_cast<int32_t*>(workspace->mutable_data_ptr()) : nullptr, plan, M,
                       N, K, current_cuda_stream(x.get_device_index())));
  return y;
}

}  // namespace
}  // namespace effkern

// The family's registration block, the only place its schema is written (csrc/common/registration.h).
STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) {
  effkern::def_op(m, "cuda_sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor scale, Tensor? bias, "
                     "Tensor x_scale, Tensor? inv_out, int in_features, int out_kind, int activation) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  effkern::impl_op(m, "cuda_sparse24_int8_linear", TORCH_BOX(&effkern::cuda_sparse24_int8_linear));
}
