// The Python name of a tensor dtype, for error messages of the ops' argument checks.
#pragma once

#include <torch/headeronly/core/ScalarType.h>

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

}  // namespace effkern
