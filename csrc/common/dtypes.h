// The dtypes of the CUDA ops, for every family: the Python name of a torch
// dtype (error messages of the ops' argument checks) and the mapping from
// torch dtypes to the element types the launchers take (kernels/common/dtypes.h).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include "kernels/common/dtypes.h"

namespace effkern {

inline const char* dtype_name(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Bool: return "bool";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    default: return "an unsupported dtype";
  }
}

// float16, bfloat16 and float32: the float types of the row-moving kernels.
inline bool is_kernel_float(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float;
}

// The launcher's FloatType of a dtype for which is_kernel_float() holds.
inline FloatType float_type(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  return t == ScalarType::Half       ? FloatType::F16
         : t == ScalarType::BFloat16 ? FloatType::BF16
                                     : FloatType::F32;
}

}  // namespace effkern
