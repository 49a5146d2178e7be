// Integer kernel on 256-bit registers, AVX2 (vpmaddubsw + vpmaddwd): a register holds the same word of 8 rows of
// a tile (half of the 512-bit path's one), one row per 32-bit lane. Codes by class as on the 512-bit path, with
// a 16-bit shift and a byte mask; the 3-bit codes' high bit by an in-lane byte shuffle and a bit test. Products
// of a block are summed in int16 (at most 8 vpmaddubsw per token: 8 * 2 * 15 * 127 < 2^15) and widened once per
// block; 8-bit codes would saturate vpmaddubsw and go in as nibbles, 16 * dot(high) + dot(low).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels.h"

namespace mopeq {
namespace avx2 {

#define MOPEQ_TGT __attribute__((target("avx2,fma,f16c")))

struct Isa {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;

  static MOPEQ_TGT inline I load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static MOPEQ_TGT inline I bcast(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  // a 16-byte table (kernels.h) in both 128-bit halves
  static MOPEQ_TGT inline I tbl(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static MOPEQ_TGT inline I class2(I v, int k) {
    const I m = _mm256_set1_epi8(0b11);
    return k == 0 ? _mm256_and_si256(v, m) : _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m);
  }
  template <int NT>
  static MOPEQ_TGT inline void dot(I c, const int8_t* const* x, int off, I* s16) {
    for (int t = 0; t < NT; ++t) s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(c, bcast(x[t] + off)));
  }
  template <int B, int NT>
  static MOPEQ_TGT inline void block_dot(const uint32_t* blk, const int8_t* const* x, I* acc) {
    const I one = _mm256_set1_epi16(1);
    I s16[NT];
    for (int t = 0; t < NT; ++t) s16[t] = _mm256_setzero_si256();
    if constexpr (B == 2 || B == 3) {
      I hi = _mm256_setzero_si256();
      if constexpr (B == 3) hi = load(blk + 2 * kTileRows);
      for (int w = 0; w < 2; ++w) {
        const I v = load(blk + w * kTileRows);
        I bytes = _mm256_setzero_si256();
        if constexpr (B == 3) bytes = _mm256_shuffle_epi8(hi, tbl(kHighBit.byte[w]));
        for (int k = 0; k < 4; ++k) {
          I c = class2(v, k);
          if constexpr (B == 3) {
            const I bit = tbl(kHighBit.bit[k]);
            c = _mm256_or_si256(c, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit),
                                                    _mm256_set1_epi8(4)));
          }
          dot<NT>(c, x, 16 * w + 4 * k, s16);
        }
      }
    } else if constexpr (B == 4) {
      const I m = _mm256_set1_epi8(0x0F);
      for (int w = 0; w < 4; ++w) {
        const I v = load(blk + w * kTileRows);
        dot<NT>(_mm256_and_si256(v, m), x, 8 * w, s16);
        dot<NT>(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), x, 8 * w + 4, s16);
      }
    } else {
      const I m = _mm256_set1_epi8(0x0F);
      I h16[NT];
      for (int t = 0; t < NT; ++t) h16[t] = _mm256_setzero_si256();
      for (int w = 0; w < 8; ++w) {
        const I v = load(blk + w * kTileRows);
        dot<NT>(_mm256_and_si256(v, m), x, 4 * w, s16);
        dot<NT>(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), x, 4 * w, h16);
      }
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_slli_epi32(_mm256_madd_epi16(h16[t], one), 4));
    }
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], one));
  }
  static MOPEQ_TGT inline I izero() { return _mm256_setzero_si256(); }
  static MOPEQ_TGT inline F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static MOPEQ_TGT inline F zero() { return _mm256_setzero_ps(); }
  static MOPEQ_TGT inline F set1(float v) { return _mm256_set1_ps(v); }
  static MOPEQ_TGT inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F halves(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static MOPEQ_TGT inline F bytes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static MOPEQ_TGT inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT

}  // namespace avx2

void qgemm_i8_avx2(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx2::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
