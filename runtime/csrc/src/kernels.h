// Fused dequantize-and-multiply kernels: y[t, r] = sum_g s[r,g] * (dot(q[r,g], x[t,g]) - z[r,g] * sum(x[t,g])).
// Float-activation paths implement QGemmFn, integer paths QGemmI8Fn; every SIMD path is tested against the
// scalar one of its kind and against the NumPy reference.
#pragma once
#include <cstddef>
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

// Activations quantized once per token to int8, per 32-value block (KERNELS.md "Integer path"):
// x ~ d_b * q, d_b = max|x_b| / 127. Blocks go in pairs (64 values), and each row holds a pair's codes in
// the three orders the SIMD decoders emit codes in, so a decoded register meets its activations with one
// load: kOrder2 is the order of two 2-bit blocks' codes after a 64-bit-lane shift by 0, 2, 4, 6 and a byte
// mask (3-bit codes use it too), kOrder4 that of two 4-bit blocks after a shift by 0, 4 and a mask,
// kOrderNatural value order (8-bit codes). Beside the codes: per order, the block scale of every int32 lane
// (4 consecutive codes) of the pair, and per group sum_b d_b * sum(q_b) for the zero point.
enum ActOrder { kOrderNatural = 0, kOrder2 = 1, kOrder4 = 2, kNumOrders = 3 };

// The order a width's decoded codes come in.
constexpr int code_order(int bits) { return bits == 2 || bits == 3 ? kOrder2 : bits == 4 ? kOrder4 : kOrderNatural; }

// Value (block in pair * 32 + index in block) held at position p (0..63) of a pair in an order. Position
// p = 8j + B is byte B of 64-bit lane j of the decoded register.
constexpr int order_value(int order, int p) {
  return order == kOrder2   ? 32 * ((p / 8) % 2) + 4 * (p % 8) + p / 16
         : order == kOrder4 ? 32 * ((p / 8 % 4) / 2) + 2 * ((p / 8 % 2) * 8 + p % 8) + p / 32
                            : p;
}
// Block in pair (0 or 1) of int32 lane l (0..15) of a pair in an order.
constexpr int lane_block(int order, int l) { return order_value(order, 4 * l) / 32; }

constexpr bool orders_keep_lanes_in_one_block() {
  for (int o = 0; o < kNumOrders; ++o)
    for (int p = 0; p < 64; ++p)
      if (order_value(o, p) / 32 != order_value(o, p - p % 4) / 32) return false;
  return true;
}
static_assert(orders_keep_lanes_in_one_block(), "an int32 lane (4 codes) must stay inside one block");

// Per-position tables of the 3-bit codes' high bit in kOrder2: bit order_value(kOrder2, p) of the pair's two
// high-bit words (block 0's in bits 0-31) is byte (that / 8), bit (that % 8) of their 64-bit concatenation.
struct HighBitTables {
  alignas(64) int8_t byte[64];
  alignas(64) uint8_t bit[64];
};
constexpr HighBitTables high_bit_tables() {
  HighBitTables t{};
  for (int p = 0; p < 64; ++p) {
    t.byte[p] = static_cast<int8_t>(order_value(kOrder2, p) / 8);
    t.bit[p] = static_cast<uint8_t>(1u << (order_value(kOrder2, p) % 8));
  }
  return t;
}
inline constexpr HighBitTables kHighBit = high_bit_tables();

// vpmultishiftqb controls that unpack a pair straight into an order (AVX-512 VBMI): byte p takes the 8 bits
// of its 64-bit lane starting at shift[p]; after the mask its low bits are the code. kOrder2 from both
// blocks' 2-bit planes (lane j holds block j % 2), kOrder4 from the 4-bit blocks (lane j holds bytes
// 8 * (j % 2).. of block (j % 4) / 2), and the 3-bit codes' high bit from the pair's 64 high bits, rotated
// to bit 2 (value 4).
struct ShiftTables {
  alignas(64) uint8_t order2[64];
  alignas(64) uint8_t order4[64];
  alignas(64) uint8_t high2[64];
};
constexpr ShiftTables shift_tables() {
  ShiftTables t{};
  for (int p = 0; p < 64; ++p) {
    const int j = p / 8, byte = p % 8;
    t.order2[p] = static_cast<uint8_t>(8 * byte + 2 * (j / 2));
    t.order4[p] = static_cast<uint8_t>(8 * byte + 4 * (j / 4));
    t.high2[p] = static_cast<uint8_t>((order_value(kOrder2, p) + 62) % 64);
  }
  return t;
}
inline constexpr ShiftTables kShift = shift_tables();

// Bit l set when int32 lane l of an order's pair belongs to the pair's second block.
constexpr unsigned second_block_lanes(int order) {
  unsigned m = 0;
  for (int l = 0; l < 16; ++l) m |= static_cast<unsigned>(lane_block(order, l)) << l;
  return m;
}

struct QActs {
  const int8_t* q;     // row r at q + id(r) * ldq(): kNumOrders runs of nbp * 32 codes
  const float* d;      // row r at d + id(r) * ldd(): kNumOrders runs of nbp * 8 lane scales
  const float* gsum;   // row r at gsum + id(r) * groups
  const int32_t* ids;  // row indirection as in Acts; nullptr = rows 0..n-1
  int n, nbp, groups;  // rows, blocks padded (padded_blocks), groups
  int id(int r) const { return ids ? ids[r] : r; }
  size_t ldq() const { return static_cast<size_t>(kNumOrders) * nbp * kBlock; }
  size_t ldd() const { return static_cast<size_t>(kNumOrders) * nbp * 8; }
  const int8_t* codes(int r, int order) const { return q + id(r) * ldq() + static_cast<size_t>(order) * nbp * kBlock; }
  const float* scales(int r, int order) const { return d + id(r) * ldd() + static_cast<size_t>(order) * nbp * 8; }
  const float* sums(int r) const { return gsum + static_cast<size_t>(id(r)) * groups; }
};

// Blocks padded to whole pairs (zeros past K).
inline int padded_blocks(int k) { return (static_cast<int>(num_blocks(k)) + 1) & ~1; }

// Two consecutive code words as one little-endian 64-bit value (the unpackers' broadcast source).
inline uint64_t load64(const uint32_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Quantizes x[K] into one QActs row (q: ldq bytes, d: ldd floats, gsum: groups floats).
void quantize_acts(const float* x, int k, int group_size, int8_t* q, float* d, float* gsum);

// Same contract as QGemmFn with int8 activations.
using QGemmI8Fn = void (*)(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy);

void qgemm_i8_scalar(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy);
#if defined(__x86_64__) || defined(_M_X64)
void qgemm_i8_avx2(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy);
void qgemm_i8_avx512vnni(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy);
#endif
#if defined(__aarch64__)
void qgemm_i8_neon(const QMatrix& w, const QActs& a, int r0, int r1, float* y, int ldy);
bool neon_has_dotprod();
#endif

// One kernel path: exactly one of f32 / i8 is set.
struct KernelPath {
  const char* name;
  QGemmFn f32;
  QGemmI8Fn i8;
};

void qgemm_scalar(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#if defined(__x86_64__) || defined(_M_X64)
void qgemm_avx2(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#endif
#if defined(__aarch64__)
void qgemm_neon(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);
#endif

// Picks the kernel from MOPEQ_KERNEL and the CPU: "auto" (default) is the best integer path the CPU has;
// the float-activation paths (scalar, avx2, neon) stay selectable as the exact reference.
// Returns false and sets *error when the forced path is unknown or unsupported here.
bool select_kernel(KernelPath* path, const char** error);

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
