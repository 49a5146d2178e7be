// Integer-path reference: activation quantization (shared by every integer path) and the scalar int8
// kernel, which decodes one code at a time with mopeq::code_at and sums exact integer dot products per block.
#include <cmath>

#include "kernels.h"

namespace mopeq {

namespace {
// order_value as tables: the per-token permutation is a plain gather (computing the order per value cost more
// than quantizing it: 53 -> 25 us per decode step of an OLMoE-sized layer, x plus 8 rows of h).
struct OrderTables {
  uint8_t index[kNumOrders][kBlock];
};
constexpr OrderTables order_tables() {
  OrderTables t{};
  for (int o = 0; o < kNumOrders; ++o)
    for (int p = 0; p < kBlock; ++p) t.index[o][p] = static_cast<uint8_t>(order_value(o, p));
  return t;
}
constexpr OrderTables kOrders = order_tables();
}  // namespace

void quantize_acts(const float* x, int k, int group_size, int8_t* q, float* d, float* gsum) {
  const int nb = static_cast<int>(num_blocks(k));
  const int groups = static_cast<int>(num_groups(k, group_size)), per_group = group_size / kBlock;
  for (int g = 0; g < groups; ++g) gsum[g] = 0.f;
  for (int b = 0; b < nb; ++b) {
    float v[kBlock], amax = 0.f;
    bool finite = true;
    for (int i = 0; i < kBlock; ++i) {
      const int c = b * kBlock + i;
      v[i] = c < k ? x[c] : 0.f;
      const float m = std::fabs(v[i]);
      finite = finite && m <= 3.4e38f;  // false for inf and NaN
      amax = m > amax ? m : amax;
    }
    // A non-finite input makes the block's scale NaN, so the output is NaN as on the float path.
    d[b] = finite ? amax / 127.f : std::nanf("");
    const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
    int8_t qb[kBlock];
    int sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      // round half to even as rint does (|v * inv| <= 127.x), without a libm call: adding and removing
      // 1.5 * 2^23 leaves the integer the FPU's default rounding chose
      float r = (v[i] * inv + 12582912.f) - 12582912.f;
      r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
      qb[i] = static_cast<int8_t>(r);
      sum += qb[i];
    }
    gsum[b / per_group] += d[b] * static_cast<float>(sum);
    for (int o = 0; o < kNumOrders; ++o) {
      int8_t* qo = q + (static_cast<size_t>(o) * nb + b) * kBlock;
      for (int p = 0; p < kBlock; ++p) qo[p] = qb[kOrders.index[o][p]];
    }
  }
}

void qgemm_i8_scalar(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  const int G = w.groups(), per_group = w.group_size / kBlock, nb = w.nb();
  for (int r = r0; r < r1; ++r) {
    for (int t = 0; t < a.n; ++t) {
      const int8_t* q = a.codes(t, kOrderNatural);
      const float *d = a.scales(t), *gs = a.sums(t);
      float total = 0.f;
      for (int g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int b = g * per_group; b < nb && b < (g + 1) * per_group; ++b) {
          const uint32_t* blk = w.block(r, b);
          int32_t dot = 0;
          for (int i = 0; i < kBlock; ++i)
            dot += static_cast<int32_t>(code_at(blk, w.bits, i, kTileRows)) * q[b * kBlock + i];
          acc += d[b] * static_cast<float>(dot);
        }
        total += w.scale(r, g) * (acc - static_cast<float>(w.zero(r, g)) * gs[g]);
      }
      y[static_cast<size_t>(t) * ldy + r] = total;
    }
  }
}

}  // namespace mopeq
