// Plan of one call: tokens are bucketed by expert, so each routed expert's codes are streamed once per
// chunk of tokens and reused across its tokens inside the kernel (a small GEMM; a GEMV for one token).
//
//   x [T,H] ──► for each expert e: A_e = W1_e · x[tokens of e]    (tasks: expert × 64 rows)
//           ──► h = act(A[:, :I]) * A[:, I:]                      (per (token, slot) pair)
//           ──► Y_e = W2_e · h_e                                  (tasks: expert × 64 rows)
//           ──► out[t] = Σ_j weights[t,j] · Y[pair(t,j)]          (per token, slot order: deterministic)
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mopeq {

QMatrix LayerView::w1(int e) const {
  const int rows = 2 * I, words = static_cast<int>(num_blocks(H)) * bits[e];
  const size_t sg = static_cast<size_t>(e) * rows * num_groups(H, group_size);
  return {w1_codes[bits[e]] + static_cast<size_t>(slots[e]) * rows * words, w1_scales + sg, w1_zeros + sg,
          bits[e], rows, H, group_size};
}

QMatrix LayerView::w2(int e) const {
  const int rows = H, words = static_cast<int>(num_blocks(I)) * bits[e];
  const size_t sg = static_cast<size_t>(e) * rows * num_groups(I, group_size);
  return {w2_codes[bits[e]] + static_cast<size_t>(slots[e]) * rows * words, w2_scales + sg, w2_zeros + sg,
          bits[e], rows, I, group_size};
}

namespace {

constexpr int kChunkTokens = 256;  // bounds scratch memory (A and Y are [pairs, 2I] / [pairs, H])
constexpr int kRowsPerTask = 64;   // enough tasks to balance threads even for one token

struct Task { int e, r0, r1; };

template <class F>
void parallel(const Parallel& par, size_t n, F& f) {
  par([](void* d, size_t i) { (*static_cast<F*>(d))(i); }, n, &f);
}

float activate(float v, Activation act) {
  if (act == Activation::kSilu) return v / (1.f + std::exp(-v));
  return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// Copies rows into a zero-padded buffer [n, ld] and sums each group (kernels subtract z * sum(x_g)).
void pad_and_sum(const float* src, int K, int g, float* dst, int ld, float* sums) {
  if (src != dst) std::copy(src, src + K, dst);  // the gate step pads its own buffer in place
  std::fill(dst + K, dst + ld, 0.f);
  for (int gi = 0; gi * g < K; ++gi) {
    float s = 0.f;
    for (int c = gi * g; c < std::min(K, (gi + 1) * g); ++c) s += src[c];
    sums[gi] = s;
  }
}

std::vector<Task> row_tasks(const std::vector<int32_t>& offset, int rows) {
  std::vector<Task> tasks;
  for (int e = 0; e + 1 < static_cast<int>(offset.size()); ++e)
    if (offset[e + 1] > offset[e])
      for (int r = 0; r < rows; r += kRowsPerTask) tasks.push_back({e, r, std::min(rows, r + kRowsPerTask)});
  return tasks;
}

void forward_chunk(const LayerView& L, const float* x, const int64_t* idx, const float* wts, int n, int k,
                   Activation act, QGemmFn gemm, const Parallel& par, float* out) {
  const int H = L.H, I = L.I, g = L.group_size, P = n * k;
  const int ldH = static_cast<int>(num_blocks(H)) * kBlock, G1 = static_cast<int>(num_groups(H, g));
  const int ldI = static_cast<int>(num_blocks(I)) * kBlock, G2 = static_cast<int>(num_groups(I, g));

  // Counting sort of (token, slot) pairs by expert; stable, so results do not depend on threads.
  std::vector<int32_t> offset(L.E + 1, 0), pair_token(P), pair_of(P);
  for (int p = 0; p < P; ++p) ++offset[idx[p] + 1];
  for (int e = 0; e < L.E; ++e) offset[e + 1] += offset[e];
  std::vector<int32_t> fill(offset.begin(), offset.end() - 1);
  for (int p = 0; p < P; ++p) {
    const int dst = fill[idx[p]]++;
    pair_token[dst] = p / k;
    pair_of[p] = dst;
  }

  std::vector<float> xp(static_cast<size_t>(n) * ldH), xs(static_cast<size_t>(n) * G1);
  for (int t = 0; t < n; ++t)
    pad_and_sum(x + static_cast<size_t>(t) * H, H, g, &xp[static_cast<size_t>(t) * ldH], ldH, &xs[static_cast<size_t>(t) * G1]);

  std::vector<float> a(static_cast<size_t>(P) * 2 * I);
  const std::vector<Task> t1 = row_tasks(offset, 2 * I);
  auto gemm1 = [&](size_t i) {
    const Task& tk = t1[i];
    const int first = offset[tk.e];
    const Acts acts{xp.data(), xs.data(), &pair_token[first], offset[tk.e + 1] - first, ldH, G1};
    gemm(L.w1(tk.e), acts, tk.r0, tk.r1, &a[static_cast<size_t>(first) * 2 * I], 2 * I);
  };
  parallel(par, t1.size(), gemm1);

  std::vector<float> h(static_cast<size_t>(P) * ldI), hs(static_cast<size_t>(P) * G2);
  auto gate = [&](size_t p) {
    float* hp = &h[p * ldI];
    const float* ap = &a[p * 2 * I];
    for (int c = 0; c < I; ++c) hp[c] = activate(ap[c], act) * ap[I + c];
    pad_and_sum(hp, I, g, hp, ldI, &hs[p * G2]);
  };
  parallel(par, static_cast<size_t>(P), gate);

  std::vector<float> y(static_cast<size_t>(P) * H);
  const std::vector<Task> t2 = row_tasks(offset, H);
  auto gemm2 = [&](size_t i) {
    const Task& tk = t2[i];
    const size_t first = offset[tk.e];
    const Acts acts{&h[first * ldI], &hs[first * G2], nullptr, offset[tk.e + 1] - offset[tk.e], ldI, G2};
    gemm(L.w2(tk.e), acts, tk.r0, tk.r1, &y[first * H], H);
  };
  parallel(par, t2.size(), gemm2);

  auto combine = [&](size_t t) {
    float* o = out + t * H;
    std::fill(o, o + H, 0.f);
    for (int j = 0; j < k; ++j) {
      const float w = wts[t * k + j];
      const float* yp = &y[static_cast<size_t>(pair_of[t * k + j]) * H];
      for (int c = 0; c < H; ++c) o[c] += w * yp[c];
    }
  };
  parallel(par, static_cast<size_t>(n), combine);
}

}  // namespace

void moe_forward(const LayerView& layer, const float* x, const int64_t* indices, const float* weights, int T,
                 int k, Activation act, QGemmFn gemm, const Parallel& par, float* out) {
  for (int t0 = 0; t0 < T; t0 += kChunkTokens) {
    const int n = std::min(kChunkTokens, T - t0);
    const size_t tk = static_cast<size_t>(t0) * k;
    forward_chunk(layer, x + static_cast<size_t>(t0) * layer.H, indices + tk, weights + tk, n, k, act, gemm, par,
                  out + static_cast<size_t>(t0) * layer.H);
  }
}

}  // namespace mopeq
