// Host lookups made once, not per launch, shared by every unit of the library (inline variables:
// one instance across the units): at decode sizes the host's time per linear is the pace.
#pragma once
#include <cuda_runtime.h>
#include <cstdlib>

namespace dgq_host {

constexpr int kMaxDevices = 64;

inline bool env_is_zero(const char* name) {
  const char* value = getenv(name);
  return value != nullptr && value[0] == '0';
}

struct LaunchEnv {  // A/B switches for timing (=0 turns one off), read when the library loads
  bool persist_off = env_is_zero("DGQ_PERSIST"), pdl_off = env_is_zero("DGQ_PDL");
};
inline const LaunchEnv g_env;

// Multiprocessors of `device` (< kMaxDevices), looked up once per device.
inline int sm_count(int device) {
  static int counts[kMaxDevices] = {};  // a benign race: every thread stores the same value
  if (counts[device] == 0) cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
  return counts[device];
}

}  // namespace dgq_host
