// Standalone check of the selected kernel path (MOPEQ_KERNEL, default auto) against its reference (no ONNX
// Runtime needed), so a cross-built aarch64 binary can be run under qemu-user:  kernel_selftest -> "ok", exit 0.
// Inputs are fresh random ones each run (the seed is printed; MOPEQ_SEED=N repeats a run).
// The float path is checked against a double-precision dequantize-then-multiply written here from FORMAT.md;
// integer paths against the scalar integer path on the same quantized activations, and the scalar integer path
// against the float one within the int8 error.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels.h"

using namespace mopeq;

static double max_abs(const std::vector<float>& v) {
  double m = 1e-30;
  for (float x : v) m = std::fabs(x) > m ? std::fabs(x) : m;  // plain ifs: fmax crashes aarch64 GCC 12 at -O3
  return m;
}

static double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fabs(a[i] - b[i]) > m ? std::fabs(a[i] - b[i]) : m;
  return m;
}

static double rel_rms(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
  return std::sqrt(num / den);
}

// y[t, r] from FORMAT.md alone: row r's word j at [(r / 16) * NB * b + j] * 16 + r % 16, (q - z) * s, in double.
static void reference(const std::vector<uint32_t>& codes, const std::vector<uint16_t>& scales,
                      const std::vector<uint8_t>& zeros, int bits, int rows, int K, int g, const std::vector<float>& x,
                      int n, int ld, std::vector<float>& y) {
  const int nb = static_cast<int>(num_blocks(K)), G = static_cast<int>(num_groups(K, g)), W = nb * bits;
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < n; ++t) {
      double acc = 0;
      for (int c = 0; c < K; ++c) {
        uint32_t words[8];
        for (int j = 0; j < bits; ++j) words[j] = codes[(static_cast<size_t>(r / 16) * W + (c / 32) * bits + j) * 16 + r % 16];
        const size_t gi = (static_cast<size_t>(r / 16) * G + c / g) * 16 + r % 16;
        const double q = code_at(words, bits, c % 32), z = zeros[gi], s = half_to_float(scales[gi]);
        acc += (q - z) * s * x[static_cast<size_t>(t) * ld + c];
      }
      y[static_cast<size_t>(t) * rows + r] = static_cast<float>(acc);
    }
}

static int check(const KernelPath& path, int bits, int rows, int K, int g, int n, std::mt19937& rng) {
  const int nb = static_cast<int>(num_blocks(K)), G = static_cast<int>(num_groups(K, g)), ld = nb * kBlock;
  std::vector<uint32_t> codes(static_cast<size_t>(rows) * nb * bits);
  for (auto& w : codes) w = rng();
  std::vector<uint16_t> scales(static_cast<size_t>(rows) * G);
  for (auto& s : scales) s = static_cast<uint16_t>(0x1C00 + rng() % 0x0C00);  // 2^-8 .. 2^-5, every row its own
  std::vector<uint8_t> zeros(scales.size());
  for (auto& z : zeros) z = rng() % (1u << bits);
  std::vector<float> x(static_cast<size_t>(n) * ld, 0.f), xs(static_cast<size_t>(n) * G, 0.f);
  std::normal_distribution<float> nd;
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < K; ++c) xs[t * G + c / g] += (x[static_cast<size_t>(t) * ld + c] = nd(rng));
  // Padding codes in the last block must be 0 per FORMAT.md; random words put garbage there, but x is 0.
  const QMatrix w{codes.data(), scales.data(), zeros.data(), bits, rows, K, g};
  const Acts a{x.data(), xs.data(), nullptr, n, ld, G};
  std::vector<float> want(static_cast<size_t>(n) * rows), got(want.size()), exact(want.size());
  qgemm_scalar(w, a, 0, rows, want.data(), rows);
  reference(codes, scales, zeros, bits, rows, K, g, x, n, ld, exact);
  if (max_diff(want, exact) > 1e-5 * max_abs(exact)) {
    std::printf("FAIL scalar vs reference bits=%d rows=%d K=%d g=%d n=%d\n", bits, rows, K, g, n);
    return 1;
  }
  double err, tol;
  if (path.f32) {
    path.f32(w, a, 0, rows, got.data(), rows);
    err = max_diff(got, exact), tol = 1e-5 * max_abs(exact);
  } else {
    QActs qa{nullptr, nullptr, nullptr, nullptr, n, nb, G};
    std::vector<int8_t> q(n * qa.ldq());
    std::vector<float> d(static_cast<size_t>(n) * nb), gs(static_cast<size_t>(n) * G);
    for (int t = 0; t < n; ++t)
      quantize_acts(&x[static_cast<size_t>(t) * ld], K, g, &q[t * qa.ldq()], &d[static_cast<size_t>(t) * nb], &gs[t * G]);
    qa.q = q.data(), qa.d = d.data(), qa.gsum = gs.data();
    std::vector<float> ref(want.size());
    qgemm_i8_scalar(w, qa, 0, rows, ref.data(), rows);
    const double quant_err = rel_rms(ref, want);  // int8 activations: about 1 % (test_kernel_cpu.py bounds it)
    path.i8(w, qa, 0, rows, got.data(), rows);
    err = max_diff(got, ref), tol = 1e-5 * max_abs(ref);
    if (quant_err > 0.05) {
      std::printf("FAIL i8-scalar vs float bits=%d K=%d g=%d n=%d err=%g\n", bits, K, g, n, quant_err);
      return 1;
    }
  }
  const bool ok = err <= tol;
  if (!ok) std::printf("FAIL %s bits=%d rows=%d K=%d g=%d n=%d err=%g tol=%g\n", path.name, bits, rows, K, g, n, err, tol);
  return ok ? 0 : 1;
}

int main() {
  KernelPath path{};
  const char* error = nullptr;
  if (!select_kernel(&path, &error)) { std::printf("%s\n", error); return 2; }
  const char* fixed = std::getenv("MOPEQ_SEED");
  const unsigned seed = fixed ? static_cast<unsigned>(std::strtoul(fixed, nullptr, 10)) : std::random_device{}();
  std::mt19937 rng(seed);
  int failures = 0;
  for (int bits : kSupportedBits)
    for (int K : {32, 100, 160, 192, 2048})
      for (int g : {32, 64, 128})
        for (int rows : {16, 48})
          for (int n : {1, 2, 3, 4, 7}) failures += check(path, bits, rows, K, g, n, rng);
  std::printf("%s: %s (seed %u)\n", path.name, failures ? "FAILED" : "ok", seed);
  return failures ? 1 : 0;
}
