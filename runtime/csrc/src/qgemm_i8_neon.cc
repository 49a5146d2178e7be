// Integer kernel on NEON with the dot-product extension (sdot; Armv8.2+, e.g. Jetson Orin's Cortex-A78AE):
// a pair of blocks (64 codes) is four 16-byte registers, the quarters of the 512-bit path's one, so the
// orders of kernels.h hold unchanged and the tile body is the x86 paths' (qgemm_i8_tile.inc). sdot is signed:
// codes up to 15 go in as they are, 8-bit codes as nibbles.
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

namespace neon {
#define MOPEQ_TGT

// Lane masks (all ones where an int32 lane belongs to the pair's second block) of register k of an order.
inline uint32x4_t second_block_mask(int order, int k) {
  const unsigned m = second_block_lanes(order) >> (4 * k);
  const uint32x4_t bits = {1, 2, 4, 8};
  return vtstq_u32(vdupq_n_u32(m), bits);
}

struct Isa {
  using F = float32x4_t;
  static constexpr int kF = 4;
  struct Codes { int8x16_t c[4]; };
  struct X { int8x16_t q[4]; F d[4]; };

  template <int B>
  static inline Codes decode(const uint32_t* blk, int n) {
    Codes c;
    if constexpr (B == 2 || B == 3) {  // register k: both blocks' 2-bit planes shifted by 2k
      const uint8x16_t v = vcombine_u8(vcreate_u8(load64(blk)), vcreate_u8(n > 1 ? load64(blk + B) : 0));
      const uint8x16_t m = vdupq_n_u8(0b11);
      c.c[0] = vreinterpretq_s8_u8(vandq_u8(v, m));
      c.c[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m));
      c.c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m));
      c.c[3] = vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
      if constexpr (B == 3) {  // high bits by table, 0 or 4
        const uint64_t bits = blk[2] | (n > 1 ? static_cast<uint64_t>(blk[5]) << 32 : 0);
        const uint8x16_t word = vreinterpretq_u8_u64(vdupq_n_u64(bits)), four = vdupq_n_u8(4);
        for (int k = 0; k < 4; ++k) {
          const uint8x16_t bytes = vqtbl1q_u8(word, vld1q_u8(reinterpret_cast<const uint8_t*>(kHighBit.byte) + 16 * k));
          const uint8x16_t hi = vandq_u8(vtstq_u8(bytes, vld1q_u8(kHighBit.bit + 16 * k)), four);
          c.c[k] = vorrq_s8(c.c[k], vreinterpretq_s8_u8(hi));
        }
      }
    } else if constexpr (B == 4) {  // registers: block 0 low nibbles, block 1 low, block 0 high, block 1 high
      const uint8x16_t v0 = vld1q_u8(reinterpret_cast<const uint8_t*>(blk));
      const uint8x16_t v1 = n > 1 ? vld1q_u8(reinterpret_cast<const uint8_t*>(blk + 4)) : vdupq_n_u8(0);
      const uint8x16_t m = vdupq_n_u8(0x0F);
      c.c[0] = vreinterpretq_s8_u8(vandq_u8(v0, m)), c.c[1] = vreinterpretq_s8_u8(vandq_u8(v1, m));
      c.c[2] = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), c.c[3] = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
    } else {  // natural order; the raw bytes (nibbles are split in accumulate)
      for (int k = 0; k < 4; ++k)
        c.c[k] = k < 2 || n > 1 ? vld1q_s8(reinterpret_cast<const int8_t*>(blk) + 16 * k) : vdupq_n_s8(0);
    }
    return c;
  }
  template <int B>
  static inline X load(const int8_t* q, const float* d) {
    X x;
    for (int k = 0; k < 4; ++k) x.q[k] = vld1q_s8(q + 16 * k), x.d[k] = vld1q_f32(d + 4 * k);
    return x;
  }
  template <int B>
  static inline X scaled(X x, float s0, float s1) {
    const F a = vdupq_n_f32(s0), b = vdupq_n_f32(s1);
    for (int k = 0; k < 4; ++k) x.d[k] = vmulq_f32(x.d[k], vbslq_f32(second_block_mask(code_order(B), k), b, a));
    return x;
  }
  // Registers whose lanes map to blocks alike share one int32 sum: all four in kOrder2, {0, 2} and {1, 3} in
  // kOrder4, {0, 1} and {2, 3} in natural order.
  template <int B>
  static inline F accumulate(const Codes& c, const X& x, F acc) {
    const int32x4_t z = vdupq_n_s32(0);
    if constexpr (B == 2 || B == 3) {
      const int32x4_t s = vdotq_s32(vdotq_s32(vdotq_s32(vdotq_s32(z, c.c[0], x.q[0]), c.c[1], x.q[1]), c.c[2], x.q[2]),
                                    c.c[3], x.q[3]);
      return vfmaq_f32(acc, vcvtq_f32_s32(s), x.d[0]);
    } else if constexpr (B == 4) {
      const int32x4_t s0 = vdotq_s32(vdotq_s32(z, c.c[0], x.q[0]), c.c[2], x.q[2]);
      const int32x4_t s1 = vdotq_s32(vdotq_s32(z, c.c[1], x.q[1]), c.c[3], x.q[3]);
      return vfmaq_f32(vfmaq_f32(acc, vcvtq_f32_s32(s0), x.d[0]), vcvtq_f32_s32(s1), x.d[1]);
    } else {
      for (int h = 0; h < 2; ++h) {
        const int8x16_t m = vdupq_n_s8(0x0F);
        const int8x16_t l0 = vandq_s8(c.c[2 * h], m), l1 = vandq_s8(c.c[2 * h + 1], m);
        const int8x16_t h0 = vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(c.c[2 * h]), 4));
        const int8x16_t h1 = vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(c.c[2 * h + 1]), 4));
        const int32x4_t lo = vdotq_s32(vdotq_s32(z, l0, x.q[2 * h]), l1, x.q[2 * h + 1]);
        const int32x4_t hi = vdotq_s32(vdotq_s32(z, h0, x.q[2 * h]), h1, x.q[2 * h + 1]);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(vaddq_s32(lo, vshlq_n_s32(hi, 4))), x.d[2 * h]);
      }
      return acc;
    }
  }
  static inline F loadf(const float* p) { return vld1q_f32(p); }
  static inline F zero() { return vdupq_n_f32(0.f); }
  static inline F set1(float v) { return vdupq_n_f32(v); }
  static inline F mul(F a, F b) { return vmulq_f32(a, b); }
  static inline F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static inline F fnma(F a, F b, F c) { return vfmsq_f32(c, a, b); }
  static inline F halves(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static inline F bytes(const uint8_t* p) {
    const uint32x4_t v = {p[0], p[1], p[2], p[3]};
    return vcvtq_f32_u32(v);
  }
  static inline float reduce(F v) { return vaddvq_f32(v); }
  // The first n (< 4) lanes of s * z and of p; zero past them, nothing read past them.
  static inline F scale_zero_part(const uint16_t* s, const uint8_t* z, int n) {
    float v[4];
    for (int i = 0; i < 4; ++i) v[i] = i < n ? half(s[i]) * static_cast<float>(z[i]) : 0.f;
    return vld1q_f32(v);
  }
  static inline F loadf_part(const float* p, int n) {
    float v[4];
    for (int i = 0; i < 4; ++i) v[i] = i < n ? p[i] : 0.f;
    return vld1q_f32(v);
  }
  static inline float half(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }
  static inline void prefetch(const uint32_t* p) { __builtin_prefetch(p, 0, 2); }
};
#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT
}  // namespace neon

void qgemm_i8_neon(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  neon::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
