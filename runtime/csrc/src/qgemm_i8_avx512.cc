// Integer kernel on 512-bit registers, AVX-512 VNNI (vpdpbusd) with VBMI, a pair of blocks (64 codes) per
// register: one broadcast load, one vpmultishiftqb and a byte mask give the codes in kOrder2 / kOrder4
// (kernels.h). n = 1 (a row's odd last block) loads block 0 only, so the second block's codes are zero and the
// zero-padded activations past it add nothing. CPUs with AVX-512 but not VNNI + VBMI (Skylake-X, Cascade
// Lake) take the 256-bit path: the library ships inside every bundle, so each variant's size counts.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels.h"

namespace mopeq {
namespace avx512vnni {

#define MOPEQ_TGT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx512vnni,avx512vbmi")))

struct Isa {
  using I = __m512i;
  using F = __m512;
  static constexpr int kF = 16;
  struct Codes { I c; };
  struct X { I q; F d; };

  // byte p of the result: the 8 bits of its 64-bit lane from bit table[p] on (vpmultishiftqb, VBMI)
  static MOPEQ_TGT inline I unpack(I lanes, const uint8_t* table) {
    return _mm512_multishift_epi64_epi8(_mm512_load_si512(table), lanes);
  }
  template <int B>
  static MOPEQ_TGT inline Codes decode(const uint32_t* blk, int n) {
    const I m2 = _mm512_set1_epi8(0b11);
    if constexpr (B == 2) {  // [block 0 | block 1] broadcast to every 128-bit lane, lane j shifted by 2 * (j / 2)
      const __m128i v = n > 1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk))
                              : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk));
      return {_mm512_and_si512(unpack(_mm512_broadcast_i64x2(v), kShift.order2), m2)};
    } else if constexpr (B == 3) {  // 2-bit planes as above (blocks 3 words apart), high bits by table
      const I planes = _mm512_mask_set1_epi64(_mm512_set1_epi64(static_cast<long long>(load64(blk))), 0xAA,
                                              n > 1 ? static_cast<long long>(load64(blk + 3)) : 0);
      const I lo = _mm512_and_si512(unpack(planes, kShift.order2), m2);
      const uint64_t bits = blk[2] | (n > 1 ? static_cast<uint64_t>(blk[5]) << 32 : 0);
      const I high = unpack(_mm512_set1_epi64(static_cast<long long>(bits)), kShift.high2);
      return {_mm512_ternarylogic_epi64(lo, high, _mm512_set1_epi8(4), 0xF8)};  // lo | (high & 4)
    } else if constexpr (B == 4) {  // [block 0 | block 1] broadcast to both 256-bit halves, the second shifted by 4
      const __m256i v = n > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk))
                              : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      return {_mm512_and_si512(unpack(_mm512_broadcast_i64x4(v), kShift.order4),
                               _mm512_set1_epi8(0b1111))};
    } else {
      return {n > 1 ? _mm512_loadu_si512(blk) : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)))};
    }
  }
  template <int B>
  static MOPEQ_TGT inline X load(const int8_t* q, const float* d) { return {_mm512_loadu_si512(q), _mm512_loadu_ps(d)}; }
  template <int B>
  static MOPEQ_TGT inline X scaled(X x, float s0, float s1) {
    constexpr __mmask16 second = static_cast<__mmask16>(second_block_lanes(code_order(B)));
    return {x.q, _mm512_mul_ps(x.d, _mm512_mask_blend_ps(second, _mm512_set1_ps(s0), _mm512_set1_ps(s1)))};
  }
  template <int B>
  static MOPEQ_TGT inline F accumulate(const Codes& c, const X& x, F acc) {
    const I s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c.c, x.q);  // 8-bit codes fit u8 x s8 as they are
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), x.d, acc);
  }
  static MOPEQ_TGT inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static MOPEQ_TGT inline F zero() { return _mm512_setzero_ps(); }
  static MOPEQ_TGT inline F set1(float v) { return _mm512_set1_ps(v); }
  static MOPEQ_TGT inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static MOPEQ_TGT inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F halves(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MOPEQ_TGT inline F bytes(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static MOPEQ_TGT inline float reduce(F v) { return _mm512_reduce_add_ps(v); }
  static MOPEQ_TGT inline float half(uint16_t h) { return _cvtsh_ss(h); }
  static MOPEQ_TGT inline void prefetch(const uint32_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static MOPEQ_TGT inline F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  // The first n (< 16) lanes of s * z and of p; zero past them, nothing read past them.
  static MOPEQ_TGT inline F scale_zero_part(const uint16_t* s, const uint8_t* z, int n) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s)),
                         _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z))));
  }
  static MOPEQ_TGT inline F loadf_part(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
};

#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT

}  // namespace avx512vnni

void qgemm_i8_avx512vnni(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx512vnni::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
