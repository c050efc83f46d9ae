// Host side of the integer (I-ViT) ops, through PyTorch's stable ABI: the
// CUDA backend of effkern.ops.integer's int_softmax, int_gelu and int_layernorm
// (their schemas: the registration block at the end of this file).
//
// Row-wise over a contiguous 2-D [rows, L] input; CUDA implementation only.
// The device code is in kernels/integer/, the exact semantics (and the torch
// reference the kernels are tested against) in effkern/ops/integer.py.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <limits>
#include <vector>

#include "csrc/common/checks.h"
#include "csrc/common/cuda_stream.h"
#include "csrc/common/dtypes.h"
#include "csrc/common/registration.h"
#include "kernels/integer/integer_launch.h"

namespace effkern {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace ki = effkern::integer;

// x must be a contiguous 2-D CUDA tensor of int8/int16 (int32 if allow_i32).
IntType check_rows_input(const Tensor& x, const char* op, bool allow_i32) {
  STD_TORCH_CHECK(x.is_cuda(), op, ": 'x' must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 2, op, ": 'x' must be 2-D [rows, L], got ", x.dim(), " dims");
  STD_TORCH_CHECK(x.is_contiguous(), op, ": 'x' must be contiguous");
  STD_TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), op,
                  ": 'x' has too many rows (", x.size(0), " > 2^31 - 1)");
  const ScalarType t = x.scalar_type();
  if (t == ScalarType::Char) return IntType::I8;
  if (t == ScalarType::Short) return IntType::I16;
  if (t == ScalarType::Int && allow_i32) return IntType::I32;
  STD_TORCH_CHECK(false, op, ": 'x' must be ", allow_i32 ? "int8, int16 or int32" : "int8 or int16",
                  ", got ", dtype_name(t));
  return IntType::I8;  // unreachable
}

// n <= 31 keeps every per-element shift (n - q, in [0, n]) below 32, where the
// shift-exponential is exact (GELU's once-per-row e(-max) may shift further
// and is then 2^31, see integer_math.cuh); |x0| <= 2^30 keeps (r - 2*x0) <= 2^31,
// so (r - 2*x0) << 31 stays inside int64 (effkern.ops.integer.MAX_ABS_X0).
void check_shift_exp_args(const char* op, int64_t x0, int64_t n) {
  STD_TORCH_CHECK(x0 <= -1 && x0 >= -((int64_t)1 << 30), op,
                  ": 'x0' must be in [-2^30, -1], got ", x0);
  STD_TORCH_CHECK(n >= 0 && n <= 31, op, ": 'n' must be in [0, 31], got ", n);
}

Tensor cuda_int_softmax(const Tensor& x, int64_t x0, int64_t n, int64_t out_bits) {
  const char* op = "effkern::cuda_int_softmax";
  const IntType in_type = check_rows_input(x, op, /*allow_i32=*/true);
  STD_TORCH_CHECK(out_bits == 8 || out_bits == 16, op, ": 'out_bits' must be 8 or 16, got ",
                  out_bits);
  check_shift_exp_args(op, x0, n);
  // The kernel is 32-bit: every exp term (at most -x0 * 2^n) must fit int32, as
  // effkern.ops.integer.int_softmax also requires of its scales.
  STD_TORCH_CHECK((-x0) << n <= (int64_t)std::numeric_limits<int32_t>::max(), op,
                  ": -x0 * 2^n must be at most 2^31 - 1, got x0 = ", x0, ", n = ", n);
  const int64_t rows = x.size(0), L = x.size(1);
  const std::vector<int64_t> sizes{rows, L};
  Tensor y = torch::stable::new_empty(x, sizes, out_bits == 8 ? ScalarType::Char : ScalarType::Short);
  if (rows == 0 || L == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, ki::launch_int_softmax(x.const_data_ptr(), in_type, y.mutable_data_ptr(), rows,
                                          L, x0, static_cast<int>(n), static_cast<int>(out_bits),
                                          current_cuda_stream(x.get_device_index())));
  return y;
}

Tensor cuda_int_gelu(const Tensor& x, int64_t x0, int64_t n, int64_t out_bits) {
  const char* op = "effkern::cuda_int_gelu";
  const IntType in_type = check_rows_input(x, op, /*allow_i32=*/false);
  STD_TORCH_CHECK(out_bits >= 2 && out_bits <= 16, op, ": 'out_bits' must be in [2, 16], got ",
                  out_bits);
  check_shift_exp_args(op, x0, n);
  const int64_t rows = x.size(0), L = x.size(1);
  const std::vector<int64_t> sizes{rows, L};
  Tensor y = torch::stable::new_empty(x, sizes, ScalarType::Int);
  if (rows == 0 || L == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, ki::launch_int_gelu(x.const_data_ptr(), in_type,
                                       static_cast<int32_t*>(y.mutable_data_ptr()), rows, L, x0,
                                       static_cast<int>(n), static_cast<int>(out_bits),
                                       current_cuda_stream(x.get_device_index())));
  return y;
}

Tensor cuda_int_layernorm(const Tensor& x, const Tensor& bias_int, int64_t iters) {
  const char* op = "effkern::cuda_int_layernorm";
  const IntType in_type = check_rows_input(x, op, /*allow_i32=*/false);
  const int64_t rows = x.size(0), C = x.size(1);
  check_same_device(bias_int, "bias_int", x, "x", op);
  STD_TORCH_CHECK(bias_int.scalar_type() == ScalarType::Int, op, ": 'bias_int' must be int32, got ",
                  dtype_name(bias_int.scalar_type()));
  STD_TORCH_CHECK(bias_int.dim() == 1 && bias_int.size(0) == C, op,
                  ": 'bias_int' must be 1-D of size C = x.size(1) = ", C);
  STD_TORCH_CHECK(bias_int.is_contiguous(), op, ": 'bias_int' must be contiguous");
  STD_TORCH_CHECK(iters >= 0 && iters <= 16, op, ": 'iters' must be in [0, 16], got ", iters);
  const std::vector<int64_t> sizes{rows, C};
  Tensor y = torch::stable::new_empty(x, sizes, ScalarType::Int);
  if (rows == 0 || C == 0) return y;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, ki::launch_int_layernorm(
                       x.const_data_ptr(), in_type,
                       static_cast<const int32_t*>(bias_int.const_data_ptr()),
                       static_cast<int32_t*>(y.mutable_data_ptr()), rows, C,
                       static_cast<int>(iters), current_cuda_stream(x.get_device_index())));
  return y;
}

}  // namespace
}  // namespace effkern

// The family's registration block, the only place its schemas are written (csrc/common/
// registration.h).  FRAGMENT: the Python side and the other families define more "effkern" ops.
STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) {
  effkern::def_op(m, "cuda_int_softmax(Tensor x, int x0, int n, int out_bits) -> Tensor");
  effkern::def_op(m, "cuda_int_gelu(Tensor x, int x0, int n, int out_bits) -> Tensor");
  effkern::def_op(m, "cuda_int_layernorm(Tensor x, Tensor bias_int, int iters) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  effkern::impl_op(m, "cuda_int_softmax", TORCH_BOX(&effkern::cuda_int_softmax));
  effkern::impl_op(m, "cuda_int_gelu", TORCH_BOX(&effkern::cuda_int_gelu));
  effkern::impl_op(m, "cuda_int_layernorm", TORCH_BOX(&effkern::cuda_int_layernorm));
}
