// Integer kernel on 512-bit registers, AVX-512 VNNI (vpdpbusd) with VBMI and GFNI: one register holds the same
// word of a tile's 16 rows, one row per 32-bit lane (FORMAT.md §4). A 2-bit word gives four registers of codes,
// one per class k (byte m of a lane = value 4m + k of the word): a byte mask for k = 0, a GF(2) affine bit move
// (vgf2p8affineqb) for the others. 4-bit words give two (mask; affine move of the high nibble), 8-bit words are
// codes as they are; 3-bit codes add their high bit, moved into bit 2 of each byte by vpmultishiftqb, with one
// ternary-logic OR. Each register of codes meets the same four activations in every lane (a broadcast 32-bit
// load, kOrder2 / kOrder4 of kernels.h) in one vpdpbusd per token. CPUs with AVX-512 but not VNNI + VBMI + GFNI
// (Skylake-X, Cascade Lake) take the 256-bit path.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels.h"

namespace mopeq {
namespace avx512vnni {

#define MOPEQ_TGT \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx512vnni,avx512vbmi,gfni")))

// GF(2) affine matrices (vgf2p8affineqb: result bit i = parity(byte 7 - i of the matrix & source byte)).
constexpr long long move_bits(int from, int count) {  // bits from..from+count-1 of each byte to bits 0..count-1
  unsigned long long m = 0;
  for (int i = 0; i < count; ++i) m |= (1ull << (from + i)) << (8 * (7 - i));
  return static_cast<long long>(m);
}

// vpmultishiftqb controls for the 3-bit codes' high bits: for class k of plane word w, byte m of a row's lane
// takes the 8 bits of its 64-bit lane (two rows' high-bit words) that put bit 16w + 4m + k of the row's word at
// bit 2 (value 4).
struct HighBitShifts {
  alignas(64) uint8_t ctrl[2][4][64];
};
constexpr HighBitShifts high_bit_shifts() {
  HighBitShifts h{};
  for (int w = 0; w < 2; ++w)
    for (int k = 0; k < 4; ++k)
      for (int p = 0; p < 64; ++p) {
        const int q = p % 8, lane = q / 4, m = q % 4;
        h.ctrl[w][k][p] = static_cast<uint8_t>((32 * lane + 16 * w + 4 * m + k - 2 + 64) % 64);
      }
  return h;
}
inline constexpr HighBitShifts kHighBitShifts = high_bit_shifts();

struct Isa {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;

  static MOPEQ_TGT inline I load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static MOPEQ_TGT inline I bcast(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  // One partial sum per class of codes and token: class k's codes are masked in place, not shifted (the byte
  // holds code << s_k), so its sum is exactly 2^s_k times the true one and one arithmetic shift per block undoes
  // it. Independent partial sums also keep vpdpbusd's latency off the critical path.
  template <int NT, int P>
  static MOPEQ_TGT inline void dot(I c, const int8_t* const* x, int off, I (*part)[P], int p) {
    for (int t = 0; t < NT; ++t) part[t][p] = _mm512_dpbusd_epi32(part[t][p], c, bcast(x[t] + off));
  }
  template <int B, int NT>
  static MOPEQ_TGT inline void block_dot(const uint32_t* blk, const int8_t* const* x, I* acc) {
    constexpr int P = B == 4 ? 2 : 4;
    I part[NT][P];
    for (int t = 0; t < NT; ++t)
      for (int p = 0; p < P; ++p) part[t][p] = _mm512_setzero_si512();
    if constexpr (B == 2) {  // part k: codes of class k at bits 2k, 2k+1
      for (int w = 0; w < 2; ++w) {
        const I v = load(blk + w * kTileRows);
        for (int k = 0; k < 4; ++k) dot<NT, P>(_mm512_and_si512(v, _mm512_set1_epi8(3 << (2 * k))), x, 16 * w + 4 * k, part, k);
      }
    } else if constexpr (B == 3) {  // codes moved to bits 0-2 (gfni for the plane, vpmultishiftqb for bit 2)
      const I hi = load(blk + 2 * kTileRows), four = _mm512_set1_epi8(4);
      for (int w = 0; w < 2; ++w) {
        const I v = load(blk + w * kTileRows);
        for (int k = 0; k < 4; ++k) {
          const I lo = k == 0 ? _mm512_and_si512(v, _mm512_set1_epi8(3))
                              : _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(move_bits(2 * k, 2)), 0);
          const I h = _mm512_multishift_epi64_epi8(_mm512_load_si512(kHighBitShifts.ctrl[w][k]), hi);
          dot<NT, P>(_mm512_ternarylogic_epi64(lo, h, four, 0xF8), x, 16 * w + 4 * k, part, k);  // lo | (h & 4)
        }
      }
    } else if constexpr (B == 4) {  // part 0: low nibbles; part 1: high nibbles in place (16x)
      for (int w = 0; w < 4; ++w) {
        const I v = load(blk + w * kTileRows);
        dot<NT, P>(_mm512_and_si512(v, _mm512_set1_epi8(0x0F)), x, 8 * w, part, 0);
        dot<NT, P>(_mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(0xF0))), x, 8 * w + 4, part, 1);
      }
    } else {
      for (int w = 0; w < 8; ++w) dot<NT, P>(load(blk + w * kTileRows), x, 4 * w, part, w % 4);  // u8 codes x s8
    }
    for (int t = 0; t < NT; ++t) {
      if constexpr (B == 2) {
        const I a = _mm512_add_epi32(part[t][0], _mm512_srai_epi32(part[t][1], 2));
        const I b = _mm512_add_epi32(_mm512_srai_epi32(part[t][2], 4), _mm512_srai_epi32(part[t][3], 6));
        acc[t] = _mm512_add_epi32(a, b);
      } else if constexpr (B == 4) {
        acc[t] = _mm512_add_epi32(part[t][0], _mm512_srai_epi32(part[t][1], 4));
      } else {
        acc[t] = _mm512_add_epi32(_mm512_add_epi32(part[t][0], part[t][1]), _mm512_add_epi32(part[t][2], part[t][3]));
      }
    }
  }
  static MOPEQ_TGT inline I izero() { return _mm512_setzero_si512(); }
  static MOPEQ_TGT inline F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static MOPEQ_TGT inline F zero() { return _mm512_setzero_ps(); }
  static MOPEQ_TGT inline F set1(float v) { return _mm512_set1_ps(v); }
  static MOPEQ_TGT inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static MOPEQ_TGT inline F halves(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MOPEQ_TGT inline F bytes(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static MOPEQ_TGT inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};

#include "qgemm_i8_tile.inc"
#undef MOPEQ_TGT

}  // namespace avx512vnni

void qgemm_i8_avx512vnni(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy) {
  avx512vnni::gemm_any(w, a, r0, r1, y, ldy);
}

}  // namespace mopeq
#endif
