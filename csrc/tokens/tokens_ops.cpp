// Host side of the sparse token gather/scatter ops, through PyTorch's stable ABI.
//
// The CUDA backend of effkern.ops.tokens' gather_rows / scatter_rows (the torch
// backend there is the reference): contiguous inputs, CUDA implementation only.
// Their schemas: the registration block at the end of this file.  The device
// code is in kernels/tokens/.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <vector>

#include "csrc/common/checks.h"
#include "csrc/common/cuda_stream.h"
#include "csrc/common/dtypes.h"
#include "csrc/common/registration.h"
#include "kernels/tokens/tokens_launch.h"

namespace effkern {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace kt = effkern::tokens;

// x: a contiguous 3-D [B, N, C] CUDA tensor of float16, bfloat16 or float32.
FloatType check_x(const Tensor& x, const char* op) {
  STD_TORCH_CHECK(x.is_cuda(), op, ": 'x' must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 3, op, ": 'x' must be 3-D [B, N, C], got ", x.dim(), " dims");
  const ScalarType t = x.scalar_type();
  STD_TORCH_CHECK(is_kernel_float(t), op, ": 'x' must be float16, bfloat16 or float32, got ",
                  dtype_name(t));
  STD_TORCH_CHECK(x.is_contiguous(), op, ": 'x' must be contiguous");
  return float_type(t);
}

int64_t element_bytes(FloatType t) { return t == FloatType::F32 ? 4 : 2; }

// t: a contiguous 2-D [B, cols] tensor on x's device (cols < 0: any number of columns,
// else `cols_desc` says where cols comes from).
void check_index_2d(const Tensor& t, const char* name, const char* shape, int64_t B, int64_t cols,
                    const char* cols_desc, const Tensor& x, const char* op) {
  check_same_device(t, name, x, "x", op);
  STD_TORCH_CHECK(t.dim() == 2, op, ": '", name, "' must be 2-D ", shape, ", got ", t.dim(),
                  " dims");
  STD_TORCH_CHECK(t.size(0) == B, op, ": '", name, "' must be ", shape, " with B = x.size(0) = ",
                  B, ", got ", t.size(0), " rows");
  STD_TORCH_CHECK(cols < 0 || t.size(1) == cols, op, ": '", name, "' must be ", shape, " with ",
                  cols_desc, " = ", cols, ", got ", t.size(1), " columns");
  STD_TORCH_CHECK(t.is_contiguous(), op, ": '", name, "' must be contiguous");
}

Tensor cuda_token_gather(const Tensor& x, const Tensor& idx) {
  const char* op = "effkern::cuda_token_gather";
  const FloatType type = check_x(x, op);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_index_2d(idx, "idx", "[B, K]", B, -1, "", x, op);
  const ScalarType it = idx.scalar_type();
  STD_TORCH_CHECK(it == ScalarType::Long || it == ScalarType::Int, op,
                  ": 'idx' must be int64 or int32, got ", dtype_name(it));
  const int64_t K = idx.size(1);
  const std::vector<int64_t> sizes{B, K, C};
  Tensor out = torch::stable::new_empty(x, sizes);
  // N == 0 with K > 0 still launches: every index is out of range, every row zero.
  if (B == 0 || K == 0 || C == 0) return out;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, kt::launch_token_gather(
                       x.const_data_ptr(), idx.const_data_ptr(),
                       it == ScalarType::Long ? IndexType::I64 : IndexType::I32,
                       out.mutable_data_ptr(), B, N, K, C * element_bytes(type),
                       current_cuda_stream(x.get_device_index())));
  return out;
}

Tensor cuda_token_scatter(const Tensor& x, const Tensor& y, const Tensor& order,
                          const Tensor& starts, bool add) {
  const char* op = "effkern::cuda_token_scatter";
  const FloatType type = check_x(x, op);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_same_device(y, "y", x, "x", op);
  STD_TORCH_CHECK(y.dim() == 3, op, ": 'y' must be 3-D [B, K, C], got ", y.dim(), " dims");
  STD_TORCH_CHECK(y.size(0) == B && y.size(2) == C, op,
                  ": 'y' must be [B, K, C] with B = x.size(0) = ", B, " and C = x.size(2) = ", C,
                  ", got [", y.size(0), ", ", y.size(1), ", ", y.size(2), "]");
  STD_TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": 'y' must have the dtype of 'x' (",
                  dtype_name(x.scalar_type()), "), got ", dtype_name(y.scalar_type()));
  STD_TORCH_CHECK(y.is_contiguous(), op, ": 'y' must be contiguous");
  const int64_t K = y.size(1);
  check_index_2d(order, "order", "[B, K]", B, K, "K = y.size(1)", x, op);
  STD_TORCH_CHECK(order.scalar_type() == ScalarType::Long, op, ": 'order' must be int64, got ",
                  dtype_name(order.scalar_type()));
  check_index_2d(starts, "starts", "[B, N + 1]", B, N + 1, "N + 1 = x.size(1) + 1", x, op);
  STD_TORCH_CHECK(starts.scalar_type() == ScalarType::Long, op, ": 'starts' must be int64, got ",
                  dtype_name(starts.scalar_type()));
  const std::vector<int64_t> sizes{B, N, C};
  Tensor out = torch::stable::new_empty(x, sizes);
  // K == 0 still launches: out is a copy of x.
  if (B == 0 || N == 0 || C == 0) return out;
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_launch(op, kt::launch_token_scatter(
                       x.const_data_ptr(), y.const_data_ptr(),
                       static_cast<const int64_t*>(order.const_data_ptr()),
                       static_cast<const int64_t*>(starts.const_data_ptr()), type, add,
                       out.mutable_data_ptr(), B, N, K, C,
                       current_cuda_stream(x.get_device_index())));
  return out;
}

}  // namespace
}  // namespace effkern

// The family's registration block, the only place its schemas are written (csrc/common/
// registration.h).  FRAGMENT: the Python side and the other families define more "effkern" ops.
STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) {
  effkern::def_op(m, "cuda_token_gather(Tensor x, Tensor idx) -> Tensor");
  effkern::def_op(m, "cuda_token_scatter(Tensor x, Tensor y, Tensor order, Tensor starts, bool add) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  effkern::impl_op(m, "cuda_token_gather", TORCH_BOX(&effkern::cuda_token_gather));
  effkern::impl_op(m, "cuda_token_scatter", TORCH_BOX(&effkern::cuda_token_scatter));
}
