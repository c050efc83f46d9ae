// The SM count of a device (the split-K plans' input), read once per device.  Plain C++
// interface; defined in sm_count.cu.
#pragma once

namespace effkern {

// Multiprocessors of CUDA device `device` (1 if it cannot be read).
int sm_count(int device);

}  // namespace effkern
