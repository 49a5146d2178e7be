// Reference path: decodes one code at a time with mopeq::code_at. Also the fallback on unknown CPUs.
#include "kernels.h"

namespace mopeq {

static float row_dot(const QMatrix& w, int r, const float* x, const float* xsum) {
  const uint32_t* row = w.codes + static_cast<size_t>(r) * w.nb() * w.bits;
  const int G = w.groups(), blocks_per_group = w.group_size / kBlock, nb = w.nb();
  float total = 0.f, corr = 0.f;
  for (int g = 0; g < G; ++g) {
    float acc = 0.f;
    const int b_end = g * blocks_per_group + blocks_per_group < nb ? g * blocks_per_group + blocks_per_group : nb;
    for (int b = g * blocks_per_group; b < b_end; ++b)
      for (int i = 0; i < kBlock; ++i)
        acc += static_cast<float>(code_at(row + b * w.bits, w.bits, i)) * x[b * kBlock + i];
    const float s = half_to_float(w.scales[static_cast<size_t>(r) * G + g]);
    total += s * acc;
    corr += s * w.zeros[static_cast<size_t>(r) * G + g] * xsum[g];
  }
  return total - corr;
}

void qgemm_scalar(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
  for (int r = r0; r < r1; ++r)
    for (int t = 0; t < a.n; ++t)
      y[static_cast<size_t>(t) * ldy + r] =
          row_dot(w, r, a.x + static_cast<size_t>(a.id(t)) * a.ldx, a.xsum + static_cast<size_t>(a.id(t)) * a.groups);
}

}  // namespace mopeq
