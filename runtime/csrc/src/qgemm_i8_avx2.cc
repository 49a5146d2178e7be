// Integer kernel on 256-bit registers, AVX2 (vpmaddubsw + vpmaddwd), a pair of blocks (64 codes) per two
// registers: one broadcast, one 64-bit-lane shift and one byte mask per register
// give the codes in kOrder2 / kOrder4 (kernels.h); the activations were permuted to match once per token.
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

namespace avx2 {
#define MOPEQ_TGT __attribute__((target("avx2,fma,f16c")))
struct Isa {
#include "qgemm_i8_isa256.inc"
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
