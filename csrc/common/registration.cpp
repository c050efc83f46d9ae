// The ops this library registered, recorded by def_op / impl_op
// (registration.h) while the families' registration blocks run at load time,
// and the C function that reports them: effkern/_cuda_lib.py reads it through
// ctypes to decide whether the library loaded completely.
#include "csrc/common/registration.h"

#include <string>
#include <vector>

namespace effkern {
namespace {

struct Records {
  std::vector<std::string> defined, implemented;
};

Records& records() {  // constructed on first use: registration runs during static initialisation
  static Records r;
  return r;
}

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) {
    if (!s.empty()) s += ',';
    s += n;
  }
  return s;
}

}  // namespace

void record_registration(const char* name_or_schema, bool implemented) {
  std::string name(name_or_schema);
  name = name.substr(0, name.find('('));
  (implemented ? records().implemented : records().defined).push_back(name);
}

}  // namespace effkern

// "defined=<op>,<op>,...\nimplemented=<op>,...\n": the ops whose schema the library defined
// and those it gave a CUDA kernel, in registration order (names without the "effkern::").
extern "C" __attribute__((visibility("default"))) const char* effkern_registered_ops() {
  static std::string text;
  text = "defined=" + effkern::join(effkern::records().defined) + "\nimplemented=" +
         effkern::join(effkern::records().implemented) + "\n";
  return text.c_str();
}
