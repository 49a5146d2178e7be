// Run-time kernel choice: MOPEQ_KERNEL forces a path (tests, benchmarks); "auto" takes the best the CPU has.
// Read on every call so a test can switch paths inside one process.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace mopeq {

namespace {
struct Path {
  KernelPath kernel;
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
bool has_avx512vnni() {
  return has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("gfni");
}
#endif

// Best first: "auto" takes the first supported entry (integer paths before the float reference path).
const Path kPaths[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {{"i8-avx512vnni", nullptr, qgemm_i8_avx512vnni}, has_avx512vnni},
    {{"i8-avx2", nullptr, qgemm_i8_avx2}, has_avx2},
#endif
#if defined(__aarch64__)
    {{"i8-neon", nullptr, qgemm_i8_neon}, neon_has_dotprod},
#endif
    {{"i8-scalar", nullptr, qgemm_i8_scalar}, always},
    {{"scalar", qgemm_scalar, nullptr}, always},
};
}  // namespace

bool select_kernel(KernelPath* path, const char** error) {
  const char* want = std::getenv("MOPEQ_KERNEL");
  const bool any = want == nullptr || *want == '\0' || std::strcmp(want, "auto") == 0;
  for (const Path& p : kPaths) {
    if (!any && std::strcmp(want, p.kernel.name) != 0) continue;
    if (!p.supported()) {
      if (any) continue;
      *error = "MOPEQ_KERNEL forces a SIMD path this CPU does not support; unset it or use auto";
      return false;
    }
    *path = p.kernel;
    return true;
  }
  *error = "MOPEQ_KERNEL must be one of auto, scalar (exact float activations), i8-scalar, i8-avx2, i8-avx512vnni "
           "(x86-64) or i8-neon (aarch64)";
  return false;
}

}  // namespace mopeq
