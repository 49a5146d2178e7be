// Integer kernel on 256-bit registers, AVX2 (vpmaddubsw + vpmaddwd): a pair of blocks (64 codes) is two
// registers, the halves of the 512-bit path's one, so the orders of kernels.h hold unchanged: one broadcast,
// one 64-bit-lane shift and one byte mask per register give the codes in kOrder2 / kOrder4. In those two
// orders both halves map lanes to blocks alike, so their integer dots add before one conversion; in natural
// order (8 bits) each half is one block.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels.h"

namespace mopeq {
namespace avx2 {

#define MOPEQ_TGT __attribute__((target("avx2,fma,f16c")))

struct Isa {
  using I = __m256i;
  using F = __m256;
  static constexpr int kF = 8;
  struct Codes { I c[2]; };
  struct X { I q[2]; F d[2]; };

  template <int B>
  static MOPEQ_TGT inline Codes decode(const uint32_t* blk, int n) {
    const I m2 = _mm256_set1_epi8(0b11);
    if constexpr (B == 2 || B == 3) {
      const __m128i planes = B == 2 ? (n > 1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk))
                                             : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)))
                                    : _mm_set_epi64x(n > 1 ? static_cast<long long>(load64(blk + 3)) : 0,
                                                     static_cast<long long>(load64(blk)));
      const I v = _mm256_broadcastsi128_si256(planes);
      Codes c{{_mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 2, 2)), m2),
               _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(4, 4, 6, 6)), m2)}};
      if constexpr (B == 3) {  // high bits: byte shuffle and bit test by table, 0 or 4
        const uint64_t bits = blk[2] | (n > 1 ? static_cast<uint64_t>(blk[5]) << 32 : 0);
        const I word = _mm256_set1_epi64x(static_cast<long long>(bits)), four = _mm256_set1_epi8(4);
        for (int h = 0; h < 2; ++h) {
          const I sel = _mm256_load_si256(reinterpret_cast<const I*>(kHighBit.bit + 32 * h));
          const I bytes = _mm256_shuffle_epi8(word, _mm256_load_si256(reinterpret_cast<const I*>(kHighBit.byte + 32 * h)));
          c.c[h] = _mm256_or_si256(c.c[h], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, sel), sel), four));
        }
      }
      return c;
    } else if constexpr (B == 4) {
      const I v = n > 1 ? _mm256_loadu_si256(reinterpret_cast<const I*>(blk))
                        : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      const I m4 = _mm256_set1_epi8(0b1111);
      return {{_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)}};
    } else {
      return {{_mm256_loadu_si256(reinterpret_cast<const I*>(blk)),
               n > 1 ? _mm256_loadu_si256(reinterpret_cast<const I*>(blk + 8)) : _mm256_setzero_si256()}};
    }
  }
  template <int B>
  static MOPEQ_TGT inline X load(const int8_t* q, const float* d) {
    return {{_mm256_loadu_si256(reinterpret_cast<const I*>(q)), _mm256_loadu_si256(reinterpret_cast<const I*>(q + 32))},
            {_mm256_loadu_ps(d), _mm256_loadu_ps(d + 8)}};
  }
  template <int B>
  static MOPEQ_TGT inline X scaled(X x, float s0, float s1) {
    constexpr unsigned second = second_block_lanes(code_order(B));
    const F a = _mm256_set1_ps(s0), b = _mm256_set1_ps(s1);
    return {{x.q[0], x.q[1]}, {_mm256_mul_ps(x.d[0], _mm256_blend_ps(a, b, second & 0xFF)),
                               _mm256_mul_ps(x.d[1], _mm256_blend_ps(a, b, second >> 8))}};
  }
  template <int B>
  static MOPEQ_TGT inline F accumulate(const Codes& c, const X& x, F acc) {
    if constexpr (B == 8) {
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_wide(c.c[0], x.q[0])), x.d[0], acc);
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_wide(c.c[1], x.q[1])), x.d[1], acc);
    } else {
      static_assert((second_block_lanes(code_order(B)) & 0xFF) == second_block_lanes(code_order(B)) >> 8,
                    "both halves must map lanes to blocks alike");
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_pair(c.c[0], x.q[0], c.c[1], x.q[1])), x.d[0], acc);
    }
  }
  static MOPEQ_TGT inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static MOPEQ_TGT inline F zero() { return _mm256_setzero_ps(); }
  static MOPEQ_TGT inline F set1(float v) { return _mm256_set1_ps(v); }
  static MOPEQ_TGT inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static MOPEQ_TGT inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F halves(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static MOPEQ_TGT inline F bytes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static MOPEQ_TGT inline float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static MOPEQ_TGT inline float half(uint16_t h) { return _cvtsh_ss(h); }
  static MOPEQ_TGT inline void prefetch(const uint32_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static MOPEQ_TGT inline F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  // The first n (< 8) lanes of s * z and of p; zero past them, nothing read past them.
  static MOPEQ_TGT inline F scale_zero_part(const uint16_t* s, const uint8_t* z, int n) {
    float v[8];
    for (int i = 0; i < 8; ++i) v[i] = i < n ? _cvtsh_ss(s[i]) * static_cast<float>(z[i]) : 0.f;
    return _mm256_setr_ps(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
  }
  static MOPEQ_TGT inline F loadf_part(const float* p, int n) {
    const I lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  }
  // u8 x s8 products summed in int16 (4 products of codes <= 7 or 15 with |q| <= 127 fit), then int32.
  static MOPEQ_TGT inline I dot_pair(I c0, I q0, I c1, I q1) {
    const I s16 = _mm256_add_epi16(_mm256_maddubs_epi16(c0, q0), _mm256_maddubs_epi16(c1, q1));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
  }
  // 8-bit codes would saturate vpmaddubsw: split into nibbles, 16 * dot(high) + dot(low)
  static MOPEQ_TGT inline I dot_wide(I c, I q) {
    const I m = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi16(1);
    const I lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(c, m), q), one);
    const I hi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(c, 4), m), q), one);
    return _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4));
  }
};

#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT

}  // namespace avx2

void qgemm_i8_avx2(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx2::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
