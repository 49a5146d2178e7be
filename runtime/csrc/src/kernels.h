// Fused dequantize-and-multiply kernels: y[t, r] = sum_g s[r,g] * (dot(q[r,g], x[t,g]) - z[r,g] * sum(x[t,g])).
// Float-activation paths implement QGemmFn, integer paths QGemmI8Fn; every SIMD path is tested against the
// scalar one of its kind and against the NumPy reference.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mopeq_format.h"

namespace mopeq {

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


// One expert's matrix [rows, K] in the packed format, stored in tiles of kTileRows rows (FORMAT.md §4).
struct QMatrix {
  const uint32_t* codes;   // [rows/16, NB * bits, 16]
  const uint16_t* scales;  // [rows/16, G, 16] float16 bits
  const uint8_t* zeros;    // [rows/16, G, 16]
  int bits, rows, k, group_size;
  int nb() const { return static_cast<int>(num_blocks(k)); }
  int groups() const { return static_cast<int>(num_groups(k, group_size)); }
  int row_words() const { return nb() * bits; }
  // Word 0 of block b of row r; the block's word w is at [w * kTileRows].
  const uint32_t* block(int r, int b) const { return codes + tiled_index(r, static_cast<int64_t>(b) * bits, row_words()); }
  float scale(int r, int g) const { return half_to_float(scales[tiled_index(r, g, groups())]); }
  int zero(int r, int g) const { return zeros[tiled_index(r, g, groups())]; }
};

// A small batch of activations. Rows are zero-padded to NB*32 so kernels read whole blocks.
struct Acts {
  const float* x;         // row r at x + id(r) * ldx
  const float* xsum;      // per-group sums, row r at xsum + id(r) * groups
  const int32_t* ids;     // row indirection (tokens of one expert); nullptr = rows 0..n-1
  int n, ldx, groups;
  int id(int r) const { return ids ? ids[r] : r; }
};

// Computes y[t * ldy + r] for t < a.n, r0 <= r < r1; r0 and r1 are multiples of kTileRows.
using QGemmFn = void (*)(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);

// Activations quantized once per token to int8, per 32-value block (KERNELS.md "Integer path"):
// x ~ d_b * q, d_b = max|x_b| / 127. The SIMD kernels hold one row of a tile in each 32-bit lane and decode the
// same word of 16 rows at once; a decoded register holds, in byte m of every lane, the codes of one "class" of
// the word (b = 2: values 4m + k of the word's 16, for class k = 0..3; b = 4: values 2m + k of its 8, k = 0, 1),
// and meets the same four activations in every lane (a broadcast 32-bit load). So each row of activations is
// kept in three orders, each a permutation inside every block of 32: kOrder2 (2- and 3-bit codes), kOrder4
// (4-bit) and kOrderNatural (8-bit), with the four activations of class k of word w at bytes 16w + 4k (kOrder2)
// or 8w + 4k (kOrder4). Beside them: the block scales d_b and per group sum_b d_b * sum(q_b) (the zero point).
enum ActOrder { kOrderNatural = 0, kOrder2 = 1, kOrder4 = 2, kNumOrders = 3 };

// The order a width's decoded codes come in.
constexpr int code_order(int bits) { return bits == 2 || bits == 3 ? kOrder2 : bits == 4 ? kOrder4 : kOrderNatural; }

// Value (0..31) of a block held at position p (0..31) of an order.
constexpr int order_value(int order, int p) {
  return order == kOrder2   ? 16 * (p / 16) + 4 * (p % 4) + (p % 16) / 4
         : order == kOrder4 ? 8 * (p / 8) + 2 * (p % 4) + (p % 8) / 4
                            : p;
}

constexpr bool orders_are_permutations() {
  for (int o = 0; o < kNumOrders; ++o)
    for (int v = 0; v < kBlock; ++v) {
      int hits = 0;
      for (int p = 0; p < kBlock; ++p) hits += order_value(o, p) == v;
      if (hits != 1) return false;
    }
  return true;
}
static_assert(orders_are_permutations(), "every order must hold each value of a block once");

// The 3-bit codes' high bits on the 256-bit and NEON paths, per 16 bytes (four rows' lanes; the 256-bit path
// broadcasts it to both halves): for class k of plane word w, byte m of a lane takes byte 2w + m/2 of the lane's
// high-bit word (byte shuffle / table lookup) and tests bit 4 * (m % 2) + k of it (value 16w + 4m + k).
struct HighBitTables {
  alignas(16) uint8_t byte[2][16];
  alignas(16) uint8_t bit[4][16];
};
constexpr HighBitTables high_bit_tables() {
  HighBitTables t{};
  for (int p = 0; p < 16; ++p) {
    const int lane = p / 4, m = p % 4;
    for (int w = 0; w < 2; ++w) t.byte[w][p] = static_cast<uint8_t>(4 * lane + 2 * w + m / 2);
    for (int k = 0; k < 4; ++k) t.bit[k][p] = static_cast<uint8_t>(1u << (4 * (m % 2) + k));
  }
  return t;
}
inline constexpr HighBitTables kHighBit = high_bit_tables();

struct QActs {
  const int8_t* q;     // row r at q + id(r) * ldq(): kNumOrders runs of nb * 32 codes
  const float* d;      // row r at d + id(r) * nb: block scales
  const float* gsum;   // row r at gsum + id(r) * groups
  const int32_t* ids;  // row indirection as in Acts; nullptr = rows 0..n-1
  int n, nb, groups;
  int id(int r) const { return ids ? ids[r] : r; }
  size_t ldq() const { return static_cast<size_t>(kNumOrders) * nb * kBlock; }
  const int8_t* codes(int r, int order) const { return q + id(r) * ldq() + static_cast<size_t>(order) * nb * kBlock; }
  const float* scales(int r) const { return d + static_cast<size_t>(id(r)) * nb; }
  const float* sums(int r) const { return gsum + static_cast<size_t>(id(r)) * groups; }
};

// Quantizes x[K] into one QActs row (q: ldq() bytes, d: NB floats, gsum: groups floats).
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

// The exact float-activation path (the reference of the integer paths; MOPEQ_KERNEL=scalar).
void qgemm_scalar(const QMatrix& w, const Acts& a, int r0, int r1, float* y, int ldy);

// Picks the kernel from MOPEQ_KERNEL and the CPU: "auto" (default) is the best integer path the CPU has;
// the float-activation path (scalar) stays selectable as the exact reference.
// Returns false and sets *error when the forced path is unknown or unsupported here.
bool select_kernel(KernelPath* path, const char** error);

}  // namespace mopeq
