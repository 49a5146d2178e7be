// NEON path (aarch64, e.g. Jetson Orin): 4 codes per register. NEON shifts left by a signed per-lane
// amount, so a right shift is a negative shift vector.
#if defined(__aarch64__)
#include <arm_neon.h>

#include <algorithm>

#include "kernels.h"

namespace mopeq {
namespace {

// Codes 4*c .. 4*c+3 of a field plane of width W (2, 4 or 8 bits per code) starting at word 0.
template <int W>
inline uint32x4_t plane4(const uint32_t* words, int c) {
  constexpr int per_word = 32 / W;
  const int first = 4 * c;
  const int32_t base = -W * (first % per_word);
  const int32x4_t shift = {base, base - W, base - 2 * W, base - 3 * W};
  return vandq_u32(vshlq_u32(vdupq_n_u32(words[first / per_word]), shift), vdupq_n_u32((1u << W) - 1u));
}

template <int B>
inline float32x4_t decode4(const uint32_t* blk, int c) {
  uint32x4_t q;
  if (B == 3) {
    const int32_t base = -4 * c;
    const int32x4_t shift = {base, base - 1, base - 2, base - 3};
    const uint32x4_t hi = vandq_u32(vshlq_u32(vdupq_n_u32(blk[2]), shift), vdupq_n_u32(0b1u));
    q = vorrq_u32(plane4<2>(blk, c), vshlq_n_u32(hi, 2));
  } else {
    q = plane4<B>(blk, c);
  }
  return vcvtq_f32_u32(q);
}

template <int B, int NT>
void row_tile(const QMatrix& w, int r, const Acts& a, int t0, float* y, int ldy) {
  const uint32_t* row = w.codes + static_cast<size_t>(r) * w.nb() * B;
  const int G = w.groups(), per_group = w.group_size / kBlock, nb = w.nb();
  const float* x[NT];
  const float* xs[NT];
  float32x4_t total[NT];
  float corr[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.x + static_cast<size_t>(a.id(t0 + t)) * a.ldx;
    xs[t] = a.xsum + static_cast<size_t>(a.id(t0 + t)) * a.groups;
    total[t] = vdupq_n_f32(0.f);
    corr[t] = 0.f;
  }
  for (int g = 0; g < G; ++g) {
    float32x4_t acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = vdupq_n_f32(0.f);
    const int b_end = std::min(nb, (g + 1) * per_group);
    for (int b = g * per_group; b < b_end; ++b)
      for (int c = 0; c < 8; ++c) {
        const float32x4_t q = decode4<B>(row + b * B, c);
        for (int t = 0; t < NT; ++t) acc[t] = vfmaq_f32(acc[t], q, vld1q_f32(x[t] + b * kBlock + 4 * c));
      }
    const size_t gi = static_cast<size_t>(r) * G + g;
    const float s = half_to_float(w.scales[gi]), sz = s * static_cast<float>(w.zeros[gi]);
    for (int t = 0; t < NT; ++t) {
      total[t] = vfmaq_n_f32(total[t], acc[t], s);
      corr[t] += sz * xs[t][g];
    }
  }
  for (int t = 0; t < NT; ++t) y[static_cast<size_t>(t0 + t) * ldy + r] = vaddvq_f32(total[t]) - corr[t];
}

template <int B>
void qgemm_b(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
  for (int r = r0; r < r1; ++r) {
    int t = 0;
    for (; t + 4 <= a.n; t += 4) row_tile<B, 4>(w, r, a, t, y, ldy);
    switch (a.n - t) {
      case 3: row_tile<B, 3>(w, r, a, t, y, ldy); break;
      case 2: row_tile<B, 2>(w, r, a, t, y, ldy); break;
      case 1: row_tile<B, 1>(w, r, a, t, y, ldy); break;
      default: break;
    }
  }
}

}  // namespace

void qgemm_neon(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
  switch (w.bits) {
    case 2: qgemm_b<2>(w, a, r0, r1, y, ldy); break;
    case 3: qgemm_b<3>(w, a, r0, r1, y, ldy); break;
    case 4: qgemm_b<4>(w, a, r0, r1, y, ldy); break;
    case 8: qgemm_b<8>(w, a, r0, r1, y, ldy); break;
    default: break;
  }
}

}  // namespace mopeq
#endif
