#include <cuda_runtime.h>

#include "kernels/common/sm_count.h"

namespace effkern {

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not read yet (a benign race: every writer writes the same)
  if (device >= 0 && device < kMaxDevices && cached[device] > 0) return cached[device];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) {
    cudaGetLastError();  // clear it: the caller's launch check must not see it
    return 1;
  }
  if (device >= 0 && device < kMaxDevices) cached[device] = sms;
  return sms;
}

}  // namespace effkern
