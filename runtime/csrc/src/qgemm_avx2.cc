// AVX2 path: 8 codes per register; same scheme as the AVX-512 path (broadcast, variable shift, mask).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

#define MOPEQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mopeq {
namespace {

// Codes 8*c .. 8*c+7 of one block (c = 0..3), as float.
template <int B>
MOPEQ_AVX2 inline __m256 decode8(const uint32_t* blk, int c) {
  const __m256i j = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i q;
  if (B == 2 || B == 3) {  // 2-bit plane: word c/2 holds codes 16*(c/2) .. +15
    const __m256i shift = _mm256_slli_epi32(_mm256_add_epi32(j, _mm256_set1_epi32(8 * (c & 1))), 1);
    q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(blk[c >> 1])), shift),
                         _mm256_set1_epi32(0b11));
    if (B == 3) {
      const __m256i hi = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(blk[2])),
                                           _mm256_add_epi32(j, _mm256_set1_epi32(8 * c)));
      q = _mm256_or_si256(q, _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(0b1)), 2));
    }
  } else if (B == 4) {  // word c holds all 8
    q = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(blk[c])), _mm256_slli_epi32(j, 2));
    q = _mm256_and_si256(q, _mm256_set1_epi32(0b1111));
  } else {  // B = 8: words 2c, 2c+1
    const __m256i words = _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 * c)));
    const __m256i lane_word = _mm256_srli_epi32(j, 2);
    const __m256i shift = _mm256_slli_epi32(_mm256_and_si256(j, _mm256_set1_epi32(0b11)), 3);
    q = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(words, lane_word), shift);
    q = _mm256_and_si256(q, _mm256_set1_epi32(0xFF));
  }
  return _mm256_cvtepi32_ps(q);
}

MOPEQ_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NT tokens against one row: each decoded register feeds NT FMAs (prefill reuse). With few tokens the
// FMA latency would serialize one accumulator, so CH independent chains keep ~4 FMAs in flight.
template <int B, int NT>
MOPEQ_AVX2 void row_tile(const QMatrix& w, int r, const Acts& a, int t0, float* y, int ldy) {
  constexpr int CH = NT >= 4 ? 1 : (NT == 1 ? 4 : 2);
  const uint32_t* row = w.codes + static_cast<size_t>(r) * w.nb() * B;
  const int G = w.groups(), per_group = w.group_size / kBlock, nb = w.nb();
  const float* x[NT];
  const float* xs[NT];
  __m256 total[NT];
  float corr[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.x + static_cast<size_t>(a.id(t0 + t)) * a.ldx;
    xs[t] = a.xsum + static_cast<size_t>(a.id(t0 + t)) * a.groups;
    total[t] = _mm256_setzero_ps();
    corr[t] = 0.f;
  }
  for (int g = 0; g < G; ++g) {
    __m256 acc[CH][NT];
    for (int c = 0; c < CH; ++c)
      for (int t = 0; t < NT; ++t) acc[c][t] = _mm256_setzero_ps();
    const int b_end = std::min(nb, (g + 1) * per_group);
    for (int b = g * per_group; b < b_end; ++b) {
      for (int c = 0; c < 4; ++c) {
        const __m256 q = decode8<B>(row + b * B, c);
        for (int t = 0; t < NT; ++t)
          acc[c % CH][t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x[t] + b * kBlock + 8 * c), acc[c % CH][t]);
      }
    }
    const size_t gi = static_cast<size_t>(r) * G + g;
    const float s = _cvtsh_ss(w.scales[gi]), sz = s * static_cast<float>(w.zeros[gi]);
    const __m256 vs = _mm256_set1_ps(s);
    for (int t = 0; t < NT; ++t) {
      __m256 sum = acc[0][t];
      for (int c = 1; c < CH; ++c) sum = _mm256_add_ps(sum, acc[c][t]);
      total[t] = _mm256_fmadd_ps(vs, sum, total[t]);
      corr[t] += sz * xs[t][g];
    }
  }
  for (int t = 0; t < NT; ++t) y[static_cast<size_t>(t0 + t) * ldy + r] = hsum(total[t]) - corr[t];
}

template <int B>
MOPEQ_AVX2 void qgemm_b(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
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

void qgemm_avx2(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy) {
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
