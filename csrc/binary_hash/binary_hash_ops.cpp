// Host side of the binary-hash attention op, through PyTorch's stable ABI.
//
// The CUDA backend of effkern.ops.binary_hash's binary_attention_fwd (the torch
// backend there is the reference): form 0 ecoformer, 1 shiftadd; v [B, H, N, d]
// float16/bfloat16/float32 with d in {32, 64, 128}; codes int32 [B, H, N,
// ceil(nbits / 32)]; all contiguous, CUDA implementation only.  A float32
// workspace (KV and ksum of pass 1, and its partial sums over token splits) is allocated here.  Its schema: the
// registration block at the end of this file.  The device code is in
// kernels/binary_hash/.
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
#include "kernels/binary_hash/binary_hash_launch.h"
#include "kernels/common/constants.h"

namespace effkern {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace kb = effkern::binary_hash;

void check_codes(const Tensor& c, const char* name, const Tensor& v, int64_t W, int64_t nbits,
                 const char* op) {
  check_same_device(c, name, v, "v", op);
  STD_TORCH_CHECK(c.scalar_type() == ScalarType::Int, op, ": '", name, "' must be int32, got ",
                  dtype_name(c.scalar_type()));
  STD_TORCH_CHECK(c.dim() == 4 && c.size(0) == v.size(0) && c.size(1) == v.size(1) &&
                      c.size(2) == v.size(2) && c.size(3) == W,
                  op, ": '", name, "' must be [B, H, N, ceil(nbits / 32)] = [", v.size(0), ", ",
                  v.size(1), ", ", v.size(2), ", ", W, "] for nbits = ", nbits, ", got ", c.dim(),
                  "-D with last dim ", c.dim() > 0 ? c.size(c.dim() - 1) : 0);
  STD_TORCH_CHECK(c.is_contiguous(), op, ": '", name, "' must be contiguous");
}

Tensor cuda_binary_attention(const Tensor& v, const Tensor& q_codes, const Tensor& k_codes,
                             int64_t nbits, int64_t form) {
  const char* op = "effkern::cuda_binary_attention";
  STD_TORCH_CHECK(v.is_cuda(), op, ": 'v' must be a CUDA tensor");
  STD_TORCH_CHECK(v.dim() == 4, op, ": 'v' must be 4-D [B, H, N, d], got ", v.dim(), " dims");
  const ScalarType t = v.scalar_type();
  STD_TORCH_CHECK(is_kernel_float(t), op, ": 'v' must be float16, bfloat16 or float32, got ",
                  dtype_name(t));
  STD_TORCH_CHECK(v.is_contiguous(), op, ": 'v' must be contiguous");
  STD_TORCH_CHECK(nbits >= 1 && nbits <= 1024, op, ": 'nbits' must be in [1, 1024], got ", nbits);
  STD_TORCH_CHECK(form == 0 || form == 1, op,
                  ": 'form' must be 0 (ecoformer) or 1 (shiftadd), got ", form);
  const int64_t B = v.size(0), H = v.size(1), N = v.size(2), d = v.size(3);
  STD_TORCH_CHECK(kb::supported_head_dim(d), op,
                  ": 'v' head dim d = v.size(3) must be 32, 64 or 128, got ", d);
  const int64_t W = num_words(nbits);
  check_codes(q_codes, "q_codes", v, W, nbits, op);
  check_codes(k_codes, "k_codes", v, W, nbits, op);
  const std::vector<int64_t> sizes{B, H, N, d};
  Tensor out = torch::stable::new_empty(v, sizes);
  const int64_t BH = B * H;
  if (BH == 0 || N == 0) return out;
  const std::vector<int64_t> ws_sizes{kb::binary_attention_workspace_elems(BH, N, nbits, d)};
  Tensor ws = torch::stable::new_empty(v, ws_sizes, ScalarType::Float);
  torch::stable::accelerator::DeviceGuard guard(v.get_device_index());
  const char* err = kb::launch_binary_attention(
      v.const_data_ptr(), static_cast<const int32_t*>(q_codes.const_data_ptr()),
      static_cast<const int32_t*>(k_codes.const_data_ptr()), float_type(t),
      form == 0 ? kb::Form::Ecoformer : kb::Form::ShiftAdd, nbits,
      static_cast<float*>(ws.mutable_data_ptr()), out.mutable_data_ptr(), BH, N, d,
      current_cuda_stream(v.get_device_index()));
  check_launch(op, err);
  return out;
}

}  // namespace
}  // namespace effkern

// The family's registration block, the only place its schema is written (csrc/common/
// registration.h).  FRAGMENT: the Python side and the other families define more "effkern" ops.
STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) {
  effkern::def_op(m, "cuda_binary_attention(Tensor v, Tensor q_codes, Tensor k_codes, int nbits, int form) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  effkern::impl_op(m, "cuda_binary_attention", TORCH_BOX(&effkern::cuda_binary_attention));
}
