// Host side of the shift ops, through PyTorch's stable ABI: the CUDA backend of
// effkern.ops.shift's shift_linear (tensor cores) and deepshift_linear (CUDA cores)
// (their schemas: the registration block at the end of this file).
//
// On the 2-D row matrices effkern/ops/shift.py hands its backends (x [M, K] contiguous, the
// ShiftWeight's codes and base).  The device code is in kernels/shift/, the exact semantics
// (and the torch references the kernels are tested against) in effkern/ops/shift.py.
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
#include "kernels/shift/shift_launch.h"

namespace effkern {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace ks = effkern::shift;

int64_t code_columns(int64_t K, int64_t bits) {
  return bits == 5 ? K : 32 * ((K + ks::kStepK - 1) / ks::kStepK);
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// x [M, K], codes, base and bias of a shift weight; returns N.
int64_t check_shift_args(const char* op, const Tensor& x, const Tensor& codes, const Tensor& base,
                         const std::optional<Tensor>& bias, ScalarType bias_type, int64_t in_features,
                         int64_t bits) {
  STD_TORCH_CHECK(x.is_cuda(), op, ": 'x' must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": 'x' must be a contiguous 2-D [M, K] tensor");
  STD_TORCH_CHECK(bits == 4 || bits == 5, op, ": 'bits' must be 4 or 5, got ", bits);
  const int64_t K = x.size(1);
  STD_TORCH_CHECK(in_features == K, op, ": 'in_features' (", in_features, ") must equal x.size(1) (", K, ")");
  check_same_device(codes, "codes", x, "x", op);
  check_same_device(base, "base", x, "x", op);
  STD_TORCH_CHECK(codes.scalar_type() == ScalarType::Byte && codes.dim() == 2 && codes.is_contiguous(), op,
                  ": 'codes' must be a contiguous 2-D uint8 tensor");
  const int64_t N = codes.size(0);
  STD_TORCH_CHECK(codes.size(1) == code_columns(K, bits), op, ": 'codes' must have ", code_columns(K, bits),
                  " columns for K = ", K, " at bits = ", bits, ", got ", codes.size(1));
  STD_TORCH_CHECK(base.scalar_type() == ScalarType::Int && base.dim() == 1 && base.size(0) == N &&
                      base.is_contiguous(),
                  op, ": 'base' must be a contiguous int32 tensor of size N = ", N);
  if (bias.has_value()) {
    check_same_device(*bias, "bias", x, "x", op);
    STD_TORCH_CHECK(bias->scalar_type() == bias_type && bias->dim() == 1 && bias->size(0) == N &&
                        bias->is_contiguous(),
                    op, ": 'bias' must be a contiguous ", dtype_name(bias_type), " tensor of size N = ", N);
  }
  STD_TORCH_CHECK(N < (int64_t(1) << 30) && K < (int64_t(1) << 30), op, ": N and K must be below 2^30");
  return N;
}

Tensor cuda_shift_linear(const Tensor& x, const Tensor& codes, const Tensor& base,
                         const std::optional<Tensor>& bias, int64_t in_features, int64_t bits) {
  const char* op = "effkern::cuda_shift_linear";
  const ScalarType t = x.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::BFloat16 || t == ScalarType::Half, op,
                  ": 'x' must be bfloat16 or float16 (float32 runs on the Triton backend), got ", dtype_name(t));
  const int64_t N = check_shift_args(op, x, codes, base, bias, t, in_features, bits);
  const int64_t M = x.size(0), K = x.size(1);
  STD_TORCH_CHECK(K % 8 == 0 && (bits == 4 || K % 16 == 0), op,
                  ": K must be a multiple of 8 (16 at bits = 5) for 16-byte copies, got ", K);
  STD_TORCH_CHECK(aligned16(x) && aligned16(codes), op, ": 'x' and 'codes' must be 16-byte aligned");
  const std::vector<int64_t> sizes{M, N};
  Tensor y = torch::stable::new_empty(x, sizes);
  if (M == 0 || N == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const ks::Plan plan = ks::make_plan(M, N, K, sm_count(x.get_device_index()));
  std::optional<Tensor> workspace;
  if (plan.split_k > 1) {
    const std::vector<int64_t> ws_sizes{plan.split_k, M, N};
    workspace = torch::stable::new_empty(x, ws_sizes, ScalarType::Float);
  }
  check_launch(op, ks::launch_shift_linear(
                       x.const_data_ptr(), float_type(t), static_cast<const uint8_t*>(codes.const_data_ptr()),
                       static_cast<const int32_t*>(base.const_data_ptr()),
                       bias.has_value() ? bias->const_data_ptr() : nullptr, y.mutable_data_ptr(),
                       workspace.has_value() ? static_cast<float*>(workspace->mutable_data_ptr()) : nullptr,
                       plan, M, N, K, codes.size(1), static_cast<int>(bits),
                       current_cuda_stream(x.get_device_index())));
  return y;
}

Tensor cuda_deepshift_linear(const Tensor& x, const Tensor& codes, const Tensor& base,
                             const std::optional<Tensor>& bias, int64_t in_features, int64_t bits) {
  const char* op = "effkern::cuda_deepshift_linear";
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Int, op, ": 'x' must be int32 (16.16 fixed point), got ",
                  dtype_name(x.scalar_type()));
  const int64_t N = check_shift_args(op, x, codes, base, bias, ScalarType::Int, in_features, bits);
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<int64_t> sizes{M, N};
  Tensor y = torch::stable::new_empty(x, sizes);
  if (M == 0 || N == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, ks::launch_deepshift_linear(
                       static_cast<const int32_t*>(x.const_data_ptr()),
                       static_cast<const uint8_t*>(codes.const_data_ptr()),
                       static_cast<const int32_t*>(base.const_data_ptr()),
                       bias.has_value() ? static_cast<const int32_t*>(bias->const_data_ptr()) : nullptr,
                       static_cast<int32_t*>(y.mutable_data_ptr()), M, N, K, codes.size(1),
                       static_cast<int>(bits), current_cuda_stream(x.get_device_index())));
  return y;
}

}  // namespace
}  // namespace effkern

// The family's registration block, the only place its schemas are written (csrc/common/
// registration.h).  FRAGMENT: the Python side and the other families define more "effkern" ops.
STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) {
  effkern::def_op(m, "cuda_shift_linear(Tensor x, Tensor codes, Tensor base, Tensor? bias, int in_features, "
                     "int bits) -> Tensor");
  effkern::def_op(m, "cuda_deepshift_linear(Tensor x, Tensor codes, Tensor base, Tensor? bias, "
                     "int in_features, int bits) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  effkern::impl_op(m, "cuda_shift_linear", TORCH_BOX(&effkern::cuda_shift_linear));
  effkern::impl_op(m, "cuda_deepshift_linear", TORCH_BOX(&effkern::cuda_deepshift_linear));
}
