// The ORT-free part of mopeq.MoEExperts: routing, token grouping, threading plan, activation, combine.
// Inputs are already validated by op.cc; nothing here checks shapes.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace mopeq {

enum class Activation { kSilu, kGelu };

// Views of one layer's packed tensors (FORMAT.md §4), indexed by width for the codes.
struct LayerView {
  int E, H, I, group_size;
  const int* bits;   // [E]
  const int* slots;  // [E]
  const uint32_t* w1_codes[9];  // by width; [E_b, 2I/16, NB(H)*b, 16] (FORMAT.md §4)
  const uint32_t* w2_codes[9];  // [E_b, H/16, NB(I)*b, 16]
  // scales and zeros: [E, rows/16, G, 16]
  const uint16_t *w1_scales, *w2_scales;
  const uint8_t *w1_zeros, *w2_zeros;
  QMatrix w1(int e) const;
  QMatrix w2(int e) const;
};

// Runs fn(data, i) for i < total, possibly in parallel (ORT's intra-op pool in op.cc).
struct Parallel {
  void (*run)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data);
  void* ctx;
  void operator()(void (*fn)(void*, size_t), size_t total, void* data) const { run(ctx, fn, total, data); }
};

// out[t] = sum_j weights[t,j] * expert_{indices[t,j]}(x[t]); x, weights, out float32 [T, H] / [T, k].
void moe_forward(const LayerView& layer, const float* x, const int64_t* indices, const float* weights,
                 int T, int k, Activation act, const KernelPath& kernel, const Parallel& par, float* out);

}  // namespace mopeq
