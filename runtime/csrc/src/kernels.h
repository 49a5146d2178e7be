// Fused dequantize-and-multiply kernels: y[t, r] = sum_g s[r,g] * (dot(q[r,g], x[t,g]) - z[r,g] * sum(x[t,g])).
// Every SIMD path implements the same QGemmFn and is tested against the scalar one and the NumPy reference.
#pragma once
#include <cstdint>
#include <cstring>

#include "mopeq_format.h"

namespace mopeq {

// One expert's matrix [rows, K] in the packed format.
struct QMatrix {
  const uint32_t* codes;   // [rows, NB * bits]
  const uint16_t* scales;  // [rows, G] float16 bits
  const uint8_t* zeros;    // [rows, G]
  int bits, rows, k, group_size;
  int nb() const { return static_cast<int>(num_blocks(k)); }
  int groups() const { return static_cast<int>(num_groups(k, group_size)); }
};

// A small batch of activations. Rows are zero-padded to NB*32 so kernels read whole blocks.
struct Acts {
  const float* x;         // row r at x + id(r) * ldx
  const float* xsum;      // per-group sums, row r at xsum + id(r) * groups
  const int32_t* ids;     // row indirection (tokens of one expert); nullptr = rows 0..n-1
  int n, ldx, groups;
  int id(int r) const { return ids ? ids[r] : r; }
};

// Computes y[t * ldy + r] for t < a.n, r0 <= r < r1.
using QGemmFn = void (*)(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);

void qgemm_scalar(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#if defined(__x86_64__) || defined(_M_X64)
void qgemm_avx2(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
void qgemm_avx512(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#endif
#if defined(__aarch64__)
void qgemm_neon(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#endif

// Picks the kernel from MOPEQ_KERNEL (scalar|avx2|avx512|neon|auto, default auto) and the CPU.
// Returns nullptr and sets *error when the forced path is unknown or unsupported here.
QGemmFn select_qgemm(const char** name, const char** error);

// Exact IEEE half -> float (subnormals, inf, nan), portable.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalize
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while (!(m & 0x400u));
    bits = sign | ((112 - e) << 23) | ((m & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace mopeq
