// Integer kernels on 512-bit registers: AVX-512BW (vpmaddubsw + vpmaddwd) and AVX-512 VNNI (vpdpbusd), a
// pair of blocks (64 codes) per register: one broadcast load, one 64-bit-lane shift and one byte mask give
// the codes in kOrder2 / kOrder4 (kernels.h); the 3-bit codes' high bits come through a byte shuffle and a
// bit test.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace mopeq {

namespace {
inline uint64_t load64(const uint32_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
}  // namespace

#define MOPEQ_ISA_512 "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c"

namespace avx512 {
#define MOPEQ_TGT __attribute__((target(MOPEQ_ISA_512)))
struct Isa {
  static constexpr bool kVbmi = false;
#include "qgemm_i8_isa512.inc"
  // u8 x s8 -> s16 pairs (|15 * 127 * 2| fits) -> s32 quads
  static MOPEQ_TGT inline I dot(I acc, I u, I s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  }
  // 8-bit codes would saturate vpmaddubsw: split into nibbles, 16 * dot(high) + dot(low)
  static MOPEQ_TGT inline I dot_wide(I acc, I u, I s) {
    const I m = _mm512_set1_epi8(0x0F);
    const I lo = dot(acc, _mm512_and_si512(u, m), s);
    const I hi = dot(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(u, 4), m), s);
    return _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 4));
  }
};
#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT
}  // namespace avx512

namespace avx512vnni {  // every CPU with AVX-512 VNNI but Cascade Lake also has VBMI; that one takes i8-avx512
#define MOPEQ_TGT __attribute__((target(MOPEQ_ISA_512 ",avx512vnni,avx512vbmi")))
struct Isa {
  static constexpr bool kVbmi = true;
#include "qgemm_i8_isa512.inc"
  static MOPEQ_TGT inline I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static MOPEQ_TGT inline I dot_wide(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
};
#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT
}  // namespace avx512vnni

void qgemm_i8_avx512(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx512::gemm_any(w, a, r0, r1, y, ldy);
}

void qgemm_i8_avx512vnni(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx512vnni::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
