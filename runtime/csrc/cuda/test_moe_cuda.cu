// Workbench for the CUDA mopeq.MoEExperts (docs/KERNELS.md): fresh random packed layers against a plain
// float64 CPU reference, malformed-input rejection, and a bandwidth table at OLMoE-like sizes.
//   test_moe_cuda            all checks, then the benchmark
//   test_moe_cuda --quick    small checks only (for compute-sanitizer)
//   test_moe_cuda --bench    benchmark only (to compare build variants)
// Exit 0 only when every check passes.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe_cuda.h"
#include "mopeq_format.h"

using mopeq::cuda::Code;
using mopeq::cuda::DType;
using mopeq::cuda::MoeArgs;
using mopeq::cuda::Path;
using mopeq::cuda::Status;

#define CUDA_OK(x)                                                                             \
  do {                                                                                         \
    const cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                                   \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

static int g_failures = 0;

// ---- random packed layer (host) -------------------------------------------------------------------------

// Each matrix is generated row-major ([.., rows, J], what the float64 reference reads) and then tiled into
// layout v2 ([.., rows/16, J, 16], what the kernel reads), the way packing.tile_rows does it, so the
// reference and the kernel share no addressing code.
struct HostMatrix {
  int rows, K;
  std::vector<uint32_t> codes[9];  // by width, row-major [E_b, rows, NB*b]
  std::vector<uint16_t> scales;    // row-major [E, rows, G] float16 bits
  std::vector<uint8_t> zeros;
  std::vector<uint32_t> tcodes[9];  // layout v2: [E_b, rows/16, NB*b, 16]
  std::vector<uint16_t> tscales;    // [E, rows/16, G, 16]
  std::vector<uint8_t> tzeros;
};

struct HostLayer {
  int E, H, I, g;
  std::vector<int64_t> bits;
  std::vector<int> slot;
  HostMatrix w1, w2;
};

static uint16_t half_bits(float f) { return static_cast<__half_raw>(__float2half_rn(f)).x; }

static float half_value(uint16_t b) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

// FORMAT.md §4 / packing.tile_rows: [n, rows, J] -> [n, rows/16, J, 16], i.e. NumPy's
// a.reshape(n, rows // 16, 16, J).swapaxes(2, 3).
template <class T>
static std::vector<T> tile_rows(const std::vector<T>& a, int rows, size_t J) {
  const size_t R = mopeq::kTileRows, n = J ? a.size() / (rows * J) : 0;
  if (rows % R) { std::printf("harness bug: %d rows is not a multiple of %zu\n", rows, R); std::exit(2); }
  std::vector<T> t(a.size());
  for (size_t m = 0; m < n; ++m)
    for (size_t tile = 0; tile < rows / R; ++tile)
      for (size_t rr = 0; rr < R; ++rr)  // [m, tile, rr, j] -> [m, tile, j, rr]
        for (size_t j = 0; j < J; ++j)
          t[((m * (rows / R) + tile) * J + j) * R + rr] = a[((m * (rows / R) + tile) * R + rr) * J + j];
  return t;
}

// FORMAT.md §7's tile example: a 2-bit matrix of 32 rows, K = 64 (4 words a row); row 17's word 3 is [1, 3, 1],
// flat index 113. Checks tile_rows (and mopeq::tiled_index) against the spec before anything relies on them.
static void check_tile_example() {
  std::vector<uint32_t> a(32 * 4);
  std::iota(a.begin(), a.end(), 0u);  // a[r * 4 + j] = r * 4 + j
  const std::vector<uint32_t> t = tile_rows(a, 32, 4);
  const bool ok = t[113] == 17 * 4 + 3 && mopeq::tiled_index(17, 3, 4) == 113 && t[(1 * 4 + 3) * 16 + 1] == 71 &&
                  t[0] == 0 && t[1] == 4 && t[16] == 1;
  g_failures += !ok;
  std::printf("%-4s FORMAT.md §7 tile example: row 17 word 3 at flat index 113\n", ok ? "ok" : "FAIL");
}

// Codes are random words, padding codes included: readers must stop at K (FORMAT.md §3).
static void random_matrix(HostMatrix& m, const HostLayer& L, int rows, int K, std::mt19937& rng) {
  m.rows = rows, m.K = K;
  const size_t nb = mopeq::num_blocks(K), G = mopeq::num_groups(K, L.g);
  for (int b : mopeq::kSupportedBits) {
    const size_t eb = std::count(L.bits.begin(), L.bits.end(), b);
    m.codes[b].resize(eb * rows * nb * b);
    for (auto& w : m.codes[b]) w = rng();
  }
  m.scales.resize(static_cast<size_t>(L.E) * rows * G);
  m.zeros.resize(m.scales.size());
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  for (int e = 0; e < L.E; ++e) {
    const int b = static_cast<int>(L.bits[e]);
    for (size_t i = 0; i < static_cast<size_t>(rows) * G; ++i) {
      const size_t at = static_cast<size_t>(e) * rows * G + i;
      // weights ~ 0.1/sqrt(K) in size whatever the width, so every layer has outputs of order 1
      m.scales[at] = half_bits(u(rng) * 2.f / ((1 << b) * std::sqrt(static_cast<float>(K))));
      m.zeros[at] = static_cast<uint8_t>(rng() % (1u << b));
    }
  }
  for (int b : mopeq::kSupportedBits) m.tcodes[b] = tile_rows(m.codes[b], rows, nb * b);
  m.tscales = tile_rows(m.scales, rows, G);
  m.tzeros = tile_rows(m.zeros, rows, G);
}

static HostLayer random_layer(int E, int H, int I, int g, const std::vector<int>& widths, std::mt19937& rng) {
  HostLayer L{E, H, I, g, {}, {}, {}, {}};
  for (int e = 0; e < E; ++e) L.bits.push_back(widths[e % widths.size()]);  // every listed width present
  std::shuffle(L.bits.begin(), L.bits.end(), rng);
  int count[9] = {};
  for (int64_t b : L.bits) L.slot.push_back(count[b]++);
  random_matrix(L.w1, L, 2 * I, H, rng);
  random_matrix(L.w2, L, H, I, rng);
  return L;
}

static double weight_at(const HostMatrix& m, const HostLayer& L, int e, int r, int c) {
  const int b = static_cast<int>(L.bits[e]);
  const size_t nb = mopeq::num_blocks(m.K), G = mopeq::num_groups(m.K, L.g);
  const uint32_t* row = m.codes[b].data() + (static_cast<size_t>(L.slot[e]) * m.rows + r) * nb * b;
  const uint32_t q = mopeq::code_at(row + (c / 32) * b, b, c % 32);
  const size_t s = (static_cast<size_t>(e) * m.rows + r) * G + c / L.g;
  return (static_cast<double>(q) - m.zeros[s]) * static_cast<double>(half_value(m.scales[s]));
}

// Plain definition from OPS.md, float64 throughout.
static std::vector<double> reference(const HostLayer& L, const std::vector<float>& x, const std::vector<int64_t>& idx,
                                     const std::vector<float>& wts, int T, int k, bool gelu) {
  std::vector<double> out(static_cast<size_t>(T) * L.H, 0.0), a(2 * L.I), h(L.I);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = static_cast<int>(idx[t * k + j]);
      for (int r = 0; r < 2 * L.I; ++r) {
        double s = 0;
        for (int c = 0; c < L.H; ++c) s += weight_at(L.w1, L, e, r, c) * x[static_cast<size_t>(t) * L.H + c];
        a[r] = s;
      }
      for (int i = 0; i < L.I; ++i) {
        const double v = a[i];
        const double act = gelu ? 0.5 * v * (1 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
                                : v / (1 + std::exp(-v));
        h[i] = act * a[L.I + i];
      }
      for (int r = 0; r < L.H; ++r) {
        double s = 0;
        for (int i = 0; i < L.I; ++i) s += weight_at(L.w2, L, e, r, i) * h[i];
        out[static_cast<size_t>(t) * L.H + r] += wts[t * k + j] * s;
      }
    }
  return out;
}

// ---- device copies and call arguments -------------------------------------------------------------------

template <class T>
static T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  if (v.empty()) return nullptr;
  CUDA_OK(cudaMalloc(&d, v.size() * sizeof(T)));
  CUDA_OK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct DeviceLayer {
  std::vector<void*> allocs;
  mopeq::cuda::Tensor w1[6], w2[6];
  void upload(const HostMatrix& m, const HostLayer& L, mopeq::cuda::Tensor* t) {
    const int64_t nb = mopeq::num_blocks(m.K), G = mopeq::num_groups(m.K, L.g);
    const int64_t R = mopeq::kTileRows, tiles = m.rows / R;
    for (int wi = 0; wi < 4; ++wi) {
      const int b = mopeq::kSupportedBits[wi];
      const int64_t eb = static_cast<int64_t>(m.tcodes[b].size() / (m.rows * nb * b));
      t[wi] = {to_device(m.tcodes[b]), 4, {eb, tiles, nb * b, R}};
      allocs.push_back(const_cast<void*>(t[wi].data));
    }
    t[4] = {to_device(m.tscales), 4, {L.E, tiles, G, R}};
    t[5] = {to_device(m.tzeros), 4, {L.E, tiles, G, R}};
    allocs.push_back(const_cast<void*>(t[4].data));
    allocs.push_back(const_cast<void*>(t[5].data));
  }
  explicit DeviceLayer(const HostLayer& L) { upload(L.w1, L, w1), upload(L.w2, L, w2); }
  ~DeviceLayer() {
    for (void* p : allocs) cudaFree(p);
  }
};

struct Call {  // one set of activations/routing on the device plus an args template
  MoeArgs a;
  void *x = nullptr, *idx = nullptr, *w = nullptr, *out = nullptr, *ws = nullptr;
  ~Call() {
    cudaFree(x), cudaFree(idx), cudaFree(w), cudaFree(out), cudaFree(ws);
  }
};

static void make_call(Call& c, const HostLayer& L, const DeviceLayer& D, DType dt, const std::vector<float>& x,
                      const std::vector<int64_t>& idx, const std::vector<float>& wts, int T, int k, bool gelu) {
  const size_t es = dt == DType::kFloat32 ? 4 : 2;
  auto upload_act = [&](const std::vector<float>& v) {
    std::vector<uint8_t> raw(v.size() * es);
    for (size_t i = 0; i < v.size(); ++i) {
      if (es == 4) std::memcpy(&raw[i * 4], &v[i], 4);
      else { const uint16_t hb = half_bits(v[i]); std::memcpy(&raw[i * 2], &hb, 2); }
    }
    return static_cast<void*>(to_device(raw));
  };
  c.x = upload_act(x), c.w = upload_act(wts), c.idx = to_device(idx);
  CUDA_OK(cudaMalloc(&c.out, std::max<size_t>(1, static_cast<size_t>(T) * L.H * es)));
  MoeArgs& a = c.a;
  a.dtype = dt;
  a.hidden = {c.x, 2, {T, L.H}};
  a.indices = {c.idx, 2, {T, k}};
  a.weights = {c.w, 2, {T, k}};
  std::copy(D.w1, D.w1 + 6, a.w1);
  std::copy(D.w2, D.w2 + 6, a.w2);
  a.expert_bits = L.bits.data(), a.num_expert_bits = L.E;
  a.group_size = L.g, a.layout_version = mopeq::kLayoutVersion, a.activation = gelu ? "gelu" : "silu";
  a.out = c.out;
  size_t bytes = 0;
  const Status s = mopeq_cuda_moe_workspace_bytes(a, &bytes);
  if (!s.ok()) { std::printf("workspace_bytes failed: %s\n", s.message.c_str()); std::exit(2); }
  CUDA_OK(cudaMalloc(&c.ws, bytes));
  a.workspace = c.ws, a.workspace_bytes = bytes;
}

static std::vector<float> read_out(const Call& c, int T, int H) {
  const size_t n = static_cast<size_t>(T) * H;
  std::vector<float> out(n);
  if (c.a.dtype == DType::kFloat32) {
    CUDA_OK(cudaMemcpy(out.data(), c.out, n * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> hb(n);
    CUDA_OK(cudaMemcpy(hb.data(), c.out, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = half_value(hb[i]);
  }
  return out;
}

static void random_routing(int T, int k, int E, bool repeats, std::mt19937& rng, std::vector<int64_t>* idx,
                           std::vector<float>* wts) {
  std::vector<int64_t> perm(E);
  std::iota(perm.begin(), perm.end(), 0);
  std::uniform_real_distribution<float> u(0.1f, 1.f);
  for (int t = 0; t < T; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) idx->push_back(repeats ? static_cast<int64_t>(rng() % E) : perm[j]);
    for (int j = 0; j < k; ++j) wts->push_back(u(rng));
  }
}

// ---- correctness ------------------------------------------------------------------------------------------

struct Case {
  const char* name;
  std::vector<int> widths;
  int E, H, I, g, T, k;
  bool gelu, repeats;
};

static void check_case(const Case& cs, std::mt19937& rng) {
  const HostLayer L = random_layer(cs.E, cs.H, cs.I, cs.g, cs.widths, rng);
  const DeviceLayer D(L);
  std::vector<float> x(static_cast<size_t>(cs.T) * cs.H), wts;
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(rng);
  std::vector<int64_t> idx;
  random_routing(cs.T, cs.k, cs.E, cs.repeats, rng, &idx, &wts);
  for (DType dt : {DType::kFloat32, DType::kFloat16}) {
    // The reference sees the activations and routing weights exactly as the kernel does (float16-rounded).
    std::vector<float> xr = x, wr = wts;
    if (dt == DType::kFloat16)
      for (auto* v : {&xr, &wr})
        for (auto& f : *v) f = half_value(half_bits(f));
    const std::vector<double> ref = reference(L, xr, idx, wr, cs.T, cs.k, cs.gelu);
    Call c;
    make_call(c, L, D, dt, x, idx, wts, cs.T, cs.k, cs.gelu);
    for (Path path : {Path::kAuto, Path::kDirect, Path::kGrouped}) {
      c.a.path = path;
      CUDA_OK(cudaMemset(c.out, 0xFF, static_cast<size_t>(cs.T) * cs.H * (dt == DType::kFloat32 ? 4 : 2)));  // NaN poison
      const Status s = mopeq_cuda_moe_experts(c.a, nullptr);
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<float> got = read_out(c, cs.T, cs.H);
      double num = 0, den = 0, maxd = 0, maxr = 0;
      bool finite = true;
      for (size_t i = 0; i < got.size(); ++i) {
        finite &= std::isfinite(got[i]);
        const double d = got[i] - ref[i];
        num += d * d, den += ref[i] * ref[i];
        maxd = std::max(maxd, std::fabs(d)), maxr = std::max(maxr, std::fabs(ref[i]));
      }
      const double rel = std::sqrt(num / std::max(den, 1e-300)), mx = maxd / std::max(maxr, 1e-300);
      // float32: accumulation order only; float16: the output rounding (2^-11) dominates
      const double tol_rel = dt == DType::kFloat32 ? 1e-5 : 1e-3, tol_max = dt == DType::kFloat32 ? 1e-4 : 2e-3;
      const bool ok = s.ok() && finite && rel <= tol_rel && mx <= tol_max;
      g_failures += !ok;
      const char* pname = path == Path::kAuto ? "auto" : path == Path::kDirect ? "direct" : "grouped";
      std::printf("%-4s %-34s %-4s %-7s rel_l2=%.2e max/|ref|=%.2e %s%s\n", ok ? "ok" : "FAIL", cs.name,
                  dt == DType::kFloat32 ? "f32" : "f16", pname, rel, mx, s.ok() ? "" : s.message.c_str(),
                  finite ? "" : " (non-finite or unwritten output)");
    }
  }
}

// ---- malformed inputs -------------------------------------------------------------------------------------

static void expect_reject(const char* what, const MoeArgs& a, Code want) {
  const Status s = mopeq_cuda_moe_experts(a, nullptr);
  const cudaError_t sync = cudaDeviceSynchronize();
  const bool ok = s.code == want && sync == cudaSuccess;
  g_failures += !ok;
  std::printf("%-4s reject %-30s -> %s\n", ok ? "ok" : "FAIL", what, s.ok() ? "(accepted)" : s.message.c_str());
}

static void check_rejections(std::mt19937& rng) {
  const HostLayer L = random_layer(6, 160, 96, 32, {2, 3, 4, 8}, rng);
  const DeviceLayer D(L);
  const int T = 3, k = 2;
  std::vector<float> x(T * L.H, 0.5f), wts;
  std::vector<int64_t> idx;
  random_routing(T, k, L.E, false, rng, &idx, &wts);
  Call c;
  make_call(c, L, D, DType::kFloat16, x, idx, wts, T, k, false);
  const MoeArgs good = c.a;
  { const Status s = mopeq_cuda_moe_experts(good, nullptr); g_failures += !s.ok();
    std::printf("%-4s valid call accepted\n", s.ok() ? "ok" : "FAIL"); }

  std::vector<int64_t> bits = L.bits;
  MoeArgs a = good;
  bits[0] = 5, a.expert_bits = bits.data();
  expect_reject("width 5 in expert_bits", a, Code::kInvalidArgument);
  bits = L.bits, bits[0] = bits[0] == 2 ? 4 : 2, a.expert_bits = bits.data();
  expect_reject("E_b disagrees with expert_bits", a, Code::kInvalidArgument);
  a = good, a.num_expert_bits = L.E - 1;
  expect_reject("len(expert_bits) != E", a, Code::kInvalidArgument);
  a = good, a.group_size = 48;
  expect_reject("group_size 48", a, Code::kInvalidArgument);
  a = good, a.group_size = 0;
  expect_reject("group_size 0", a, Code::kInvalidArgument);
  a = good, a.group_size = 64;  // scales still hold ceil(K/32) groups
  expect_reject("scales G != ceil(K/g)", a, Code::kInvalidArgument);
  a = good, a.layout_version = 1;
  expect_reject("layout_version 1", a, Code::kInvalidArgument);
  a = good, a.layout_version = 3;
  expect_reject("layout_version 3", a, Code::kInvalidArgument);
  a = good, a.activation = "relu";
  expect_reject("activation relu", a, Code::kInvalidArgument);
  a = good, a.hidden.rank = 3, a.hidden.shape[2] = 1;
  expect_reject("hidden rank 3", a, Code::kInvalidArgument);
  a = good, a.weights.shape[1] = k + 1;
  expect_reject("weights [T, k+1]", a, Code::kInvalidArgument);
  a = good, a.indices.shape[0] = T + 1;
  expect_reject("indices [T+1, k]", a, Code::kInvalidArgument);
  a = good, a.w2[1].shape[2] += 3;
  expect_reject("w2.q3 words per row", a, Code::kInvalidArgument);
  a = good, a.w1[5].shape[1] -= 1;
  expect_reject("w1.zeros tiles", a, Code::kInvalidArgument);
  a = good, a.w2[4].shape[3] = 8;
  expect_reject("w2.scales tiles of 8 rows", a, Code::kInvalidArgument);
  a = good, a.w1[4].shape[3] = 8;
  expect_reject("w1.scales tiles of 8 rows", a, Code::kInvalidArgument);
  // The layout-v1 shapes of the same layer: [E_b, rows, NB*b] codes, [E, rows, G] scales and zeros.
  const struct { bool w2; int i; const char* name; } v1_shapes[] = {
      {false, 0, "w1.q2"}, {false, 4, "w1.scales"}, {true, 1, "w2.q3"}, {true, 5, "w2.zeros"}};
  for (const auto& v : v1_shapes) {
    a = good;
    mopeq::cuda::Tensor& t = (v.w2 ? a.w2 : a.w1)[v.i];
    t.shape[1] *= mopeq::kTileRows, t.rank = 3;  // [.., rows, J]
    expect_reject((std::string(v.name) + " as v1 [.., rows, J]").c_str(), a, Code::kInvalidArgument);
  }
  // Rows not a multiple of 16: H = 152 (w2's rows); w1's rows 2I come from w1.scales' tile count, so they can't be.
  a = good, a.hidden.shape[1] = L.H - 8;
  expect_reject("H not a multiple of 16", a, Code::kInvalidArgument);
  a = good, a.w1[0].data = static_cast<const char*>(a.w1[0].data) + 4;
  expect_reject("misaligned w1.q2", a, Code::kInvalidArgument);
  a = good, a.workspace_bytes = 64;
  expect_reject("workspace too small", a, Code::kInvalidArgument);

  // Index values are only known on the device: never read out of bounds, flag, report with check_indices.
  for (int64_t bad : {static_cast<int64_t>(L.E), int64_t{-1}, int64_t{1} << 40}) {
    std::vector<int64_t> bidx = idx;
    bidx[1 * k + 1] = bad;  // token 1, slot 1
    CUDA_OK(cudaMemcpy(c.idx, bidx.data(), bidx.size() * 8, cudaMemcpyHostToDevice));
    for (Path p : {Path::kDirect, Path::kGrouped}) {
      a = good, a.path = p;
      const std::string what = "index " + std::to_string(bad) + (p == Path::kDirect ? " direct" : " grouped");
      expect_reject(what.c_str(), a, Code::kBadIndex);
    }
    a = good, a.check_indices = false;
    const Status s = mopeq_cuda_moe_experts(a, nullptr);
    const bool ok = s.ok() && cudaDeviceSynchronize() == cudaSuccess;
    g_failures += !ok;
    std::printf("%-4s index %lld without check_indices: no fault, call returns ok\n", ok ? "ok" : "FAIL",
                static_cast<long long>(bad));
  }
  CUDA_OK(cudaMemcpy(c.idx, idx.data(), idx.size() * 8, cudaMemcpyHostToDevice));
  const Status s = mopeq_cuda_moe_experts(good, nullptr);
  g_failures += !s.ok();
  std::printf("%-4s valid call after the rejections\n", s.ok() ? "ok" : "FAIL");
}

// ---- benchmark --------------------------------------------------------------------------------------------

static double d2d_gbps() {
  const size_t n = size_t{512} << 20;
  void *a = nullptr, *b = nullptr;
  CUDA_OK(cudaMalloc(&a, n));
  CUDA_OK(cudaMalloc(&b, n));
  CUDA_OK(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) CUDA_OK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
  const int reps = 20;
  CUDA_OK(cudaEventRecord(e0));
  for (int i = 0; i < reps; ++i) CUDA_OK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, n, cudaMemcpyDeviceToDevice));
  CUDA_OK(cudaEventRecord(e1));
  CUDA_OK(cudaEventSynchronize(e1));
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
  cudaFree(a), cudaFree(b);
  return 2.0 * n * reps / (ms * 1e-3) / 1e9;  // bytes read + bytes written
}

static size_t expert_bytes(const HostLayer& L, int e) {
  const int b = static_cast<int>(L.bits[e]);
  auto m = [&](int rows, int K) {
    return static_cast<size_t>(rows) * (mopeq::num_blocks(K) * b * 4 + mopeq::num_groups(K, L.g) * 3);
  };
  return m(2 * L.I, L.H) + m(L.H, L.I);
}

static void bench(std::mt19937& rng) {
  const double copy = d2d_gbps();
  // OLMoE-like layer: 64 experts, H 2048, I 1024, top-8, g 128; widths 40x2 + 16x3 + 8x4 = 2.5 bits average
  std::vector<int> widths;
  for (int i = 0; i < 64; ++i) widths.push_back(i < 40 ? 2 : i < 56 ? 3 : 4);
  const HostLayer L = random_layer(64, 2048, 1024, 128, widths, rng);
  const DeviceLayer D(L);
  std::printf("\nbench layer: E=64 H=2048 I=1024 k=8 g=128, widths 40x2/16x3/8x4 (2.5 bits avg)\n");
  std::printf("device-to-device copy: %.0f GB/s (read + write, cudaMemcpyAsync of 512 MiB)\n\n", copy);
  std::printf("| T | act | path | us/call stream | us/call graph | weight MB/call | GB/s (graph) | of D2D |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  struct Row { int T; DType dt; Path path; };
  const Row rows[] = {{1, DType::kFloat16, Path::kAuto},  {1, DType::kFloat32, Path::kAuto},
                      {1, DType::kFloat16, Path::kGrouped}, {4, DType::kFloat16, Path::kAuto},
                      {37, DType::kFloat16, Path::kAuto}, {256, DType::kFloat16, Path::kAuto}};
  for (const Row& r : rows) {
    const int k = 8, sets = 8;
    // 8 routings; at T=1 they use disjoint experts, so one replay cycle touches 64 experts (~140 MB > L2).
    std::vector<int64_t> perm(64);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<Call> calls(sets);
    double bytes = 0;
    std::normal_distribution<float> nd;
    for (int s = 0; s < sets; ++s) {
      std::vector<float> x(static_cast<size_t>(r.T) * L.H), wts;
      for (auto& v : x) v = nd(rng);
      std::vector<int64_t> idx;
      if (r.T == 1) {
        idx.assign(perm.begin() + 8 * s, perm.begin() + 8 * s + 8);
        wts.assign(8, 0.125f);
      } else {
        random_routing(r.T, k, 64, false, rng, &idx, &wts);
      }
      std::vector<bool> used(64, false);
      for (int64_t e : idx) used[e] = true;
      for (int e = 0; e < 64; ++e) bytes += used[e] ? expert_bytes(L, e) : 0;
      make_call(calls[s], L, D, r.dt, x, idx, wts, r.T, k, false);
      calls[s].a.path = r.path, calls[s].a.check_indices = false;
    }
    bytes /= sets;
    cudaStream_t st;
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto launch = [&](int i) {
      const Status s = mopeq_cuda_moe_experts(calls[i % sets].a, st);
      if (!s.ok()) { std::printf("bench call failed: %s\n", s.message.c_str()); std::exit(2); }
    };
    for (int i = 0; i < 40; ++i) launch(i);  // warm-up: module load, smem attributes
    CUDA_OK(cudaStreamSynchronize(st));
    cudaEvent_t e0, e1;
    CUDA_OK(cudaEventCreate(&e0));
    CUDA_OK(cudaEventCreate(&e1));
    const int n = r.T >= 256 ? 80 : 800;
    CUDA_OK(cudaEventRecord(e0, st));
    for (int i = 0; i < n; ++i) launch(i);
    CUDA_OK(cudaEventRecord(e1, st));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms_stream = 0;
    CUDA_OK(cudaEventElapsedTime(&ms_stream, e0, e1));
    // The same 8 calls captured once as a graph: launch gaps gone, as under ORT with CUDA graphs.
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < sets; ++i) launch(i);
    CUDA_OK(cudaStreamEndCapture(st, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; ++i) CUDA_OK(cudaGraphLaunch(exec, st));
    const int reps = n / sets;
    CUDA_OK(cudaEventRecord(e0, st));
    for (int i = 0; i < reps; ++i) CUDA_OK(cudaGraphLaunch(exec, st));
    CUDA_OK(cudaEventRecord(e1, st));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms_graph = 0;
    CUDA_OK(cudaEventElapsedTime(&ms_graph, e0, e1));
    const double us_s = 1e3 * ms_stream / n, us_g = 1e3 * ms_graph / (reps * sets), gbps = bytes / (us_g * 1e-6) / 1e9;
    std::printf("| %d | %s | %s | %.1f | %.1f | %.1f | %.0f | %.0f%% |\n", r.T, r.dt == DType::kFloat32 ? "f32" : "f16",
                r.path == Path::kGrouped ? "grouped" : r.T * k <= 16 ? "auto(direct)" : "auto(grouped)", us_s, us_g,
                bytes / 1e6, gbps, 100 * gbps / copy);
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamDestroy(st));
  }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool bench_only = argc > 1 && std::strcmp(argv[1], "--bench") == 0;
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs, L2 %d MB)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  std::mt19937 rng(20251117);
  const std::vector<int> all = {2, 3, 4, 8};
  std::vector<Case> cases = {
      {"mixed 2/3/4/8 K=160/96 g32 T1 k2", all, 8, 160, 96, 32, 1, 2, false, false},
      {"mixed K=192/160 g64 T37 k4", all, 16, 192, 160, 64, 37, 4, false, false},
      {"mixed K=112/104 g128 T37 k8", all, 12, 112, 104, 128, 37, 8, false, false},  // I % 16 = 8: a tile holds gate and up rows
      {"only 3-bit K=256/192 g32 T1 k1", {3}, 6, 256, 192, 32, 1, 1, false, false},
      {"2+8 only K=160/104 g64 T37 k3 gelu", {2, 8}, 10, 160, 104, 64, 37, 3, true, false},
      {"one tile each: H16 I8 T3 k2", all, 5, 16, 8, 32, 3, 2, false, false},
      {"only 4-bit g32 T2 k4 repeated experts", {4}, 4, 96, 64, 32, 2, 4, false, true},
      {"mixed E8 k8 T37 (all experts busy)", all, 8, 128, 96, 32, 37, 8, false, false},
      {"mixed g256 K=288/320 T5 k6", all, 9, 288, 320, 256, 5, 6, false, false},
  };
  if (!quick) {
    cases.push_back({"mixed T600 (two token chunks) k2", all, 8, 128, 64, 32, 600, 2, false, false});
    cases.push_back({"OLMoE size E64 H2048 I1024 g128 T1 k8", {2, 3, 4}, 64, 2048, 1024, 128, 1, 8, false, false});
    cases.push_back({"OLMoE size T4 k8", {2, 3, 4}, 64, 2048, 1024, 128, 4, 8, false, false});
  }
  if (!bench_only) {
    check_tile_example();
    for (const Case& c : cases) check_case(c, rng);
    check_rejections(rng);
    std::printf("\n%s: %d failure(s)\n", g_failures ? "FAILED" : "all checks passed", g_failures);
  }
  if (!quick) bench(rng);
  return g_failures ? 1 : 0;
}
