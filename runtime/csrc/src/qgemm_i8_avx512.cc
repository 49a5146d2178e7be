// Integer kernel on 512-bit registers, AVX-512 VNNI (vpdpbusd) with VBMI, a pair of blocks (64 codes) per
// register: one broadcast load and one vpmultishiftqb (or a 64-bit-lane shift) and a byte mask give the codes
// in kOrder2 / kOrder4 (kernels.h). CPUs with AVX-512 but not VNNI + VBMI (Skylake-X, Cascade Lake) take the
// 256-bit path: the library ships inside every bundle, so each variant's size counts.
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

namespace avx512vnni {
#define MOPEQ_TGT __attribute__((target(MOPEQ_ISA_512 ",avx512vnni,avx512vbmi")))
struct Isa {
#include "qgemm_i8_isa512.inc"
  static MOPEQ_TGT inline I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static MOPEQ_TGT inline I dot_wide(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
};
#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT
}  // namespace avx512vnni

void qgemm_i8_avx512vnni(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx512vnni::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
