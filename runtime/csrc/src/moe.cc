// Plan of one call: tokens are bucketed by expert, so each routed expert's codes are streamed once per
// chunk of tokens and reused across its tokens inside the kernel (a small GEMM; a GEMV for one token).
// Integer paths quantize x once per token and h once per (token, slot) pair (kernels.h, QActs).
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
// Rows per task: a task's tiles are one contiguous stream (128 KiB of 2-bit codes at K = 2048). With 64-row
// tasks two threads took alternate 32 KiB pieces of one expert and each piece restarted the prefetchers:
// OLMoE-like layer, T = 1, AMD EPYC: 1007 / 1095 us on 1 / 2 threads against 933 / 604 with 256 rows.
constexpr int kRowsPerTask = 256;

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
  std::copy(src, src + K, dst);
  std::fill(dst + K, dst + ld, 0.f);
  for (int gi = 0; gi * g < K; ++gi) {
    float s = 0.f;
    for (int c = gi * g; c < std::min(K, (gi + 1) * g); ++c) s += src[c];
    sums[gi] = s;
  }
}

// The activations [n, K] a kernel reads, in the form its path takes: float rows padded to whole blocks with
// group sums, or int8 rows (quantize_acts). Buffers only grow, so steady decoding allocates nothing.
struct Activations {
  bool int8 = false;
  int K = 0, g = 0, ld = 0, G = 0, nb = 0;
  std::vector<float> x, xs, d, gs;
  std::vector<int8_t> q;

  void reset(bool i8, int n, int k, int group) {
    int8 = i8, K = k, g = group, G = static_cast<int>(num_groups(k, group));
    nb = static_cast<int>(num_blocks(k)), ld = nb * kBlock;
    const QActs shape{nullptr, nullptr, nullptr, nullptr, 0, nb, G};
    grow(gs, static_cast<size_t>(n) * G);
    if (int8) {
      grow(q, n * shape.ldq()), grow(d, static_cast<size_t>(n) * nb);
    } else {
      grow(x, static_cast<size_t>(n) * ld), grow(xs, static_cast<size_t>(n) * G);
    }
  }
  template <class T>
  static void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }
  // Row i from src[K]; src may be scratch the caller reuses afterwards.
  void set_row(size_t i, const float* src) {
    if (int8) {
      const QActs s = view(nullptr, 0, 0);
      quantize_acts(src, K, g, &q[i * s.ldq()], &d[i * nb], &gs[i * G]);
    } else {
      pad_and_sum(src, K, g, &x[i * ld], ld, &xs[i * G]);
    }
  }
  // Rows first.. of the buffer, or (ids) rows ids[0..n) of it.
  Acts f32(const int32_t* ids, size_t first, int n) const { return {&x[first * ld], &xs[first * G], ids, n, ld, G}; }
  QActs view(const int32_t* ids, size_t first, int n) const {
    QActs a{nullptr, nullptr, nullptr, ids, n, nb, G};
    a.q = q.data() + first * a.ldq(), a.d = d.data() + first * nb, a.gsum = gs.data() + first * G;
    return a;
  }
};

void gemm(const KernelPath& k, const QMatrix& w, const Activations& a, const int32_t* ids, size_t first, int n,
          int r0, int r1, float* y, int ldy) {
  if (k.i8)
    k.i8(w, a.view(ids, first, n), r0, r1, y, ldy);
  else
    k.f32(w, a.f32(ids, first, n), r0, r1, y, ldy);
}

// Scratch of one call, kept per thread (ORT may run several sessions' nodes on different threads): in steady
// decoding a call allocates nothing.
struct Workspace {
  Activations x, h;
  std::vector<float> a, y;
  std::vector<int32_t> offset, fill, pair_token, pair_of;
  std::vector<Task> t1, t2;
};

void row_tasks(const std::vector<int32_t>& offset, int rows, std::vector<Task>& tasks) {
  tasks.clear();
  for (int e = 0; e + 1 < static_cast<int>(offset.size()); ++e)
    if (offset[e + 1] > offset[e])
      for (int r = 0; r < rows; r += kRowsPerTask) tasks.push_back({e, r, std::min(rows, r + kRowsPerTask)});
}

void forward_chunk(const LayerView& L, const float* x, const int64_t* idx, const float* wts, int n, int k,
                   Activation act, const KernelPath& kernel, const Parallel& par, Workspace& ws, float* out) {
  const int H = L.H, I = L.I, P = n * k;

  // Counting sort of (token, slot) pairs by expert; stable, so results do not depend on threads.
  std::vector<int32_t>&offset = ws.offset, &fill = ws.fill, &pair_token = ws.pair_token, &pair_of = ws.pair_of;
  offset.assign(L.E + 1, 0), pair_token.resize(P), pair_of.resize(P);
  for (int p = 0; p < P; ++p) ++offset[idx[p] + 1];
  for (int e = 0; e < L.E; ++e) offset[e + 1] += offset[e];
  fill.assign(offset.begin(), offset.end() - 1);
  for (int p = 0; p < P; ++p) {
    const int dst = fill[idx[p]]++;
    pair_token[dst] = p / k;
    pair_of[p] = dst;
  }

  const bool i8 = kernel.i8 != nullptr;
  ws.x.reset(i8, n, H, L.group_size);
  for (int t = 0; t < n; ++t) ws.x.set_row(t, x + static_cast<size_t>(t) * H);

  Activations::grow(ws.a, static_cast<size_t>(P) * 2 * I);
  float* a = ws.a.data();
  row_tasks(offset, 2 * I, ws.t1);
  const std::vector<Task>& t1 = ws.t1;
  auto gemm1 = [&](size_t i) {
    const Task& tk = t1[i];
    const int first = offset[tk.e];
    gemm(kernel, L.w1(tk.e), ws.x, &pair_token[first], 0, offset[tk.e + 1] - first, tk.r0, tk.r1,
         a + static_cast<size_t>(first) * 2 * I, 2 * I);
  };
  parallel(par, t1.size(), gemm1);

  ws.h.reset(i8, P, I, L.group_size);
  auto gate = [&](size_t p) {
    thread_local std::vector<float> hp;
    Activations::grow(hp, I);
    const float* ap = a + p * 2 * I;
    for (int c = 0; c < I; ++c) hp[c] = activate(ap[c], act) * ap[I + c];
    ws.h.set_row(p, hp.data());
  };
  parallel(par, static_cast<size_t>(P), gate);

  Activations::grow(ws.y, static_cast<size_t>(P) * H);
  float* y = ws.y.data();
  row_tasks(offset, H, ws.t2);
  const std::vector<Task>& t2 = ws.t2;
  auto gemm2 = [&](size_t i) {
    const Task& tk = t2[i];
    const size_t first = offset[tk.e];
    gemm(kernel, L.w2(tk.e), ws.h, nullptr, first, offset[tk.e + 1] - offset[tk.e], tk.r0, tk.r1, y + first * H, H);
  };
  parallel(par, t2.size(), gemm2);

  auto combine = [&](size_t t) {
    float* o = out + t * H;
    std::fill(o, o + H, 0.f);
    for (int j = 0; j < k; ++j) {
      const float w = wts[t * k + j];
      const float* yp = y + static_cast<size_t>(pair_of[t * k + j]) * H;
      for (int c = 0; c < H; ++c) o[c] += w * yp[c];
    }
  };
  parallel(par, static_cast<size_t>(n), combine);
}

}  // namespace

void moe_forward(const LayerView& layer, const float* x, const int64_t* indices, const float* weights, int T,
                 int k, Activation act, const KernelPath& kernel, const Parallel& par, float* out) {
  thread_local Workspace ws;
  for (int t0 = 0; t0 < T; t0 += kChunkTokens) {
    const int n = std::min(kChunkTokens, T - t0);
    const size_t tk = static_cast<size_t>(t0) * k;
    forward_chunk(layer, x + static_cast<size_t>(t0) * layer.H, indices + tk, weights + tk, n, k, act, kernel, par,
                  ws, out + static_cast<size_t>(t0) * layer.H);
  }
}

}  // namespace mopeq
