// MoPEQ packed expert format, layout v2 (docs/FORMAT.md). The one C++ copy of the layout constants;
// tests/test_packing.py checks them against mopeq_export/quantize/packing.py.
#pragma once
#include <cstdint>

#define MOPEQ_LAYOUT_VERSION 2

namespace mopeq {

constexpr int kLayoutVersion = MOPEQ_LAYOUT_VERSION;
constexpr int kBlock = 32;  // codes per block; a block of width b is exactly b uint32 words
constexpr int kTileRows = 16;  // an expert matrix is stored in tiles of 16 rows: word j of row r at [r/16, j, r%16]
constexpr int kSupportedBits[] = {2, 3, 4, 8};
constexpr int kGroupSizes[] = {32, 64, 128, 256};  // offered by the quantizer; readers take any multiple of kBlock

constexpr bool is_supported_bits(int b) {
  for (int s : kSupportedBits) if (s == b) return true;
  return false;
}

constexpr bool all_blocks_whole_words() {
  // b words per block only works if a block holds exactly b*32 bits and (b != 3) a word holds whole codes.
  for (int b : kSupportedBits) if (kBlock * b != 32 * b || (b != 3 && 32 % b != 0)) return false;
  return true;
}

constexpr bool groups_are_whole_blocks() {
  for (int g : kGroupSizes) if (g <= 0 || g % kBlock != 0) return false;
  return true;
}

static_assert(sizeof(uint32_t) == 4, "codes are little-endian uint32 words");
static_assert(kBlock == 32, "layout v2 packs 32 codes per block");
static_assert(all_blocks_whole_words(), "every width must pack a block into exactly b words");
static_assert(groups_are_whole_blocks(), "group sizes must be multiples of the block");
static_assert(is_supported_bits(3) && !is_supported_bits(5), "width table");

constexpr int64_t num_blocks(int64_t k) { return (k + kBlock - 1) / kBlock; }
constexpr int64_t num_groups(int64_t k, int64_t g) { return (k + g - 1) / g; }

// Index of element (r, j) of a tiled matrix with J elements per row (codes: J = NB * b words; scales and zero
// points: J = G), FORMAT.md §4.
constexpr int64_t tiled_index(int64_t r, int64_t j, int64_t J) {
  return ((r / kTileRows) * J + j) * kTileRows + r % kTileRows;
}

// Code i (0..31) of one block whose word w is block[w * stride] (1 in a row-major row, kTileRows in a tile),
// exactly per FORMAT.md §3; the scalar kernels and tests use this.
inline uint32_t code_at(const uint32_t* block, int bits, int i, int stride = 1) {
  if (bits == 3)  // 2-bit plane in words 0-1, bit 2 in word 2 at bit i
    return ((block[(i >> 4) * stride] >> (2 * (i & 15))) & 0b11u) | (((block[2 * stride] >> i) & 0b1u) << 2);
  const int per_word = 32 / bits;
  return (block[(i / per_word) * stride] >> (bits * (i % per_word))) & ((1u << bits) - 1u);
}

}  // namespace mopeq
