// Run-time ISA choice (CPU features, or forced) and the threading hook.
#include <atomic>

#include "detail.h"

namespace ovsw::core {

namespace {
std::atomic<int> g_forced_isa{-1};
std::atomic<ParallelFor> g_parallel_for{nullptr};

int detect() {
  int mask = 1 << kPortable;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) mask |= 1 << kAvx2;
#if defined(OVSW_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    mask |= 1 << kAvx512;
#endif
#endif
#if defined(__aarch64__)
  mask |= 1 << kNeon;  // Advanced SIMD is mandatory on AArch64
#endif
  return mask;
}
}  // namespace

int supported_isas() {
  static const int mask = detect();
  return mask;
}

int current_isa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
  const int mask = supported_isas();
  for (int isa : {kAvx512, kNeon, kAvx2}) {
    if (mask >> isa & 1) return isa;
  }
  return kPortable;
}

bool force_isa(int isa) {
  if (isa != -1 && !(isa >= 0 && isa <= kNeon && (supported_isas() >> isa & 1))) return false;
  g_forced_isa.store(isa, std::memory_order_relaxed);
  return true;
}

const char* isa_name(int isa) {
  switch (isa) {
    case kPortable: return "portable";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    case kNeon: return "neon";
    default: return "unknown";
  }
}

void set_parallel_for(ParallelFor fn) { g_parallel_for.store(fn); }

namespace detail {
ParallelFor parallel_hook() { return g_parallel_for.load(std::memory_order_relaxed); }
}  // namespace detail

}  // namespace ovsw::core
