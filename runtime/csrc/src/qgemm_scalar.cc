// The exact float-activation path: decodes a block of codes with mopeq::code_at and takes its float dot product
// with the activations. The reference of the integer paths (MOPEQ_KERNEL=scalar) and of export-parity tests.
#include "kernels.h"

namespace mopeq {

static float row_dot(const QMatrix& w, int r, const float* x, const float* xsum) {
  const int G = w.groups(), per_group = w.group_size / kBlock, nb = w.nb();
  float total = 0.f, corr = 0.f;
  for (int g = 0; g < G; ++g) {
    float acc = 0.f;
    const int b_end = (g + 1) * per_group < nb ? (g + 1) * per_group : nb;
    for (int b = g * per_group; b < b_end; ++b) {
      const uint32_t* blk = w.block(r, b);
      float c[kBlock];
      for (int i = 0; i < kBlock; ++i) c[i] = static_cast<float>(code_at(blk, w.bits, i, kTileRows));
      for (int i = 0; i < kBlock; ++i) acc += c[i] * x[b * kBlock + i];
    }
    const float s = w.scale(r, g);
    total += s * acc;
    corr += s * static_cast<float>(w.zero(r, g)) * xsum[g];
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
