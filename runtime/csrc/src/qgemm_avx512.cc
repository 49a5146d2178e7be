// AVX-512 path: 16 codes per register, decoded with one broadcast/permute, one variable shift, one mask
// (the layout was chosen for exactly this, FORMAT.md §3). Compiled with target attributes so the library
// still loads on CPUs without AVX-512; dispatch.cc only calls it after CPUID says yes.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

#define MOPEQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))

namespace mopeq {
namespace {

// Codes 16*half .. 16*half+15 of one block, as float.
template <int B>
MOPEQ_AVX512 inline __m512 decode16(const uint32_t* blk, int half) {
  const __m512i j = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i q;
  if (B == 2 || B == 3) {  // one word of the 2-bit plane holds all 16
    q = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(blk[half])), _mm512_slli_epi32(j, 1));
    q = _mm512_and_si512(q, _mm512_set1_epi32(0b11));
    if (B == 3) {
      __m512i hi = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(blk[2])),
                                     _mm512_add_epi32(j, _mm512_set1_epi32(16 * half)));
      q = _mm512_or_si512(q, _mm512_slli_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(0b1)), 2));
    }
  } else {  // B = 4: 8 codes per word (2 words); B = 8: 4 codes per word (4 words)
    constexpr int per_word = 32 / B;
    // Load only this half's words (2 or 4): a wider load could run past the tensor's last block.
    const __m128i* src = reinterpret_cast<const __m128i*>(blk + half * (16 / per_word));
    const __m512i words = _mm512_zextsi128_si512(B == 4 ? _mm_loadl_epi64(src) : _mm_loadu_si128(src));
    const __m512i word_of_lane = _mm512_srli_epi32(j, B == 4 ? 3 : 2);
    const __m512i shift = _mm512_mullo_epi32(_mm512_and_si512(j, _mm512_set1_epi32(per_word - 1)), _mm512_set1_epi32(B));
    q = _mm512_srlv_epi32(_mm512_permutexvar_epi32(word_of_lane, words), shift);
    q = _mm512_and_si512(q, _mm512_set1_epi32((1 << B) - 1));
  }
  return _mm512_cvtepi32_ps(q);
}

// NT tokens against one row: each decoded register feeds NT FMAs (prefill reuse). With one or two
// tokens the two halves of a block use separate accumulators so FMA latency does not serialize them.
template <int B, int NT>
MOPEQ_AVX512 void row_tile(const QMatrix& w, int r, const Acts& a, int t0, float* y, int ldy) {
  constexpr int CH = NT >= 4 ? 1 : 2;
  const uint32_t* row = w.codes + static_cast<size_t>(r) * w.nb() * B;
  const int G = w.groups(), per_group = w.group_size / kBlock, nb = w.nb();
  const float* x[NT];
  const float* xs[NT];
  __m512 total[NT];
  float corr[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.x + static_cast<size_t>(a.id(t0 + t)) * a.ldx;
    xs[t] = a.xsum + static_cast<size_t>(a.id(t0 + t)) * a.groups;
    total[t] = _mm512_setzero_ps();
    corr[t] = 0.f;
  }
  for (int g = 0; g < G; ++g) {
    __m512 acc[CH][NT];
    for (int c = 0; c < CH; ++c)
      for (int t = 0; t < NT; ++t) acc[c][t] = _mm512_setzero_ps();
    const int b_end = std::min(nb, (g + 1) * per_group);
    for (int b = g * per_group; b < b_end; ++b) {
      for (int half = 0; half < 2; ++half) {
        const __m512 q = decode16<B>(row + b * B, half);
        for (int t = 0; t < NT; ++t)
          acc[half % CH][t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(x[t] + b * kBlock + 16 * half), acc[half % CH][t]);
      }
    }
    const size_t gi = static_cast<size_t>(r) * G + g;
    const float s = _cvtsh_ss(w.scales[gi]), sz = s * static_cast<float>(w.zeros[gi]);
    const __m512 vs = _mm512_set1_ps(s);
    for (int t = 0; t < NT; ++t) {
      const __m512 sum = CH == 2 ? _mm512_add_ps(acc[0][t], acc[CH - 1][t]) : acc[0][t];
      total[t] = _mm512_fmadd_ps(vs, sum, total[t]);
      corr[t] += sz * xs[t][g];
    }
  }
  for (int t = 0; t < NT; ++t)
    y[static_cast<size_t>(t0 + t) * ldy + r] = _mm512_reduce_add_ps(total[t]) - corr[t];
}

template <int B>
MOPEQ_AVX512 void qgemm_b(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
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

void qgemm_avx512(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
  switch (w.bits) {
    case 2: qgemm_b<2>(w, a, r0, r1, y, ldy); break;
    case 3: qgemm_b<3>(w, a, r0, r1, y, ldy); break;
    case 4: qgemm_b<4>(w, a, r0, r1, y, ldy); break;
    case 8: qgemm_b<8>(w, a, r0, r1, y, ldy); break;
    default: break;  // widths are validated before any kernel runs
  }
}

}  // namespace mopeq
#endif
