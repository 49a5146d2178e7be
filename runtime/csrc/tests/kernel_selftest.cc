// Standalone check of every compiled SIMD path against the scalar path (no ONNX Runtime needed), so a
// cross-built aarch64 binary can be run under qemu-user:  kernel_selftest  -> "ok" and exit 0.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

using namespace mopeq;

static int check(const char* name, QGemmFn fn, int bits, int rows, int K, int g, int n, std::mt19937& rng) {
  const int nb = static_cast<int>(num_blocks(K)), G = static_cast<int>(num_groups(K, g)), ld = nb * kBlock;
  std::vector<uint32_t> codes(static_cast<size_t>(rows) * nb * bits);
  for (auto& w : codes) w = rng();
  std::vector<uint16_t> scales(static_cast<size_t>(rows) * G, 0x2000);  // 2^-7
  std::vector<uint8_t> zeros(scales.size());
  for (auto& z : zeros) z = rng() % (1u << bits);
  std::vector<float> x(static_cast<size_t>(n) * ld, 0.f), xs(static_cast<size_t>(n) * G, 0.f);
  std::normal_distribution<float> nd;
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < K; ++c) xs[t * G + c / g] += (x[static_cast<size_t>(t) * ld + c] = nd(rng));
  // Padding codes in the last block must be 0 per FORMAT.md; random words put garbage there, but x is 0.
  const QMatrix w{codes.data(), scales.data(), zeros.data(), bits, rows, K, g};
  const Acts a{x.data(), xs.data(), nullptr, n, ld, G};
  std::vector<float> want(static_cast<size_t>(n) * rows), got(want.size());
  qgemm_scalar(w, a, 0, rows, want.data(), rows);
  fn(w, a, 0, rows, got.data(), rows);
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) {  // plain ifs: fmax here crashes aarch64 GCC 12 at -O3
    const double d = std::fabs(got[i] - want[i]), m = std::fabs(want[i]);
    if (d > err) err = d;
    if (m > scale) scale = m;
  }
  const bool ok = err <= 1e-5 * scale;
  if (!ok) std::printf("FAIL %s bits=%d rows=%d K=%d g=%d n=%d err=%g scale=%g\n", name, bits, rows, K, g, n, err, scale);
  return ok ? 0 : 1;
}

int main() {
  const char *name = nullptr, *error = nullptr;
  const QGemmFn fn = select_qgemm(&name, &error);
  if (!fn) { std::printf("%s\n", error); return 2; }
  std::mt19937 rng(1);
  int failures = 0;
  for (int bits : kSupportedBits)
    for (int K : {32, 100, 160, 192, 2048})
      for (int g : {32, 64, 128})
        for (int n : {1, 3, 4, 9}) failures += check(name, fn, bits, 7, K, g, n, rng);
  std::printf("%s: %s\n", name, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
