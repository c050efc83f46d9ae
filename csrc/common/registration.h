// How the families register their ops, so that the library itself can say
// which ops it registered and whether each has its CUDA kernel.
//
// Each family has one registration block (csrc/<family>/<family>_ops.cpp), the
// only place its schemas are written:
//
//   STABLE_TORCH_LIBRARY_FRAGMENT(effkern, m) { effkern::def_op(m, "cuda_x(Tensor x) -> Tensor"); }
//   STABLE_TORCH_LIBRARY_IMPL(effkern, CUDA, m) { effkern::impl_op(m, "cuda_x", TORCH_BOX(&cuda_x)); }
//
// def_op / impl_op register with torch and record the op's name; the C function
// effkern_registered_ops() (registration.cpp) returns the records, and
// effkern/_cuda_lib.py decides from them whether the library loaded.
#pragma once

#include <torch/csrc/stable/library.h>

namespace effkern {

// Records that op `name_or_schema` (a schema: the name is the text before '(') was defined
// (implemented == false) or given its CUDA kernel (implemented == true).
void record_registration(const char* name_or_schema, bool implemented);

inline void def_op(torch::stable::detail::StableLibrary& m, const char* schema) {
  m.def(schema);
  record_registration(schema, false);
}

template <typename BoxedFn>
inline void impl_op(torch::stable::detail::StableLibrary& m, const char* name, BoxedFn fn) {
  m.impl(name, fn);
  record_registration(name, true);
}

}  // namespace effkern
