// Integer kernel on NEON with the dot-product extension (sdot; Armv8.2+, e.g. Jetson Orin's Cortex-A78AE):
// one block of 32 codes per step as two 16-byte registers in the order of kOrder2 / kOrder4 (kernels.h),
// so the per-token permuted activations meet them with plain loads. Both halves of a block accumulate
// into one int32 vector, converted and scaled by d once per block.
#if defined(__aarch64__)
#pragma GCC target("arch=armv8.2-a+dotprod")
#include <arm_neon.h>
#include <sys/auxv.h>

#include "kernels.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

namespace mopeq {

bool neon_has_dotprod() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }

namespace {

struct Codes { int8x16_t c0, c1, h0, h1; };  // h: the 3-bit codes' high bit (0 or 4), natural order

inline int imin(int a, int b) { return a < b ? a : b; }

template <int B>
inline Codes decode(const uint32_t* blk) {
  Codes c;
  if constexpr (B == 2 || B == 3) {
    const uint8x8_t v = vld1_u8(reinterpret_cast<const uint8_t*>(blk)), m = vdup_n_u8(0b11);
    c.c0 = vreinterpretq_s8_u8(vcombine_u8(vand_u8(v, m), vand_u8(vshr_n_u8(v, 2), m)));
    c.c1 = vreinterpretq_s8_u8(vcombine_u8(vand_u8(vshr_n_u8(v, 4), m), vshr_n_u8(v, 6)));
    if constexpr (B == 3) {
      const uint8x16_t word = vreinterpretq_u8_u32(vdupq_n_u32(blk[2]));
      const uint8x16_t bitsel = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull)), four = vdupq_n_u8(4);
      const uint8x16_t i0 = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
      const uint8x16_t i1 = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
      c.h0 = vreinterpretq_s8_u8(vandq_u8(vtstq_u8(vqtbl1q_u8(word, i0), bitsel), four));
      c.h1 = vreinterpretq_s8_u8(vandq_u8(vtstq_u8(vqtbl1q_u8(word, i1), bitsel), four));
    }
  } else if constexpr (B == 4) {
    const uint8x16_t v = vld1q_u8(reinterpret_cast<const uint8_t*>(blk));
    c.c0 = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
    c.c1 = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
  } else {  // 8 bits: sdot is signed, so the codes go in as nibbles (c0, c1 low; h0, h1 high)
    const uint8x16_t v0 = vld1q_u8(reinterpret_cast<const uint8_t*>(blk)), m = vdupq_n_u8(0x0F);
    const uint8x16_t v1 = vld1q_u8(reinterpret_cast<const uint8_t*>(blk + 4));
    c.c0 = vreinterpretq_s8_u8(vandq_u8(v0, m)), c.c1 = vreinterpretq_s8_u8(vandq_u8(v1, m));
    c.h0 = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), c.h1 = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
  }
  return c;
}

template <int B>
inline int32x4_t block_dot(const Codes& c, const int8_t* xq, const int8_t* xn) {
  const int32x4_t z = vdupq_n_s32(0);
  int32x4_t s = vdotq_s32(vdotq_s32(z, c.c0, vld1q_s8(xq)), c.c1, vld1q_s8(xq + 16));
  if constexpr (B == 3) s = vdotq_s32(vdotq_s32(s, c.h0, vld1q_s8(xn)), c.h1, vld1q_s8(xn + 16));
  if constexpr (B == 8) {
    const int32x4_t h = vdotq_s32(vdotq_s32(z, c.h0, vld1q_s8(xq)), c.h1, vld1q_s8(xq + 16));
    s = vaddq_s32(s, vshlq_n_s32(h, 4));
  }
  return s;
}

template <int B, int R, int NT>
void tile(const QMatrix& w, const QActs& a, int r0, int t0, float* y, int ldy) {
  constexpr int order = B == 2 || B == 3 ? kOrder2 : B == 4 ? kOrder4 : kOrderNatural;
  const int nb = w.nb(), G = w.groups(), per_group = w.group_size / kBlock;
  const int8_t *xq[NT], *xn[NT];
  const float *xd[NT], *xs[NT];
  for (int t = 0; t < NT; ++t) {
    xq[t] = a.codes(t0 + t, order), xn[t] = a.codes(t0 + t, kOrderNatural);
    xd[t] = a.scales(t0 + t), xs[t] = a.sums(t0 + t);
  }
  float32x4_t total[R][NT];
  float corr[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) total[r][t] = vdupq_n_f32(0.f), corr[r][t] = 0.f;
  for (int g = 0; g < G; ++g) {
    float32x4_t acc[R][NT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t] = vdupq_n_f32(0.f);
    for (int b = g * per_group; b < imin(nb, (g + 1) * per_group); ++b) {
      Codes c[R];
      for (int r = 0; r < R; ++r) c[r] = decode<B>(w.codes + (static_cast<size_t>(r0 + r) * nb + b) * B);
      for (int t = 0; t < NT; ++t) {
        const float d = xd[t][b * 8];
        for (int r = 0; r < R; ++r)
          acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(block_dot<B>(c[r], xq[t] + b * kBlock, xn[t] + b * kBlock)), d);
      }
    }
    for (int r = 0; r < R; ++r) {
      const size_t gi = static_cast<size_t>(r0 + r) * G + g;
      const float s = half_to_float(w.scales[gi]), sz = s * static_cast<float>(w.zeros[gi]);
      for (int t = 0; t < NT; ++t) total[r][t] = vfmaq_n_f32(total[r][t], acc[r][t], s), corr[r][t] += sz * xs[t][g];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[static_cast<size_t>(t0 + t) * ldy + r0 + r] = vaddvq_f32(total[r][t]) - corr[r][t];
}

template <int B, int R>
void rows_tokens(const QMatrix& w, const QActs& a, int r, float* y, int ldy) {
  int t = 0;
  for (; t + 4 <= a.n; t += 4) tile<B, R, 4>(w, a, r, t, y, ldy);
  switch (a.n - t) {
    case 3: tile<B, R, 3>(w, a, r, t, y, ldy); break;
    case 2: tile<B, R, 2>(w, a, r, t, y, ldy); break;
    case 1: tile<B, R, 1>(w, a, r, t, y, ldy); break;
    default: break;
  }
}

template <int B>
void gemm(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  int r = r0;
  for (; r + 2 <= r1; r += 2) rows_tokens<B, 2>(w, a, r, y, ldy);
  for (; r < r1; ++r) rows_tokens<B, 1>(w, a, r, y, ldy);
}

}  // namespace

void qgemm_i8_neon(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  switch (w.bits) {
    case 2: gemm<2>(w, a, r0, r1, y, ldy); break;
    case 3: gemm<3>(w, a, r0, r1, y, ldy); break;
    case 4: gemm<4>(w, a, r0, r1, y, ldy); break;
    case 8: gemm<8>(w, a, r0, r1, y, ldy); break;
    default: break;  // widths are validated before any kernel runs
  }
}

}  // namespace mopeq
#endif
