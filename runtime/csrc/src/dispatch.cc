// Run-time kernel choice: MOPEQ_KERNEL forces a path (tests, benchmarks); "auto" takes the best the CPU has.
// Read on every call so a test can switch paths inside one process.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace mopeq {

namespace {
struct Path {
  const char* name;
  QGemmFn fn;
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
// __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

// Best first: "auto" takes the first supported entry.
const Path kPaths[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {"avx512", qgemm_avx512, has_avx512},
    {"avx2", qgemm_avx2, has_avx2},
#endif
#if defined(__aarch64__)
    {"neon", qgemm_neon, always},
#endif
    {"scalar", qgemm_scalar, always},
};
}  // namespace

QGemmFn select_qgemm(const char** name, const char** error) {
  const char* want = std::getenv("MOPEQ_KERNEL");
  const bool any = want == nullptr || *want == '\0' || std::strcmp(want, "auto") == 0;
  for (const Path& p : kPaths) {
    if (!any && std::strcmp(want, p.name) != 0) continue;
    if (!p.supported()) {
      if (any) continue;
      *error = "MOPEQ_KERNEL forces a SIMD path this CPU does not support; unset it or use auto";
      return nullptr;
    }
    *name = p.name;
    return p.fn;
  }
  *error = "MOPEQ_KERNEL must be one of auto, scalar, avx2, avx512 (x86-64) or neon (aarch64)";
  return nullptr;
}

}  // namespace mopeq
