// Integer kernel on NEON with the dot-product extension (sdot; Armv8.2+, e.g. Jetson Orin's Cortex-A78AE): a
// 128-bit register holds the same word of 4 rows of a tile (a quarter of the 512-bit path's one), one row per
// 32-bit lane. Codes by class as on the x86 paths (shift and mask per byte); sdot's by-element form takes the
// same four activations for every lane straight from one 16-byte load of the class-ordered activations. sdot is
// signed: codes up to 15 go in as they are, 8-bit codes as nibbles, 16 * dot(high) + dot(low).
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

struct Isa {
  using I = int32x4_t;
  using F = float32x4_t;
  static constexpr int kLanes = 4;

  static inline uint8x16_t load(const uint32_t* p) { return vld1q_u8(reinterpret_cast<const uint8_t*>(p)); }
  static inline int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }
  // acc[t] += codes . (activations x[t] + off, 4 bytes, the same for every lane)
  template <int NT, int L>
  static inline void dot16(int8x16_t c, const int8x16_t* x, I* acc) {
    for (int t = 0; t < NT; ++t) acc[t] = vdotq_laneq_s32(acc[t], c, x[t], L);
  }
  template <int NT, int L>
  static inline void dot8(int8x16_t c, const int8x8_t* x, I* acc) {
    for (int t = 0; t < NT; ++t) acc[t] = vdotq_lane_s32(acc[t], c, x[t], L);
  }
  template <int B, int NT>
  static inline void block_dot(const uint32_t* blk, const int8_t* const* x, I* acc) {
    if constexpr (B == 2 || B == 3) {
      uint8x16_t hi = vdupq_n_u8(0);
      if constexpr (B == 3) hi = load(blk + 2 * kTileRows);
      const uint8x16_t m = vdupq_n_u8(0b11), four = vdupq_n_u8(4);
      for (int w = 0; w < 2; ++w) {
        const uint8x16_t v = load(blk + w * kTileRows);
        int8x16_t xw[NT];
        for (int t = 0; t < NT; ++t) xw[t] = vld1q_s8(x[t] + 16 * w);
        uint8x16_t c[4] = {vandq_u8(v, m), vandq_u8(vshrq_n_u8(v, 2), m), vandq_u8(vshrq_n_u8(v, 4), m),
                           vshrq_n_u8(v, 6)};
        if constexpr (B == 3) {
          const uint8x16_t bytes = vqtbl1q_u8(hi, vld1q_u8(kHighBit.byte[w]));
          for (int k = 0; k < 4; ++k) c[k] = vorrq_u8(c[k], vandq_u8(vtstq_u8(bytes, vld1q_u8(kHighBit.bit[k])), four));
        }
        dot16<NT, 0>(s8(c[0]), xw, acc), dot16<NT, 1>(s8(c[1]), xw, acc);
        dot16<NT, 2>(s8(c[2]), xw, acc), dot16<NT, 3>(s8(c[3]), xw, acc);
      }
    } else if constexpr (B == 4) {
      const uint8x16_t m = vdupq_n_u8(0x0F);
      for (int w = 0; w < 4; ++w) {
        const uint8x16_t v = load(blk + w * kTileRows);
        int8x8_t xw[NT];
        for (int t = 0; t < NT; ++t) xw[t] = vld1_s8(x[t] + 8 * w);
        dot8<NT, 0>(s8(vandq_u8(v, m)), xw, acc);
        dot8<NT, 1>(s8(vshrq_n_u8(v, 4)), xw, acc);
      }
    } else {
      const uint8x16_t m = vdupq_n_u8(0x0F);
      I hi[NT];
      for (int t = 0; t < NT; ++t) hi[t] = vdupq_n_s32(0);
      for (int w = 0; w < 8; w += 2) {
        int8x8_t xw[NT];
        for (int t = 0; t < NT; ++t) xw[t] = vld1_s8(x[t] + 4 * w);
        const uint8x16_t v0 = load(blk + w * kTileRows), v1 = load(blk + (w + 1) * kTileRows);
        dot8<NT, 0>(s8(vandq_u8(v0, m)), xw, acc), dot8<NT, 0>(s8(vshrq_n_u8(v0, 4)), xw, hi);
        dot8<NT, 1>(s8(vandq_u8(v1, m)), xw, acc), dot8<NT, 1>(s8(vshrq_n_u8(v1, 4)), xw, hi);
      }
      for (int t = 0; t < NT; ++t) acc[t] = vaddq_s32(acc[t], vshlq_n_s32(hi[t], 4));
    }
  }
  static inline I izero() { return vdupq_n_s32(0); }
  static inline F cvt(I v) { return vcvtq_f32_s32(v); }
  static inline F zero() { return vdupq_n_f32(0.f); }
  static inline F set1(float v) { return vdupq_n_f32(v); }
  static inline F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static inline F fnma(F a, F b, F c) { return vfmsq_f32(c, a, b); }
  static inline F halves(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static inline F bytes(const uint8_t* p) {
    const uint32x4_t v = {p[0], p[1], p[2], p[3]};
    return vcvtq_f32_u32(v);
  }
  static inline void store(float* p, F v) { vst1q_f32(p, v); }
};
#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT
}  // namespace neon

void qgemm_i8_neon(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  neon::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
