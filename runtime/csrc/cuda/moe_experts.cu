// mopeq.MoEExperts on CUDA: dequantize-in-registers GEMV over the routed experts (docs/KERNELS.md).
//
//   hidden [T,H] ─► stage 1, per (group, 16 gate rows): a = W1_e·x, h = act(a[:I]) ⊙ a[I:] ─► h [P, I] f32
//                ─► stage 2, per (group, 32 rows):      y = W2_e·h                     ─► y [P, H] f32
//                ─► combine, per token:                 out[t] = Σ_j weights[t,j]·y[t·k+j] (slot order)
//
// A group is one expert with the (token, slot) pairs routed to it. Decode (T·k <= 16) takes one group per
// pair straight from `indices` (no routing launch); prefill first sorts pairs by expert (route_pairs), so a
// CTA streams its rows of W_e from memory once and applies them to all of e's tokens, 4 at a time.
//
// Weights are read in FORMAT.md layout v2: each expert matrix in tiles of 16 rows, word j of row r at
// ((r / 16)·J + j)·16 + r % 16 (J = NB·b words; scales and zeros alike with J = G).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <sstream>

#include "moe_cuda.h"
#include "mopeq_format.h"

namespace mopeq {
namespace cuda {
namespace {

#ifndef MOPEQ_CUDA_WARPS  // overridable only to compare variants in the benchmark (scripts/cuda_check.sh)
#define MOPEQ_CUDA_WARPS 8
#endif
constexpr int kWarps = MOPEQ_CUDA_WARPS;  // per CTA: one staged copy of x serves all its warps' rows
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;               // rows per warp; stage 1 takes 2 gate rows and their 2 up rows
constexpr int kXStride = 36;           // floats per staged block of 32: +4 makes lane-per-block LDS.128 conflict-free
constexpr int kDirectMaxPairs = 16;    // above this, reading each expert once beats skipping the routing launch
constexpr int kChunkTokens = 512;      // bounds the scratch (h and y are [T·k, I] and [T·k, H] float32)
constexpr int kGroupTokens = 4;        // tokens per pass in grouped mode: decoded codes are reused 4 times
constexpr int kMaxExperts = 512;       // the offset table rides in the kernel parameters (1 KB)
static_assert(kLayoutVersion == 2 && kTileRows == 16, "this kernel addresses FORMAT.md layout v2 (16-row tiles)");
static_assert(kRows == 4 && kTileRows % kRows == 0, "load_block reads a warp's 4 rows from one tile");

struct DevMat {
  const uint32_t* codes[9];  // by width b: [E_b, rows/16, nb * b, 16]
  const __half* scales;      // [E, rows/16, G, 16]
  const uint8_t* zeros;      // [E, rows/16, G, 16]
  int rows, K, nb, G;
};

struct DevLayer {
  DevMat w1, w2;
  int E, H, I, k, blocks_per_group, gelu;
  uint16_t expert[kMaxExperts];  // (slot << 4) | bits: FORMAT.md §4's offset table
};

struct Groups {  // output of route_pairs, in the workspace
  int* count;    // [1] number of experts with at least one valid pair
  int* expert;   // [gmax]
  int* start;    // [gmax + 1] into pairs
  int* pairs;    // [P] pair ids (t·k + j) sorted by expert
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Code i (0..31) of a block of width B as the float 1 + q·2^-B. The code goes straight into the top B
// mantissa bits under the exponent of 1.0, so a shift and an AND-OR replace an int->float conversion
// (I2F issues at a quarter of the integer rate). After unrolling, i is a constant: so are the word, the
// shift and its direction (FORMAT.md §3; 3-bit = 2-bit plane in words 0-1 + bit i of word 2).
template <int B>
__device__ __forceinline__ float code_as_float(const uint32_t (&w)[B], int i) {
  auto move = [](uint32_t x, int from, int to) { return from >= to ? x >> (from - to) : x << (to - from); };
  constexpr uint32_t kOne = 0x3F800000u;
  if constexpr (B == 3) {
    const uint32_t lo = move(w[i >> 4], 2 * (i & 15), 20) & 0x00300000u;
    const uint32_t hi = move(w[2], i, 22) & 0x00400000u;
    return __uint_as_float(lo | hi | kOne);
  } else {
    constexpr int per = 32 / B, top = 23 - B;
    constexpr uint32_t mask = ((1u << B) - 1u) << top;
    return __uint_as_float((move(w[i / per], B * (i % per), top) & mask) | kOne);
  }
}

// One block's B words for all kRows rows of a warp (layout v2, FORMAT.md §4). In a tile, word j of 16
// consecutive rows is 64 contiguous bytes, and a warp's rows come in runs of consecutive rows inside one tile:
// stage 2 owns rows 4u..4u+3, so word j of all four is one 16-byte uint4; stage 1 owns 2 gate rows g, g+1
// and their up rows I+g, I+g+1 (g even, I a multiple of 8), two 8-byte uint2. p0 (p1) points at word 0 of
// the block for row[0] (row[2]); word q is kTileRows words further per q. Lanes read consecutive blocks, so
// one warp load touches 32 sectors of which it uses 16 (stage 2) or 8 (stage 1) bytes each; the CTA's other
// warps read the rest of those sectors (a CTA covers whole tiles: 32 rows, or 16 gate + 16 up rows).
template <int B, int kStage>
__device__ __forceinline__ void load_block(const uint32_t* p0, const uint32_t* p1, uint32_t (&w)[kRows][B]) {
#pragma unroll
  for (int q = 0; q < B; ++q) {
    if constexpr (kStage == 2) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p0 + q * kTileRows));
      w[0][q] = v.x, w[1][q] = v.y, w[2][q] = v.z, w[3][q] = v.w;
    } else {
      const uint2 g = __ldg(reinterpret_cast<const uint2*>(p0 + q * kTileRows));
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(p1 + q * kTileRows));
      w[0][q] = g.x, w[1][q] = g.y, w[2][q] = u.x, w[3][q] = u.y;
    }
  }
}

__device__ __forceinline__ float activate(float v, int gelu) {
  if (!gelu) return v / (1.f + __expf(-v));
  return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// The pairs one CTA works on: a whole group in grouped mode, a single pair in direct mode.
struct Work {
  int e, n, pair0;
  const int* pairs;  // nullptr: the only pair is pair0
  __device__ int pair(int c) const { return pairs ? pairs[c] : pair0; }
};

// Stages TT activation rows as padded float32 blocks (zeros past K) plus per-block sums (the zero-point term
// needs Σ x). All of a thread's global loads are issued before the first use: the CTA pays one round trip.
template <class Tin, int kStage, int TT>
__device__ __forceinline__ void stage_rows(const DevLayer& L, const Work& w, int c0, int K, int nb, const Tin* src,
                                           float* xs, float* xsum) {
  size_t srow[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    const int p = c0 + t < w.n ? w.pair(c0 + t) : 0;
    srow[t] = (kStage == 1 ? static_cast<size_t>(p / L.k) : static_cast<size_t>(p)) * K;
  }
  constexpr int kUnroll = 8;
  const int per_row = nb * 32, total = TT * per_row;
  for (int base = threadIdx.x; base < total; base += kThreads * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads, t = i / per_row, c = i - t * per_row;
      v[u] = 0.f;
#pragma unroll
      for (int tt = 0; tt < TT; ++tt)  // constant index into srow
        if (tt == t && i < total && c0 + t < w.n && c < K) v[u] = to_f32(src[srow[tt] + c]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads, t = i / per_row, c = i - t * per_row;
      if (i < total) xs[(t * nb + (c >> 5)) * kXStride + (c & 31)] = v[u];
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int tb = warp; tb < TT * nb; tb += kWarps) {
    const float sum = warp_sum(xs[tb * kXStride + lane]);
    if (lane == 0) xsum[tb] = sum;
  }
  __syncthreads();
}

// One group against this warp's rows: acc = Σ_g s·(Σ q·x - z·Σ x) per (row, token). Lane l takes blocks
// l, l+32, ...; each block's codes are fetched one iteration ahead (the first ones while x is staged), and
// each decoded code serves TT tokens.
template <int B, int kStage, int TT, class Tin>
__device__ __forceinline__ void gemv_group(const DevLayer& L, const DevMat& M, const Work& w, int slot, const Tin* src,
                                           float* xs, float* xsum, float* dst) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nb = M.nb;
  const int unit = blockIdx.x * kWarps + warp;  // stage 1: 2 gate rows (+ 2 up rows); stage 2: 4 rows
  // The warp's rows come in runs of consecutive rows, valid or not as a whole (H is a multiple of 16, I of 8):
  // invalid ones are clamped to the last run so the warp stays whole and every load stays inside the expert.
  int row[kRows];
  bool valid;
  if (kStage == 1) {
    const int g = unit * (kRows / 2);
    valid = g < L.I;
#pragma unroll
    for (int r = 0; r < kRows; ++r) row[r] = (valid ? g : L.I - kRows / 2) + r % (kRows / 2) + (r >= kRows / 2 ? L.I : 0);
  } else {
    const int g = unit * kRows;
    valid = g < L.H;
#pragma unroll
    for (int r = 0; r < kRows; ++r) row[r] = (valid ? g : L.H - kRows) + r;
  }
  // FORMAT.md §4: element (r, j) of the expert's [rows, J] matrix at ((r / 16)·J + j)·16 + r % 16. The warp's
  // rows are runs inside one tile (stage 1: row[0..1] and row[2..3]; stage 2: row[0..3]), so each run needs one
  // base pointer: its first row's element j at base + j·16, the run's next rows at +1, +2, +3.
  constexpr int kRun = kStage == 1 ? kRows / 2 : kRows;  // rows per run
  const int J = nb * B;
  auto tile_off = [](int r, int Jn) {
    return static_cast<size_t>(r / kTileRows) * Jn * kTileRows + r % kTileRows;
  };
  const uint32_t* cbase = M.codes[B] + static_cast<size_t>(slot) * M.rows * J;
  const size_t sz = static_cast<size_t>(w.e) * M.rows * M.G;
  const uint32_t* code_run[2] = {cbase + tile_off(row[0], J), cbase + tile_off(row[kRows - kRun], J)};
  const __half* scale_run[2] = {M.scales + sz + tile_off(row[0], M.G), M.scales + sz + tile_off(row[kRows - kRun], M.G)};
  const uint8_t* zero_run[2] = {M.zeros + sz + tile_off(row[0], M.G), M.zeros + sz + tile_off(row[kRows - kRun], M.G)};
  uint32_t cw[kRows][B];
  float sc[kRows], zp[kRows];
  auto fetch = [&](int blk) {
    const int gi = blk / L.blocks_per_group;
    load_block<B, kStage>(code_run[0] + blk * B * kTileRows, code_run[1] + blk * B * kTileRows, cw);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {  // run r / kRun, row r % kRun of it
      sc[r] = __half2float(scale_run[r / kRun][gi * kTileRows + r % kRun]);
      zp[r] = static_cast<float>(zero_run[r / kRun][gi * kTileRows + r % kRun]);
    }
  };
  for (int c0 = 0; c0 < w.n; c0 += TT) {
    if (c0 > 0) __syncthreads();  // the previous pass is done reading xs
    if (lane < nb) fetch(lane);
    stage_rows<Tin, kStage, TT>(L, w, c0, M.K, nb, src, xs, xsum);
    float acc[kRows][TT] = {};
    for (int blk = lane; blk < nb; blk += 32) {
      if (blk != lane) fetch(blk);  // later blocks: latency hidden by the other resident warps, not by
                                    // double buffering, which cost 2x code registers and half the occupancy
      float dot[kRows][TT] = {};
      const float* xb = xs + blk * kXStride;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        float x[TT][8];
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          const float4 a = *reinterpret_cast<const float4*>(xb + t * nb * kXStride + 8 * s);
          const float4 b = *reinterpret_cast<const float4*>(xb + t * nb * kXStride + 8 * s + 4);
          x[t][0] = a.x, x[t][1] = a.y, x[t][2] = a.z, x[t][3] = a.w;
          x[t][4] = b.x, x[t][5] = b.y, x[t][6] = b.z, x[t][7] = b.w;
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float f = code_as_float<B>(cw[r], 8 * s + i);
#pragma unroll
            for (int t = 0; t < TT; ++t) dot[r][t] = fmaf(f, x[t][i], dot[r][t]);
          }
      }
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float xsb = xsum[t * nb + blk];
#pragma unroll
        for (int r = 0; r < kRows; ++r)  // Σ q·x = 2^B (Σ f·x - Σ x), exact up to float32 rounding
          acc[r][t] += sc[r] * (static_cast<float>(1 << B) * (dot[r][t] - xsb) - zp[r] * xsb);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int t = 0; t < TT; ++t) acc[r][t] = warp_sum(acc[r][t]);
#pragma unroll
    for (int t = 0; t < TT; ++t) {  // lane t writes token t of this pass
      if (lane != t || c0 + t >= w.n || !valid) continue;
      const size_t p = w.pair(c0 + t);
      if (kStage == 1) {
#pragma unroll
        for (int r = 0; r < kRows / 2; ++r) dst[p * L.I + row[r]] = activate(acc[r][t], L.gelu) * acc[r + kRows / 2][t];
      } else {
#pragma unroll
        for (int r = 0; r < kRows; ++r) dst[p * L.H + row[r]] = acc[r][t];
      }
    }
  }
}

// Stage 1 (src = hidden, Tin = hidden's type) or stage 2 (src = h, float). Dynamic shared memory holds TT
// activation rows as padded float blocks plus their per-block sums.
// Decode (TT = 1) is latency-bound: cap registers so 3 CTAs (24 warps) share an SM. Measured on H100:
// 128-235 registers gave 1-2 CTAs per SM, 20% achieved occupancy and 0.44 issued warps per scheduler.
template <class Tin, int kStage, int TT>
__global__ void __launch_bounds__(kThreads, TT == 1 ? 3 : 1) expert_gemv(const __grid_constant__ DevLayer L, const Tin* __restrict__ src,
                                                        const int64_t* __restrict__ indices, Groups g,
                                                        bool grouped, float* __restrict__ dst, int* flag, bool reset_flag) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);
  if (kStage == 2 && reset_flag && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = INT_MAX;
  const DevMat& M = kStage == 1 ? L.w1 : L.w2;
  Work w;
  if (!grouped) {
    const int64_t v = indices[blockIdx.y];
    if (v < 0 || v >= L.E) return;  // combine() flags it; never read outside the layer
    w = {static_cast<int>(v), 1, static_cast<int>(blockIdx.y), nullptr};
  } else {
    if (static_cast<int>(blockIdx.y) >= *g.count) return;
    const int s = g.start[blockIdx.y];
    w = {g.expert[blockIdx.y], g.start[blockIdx.y + 1] - s, 0, g.pairs + s};
  }
  const int bits = L.expert[w.e] & 15, slot = L.expert[w.e] >> 4;
  float* xsum = xs + TT * M.nb * kXStride;
  switch (bits) {
    case 2: gemv_group<2, kStage, TT>(L, M, w, slot, src, xs, xsum, dst); break;
    case 3: gemv_group<3, kStage, TT>(L, M, w, slot, src, xs, xsum, dst); break;
    case 4: gemv_group<4, kStage, TT>(L, M, w, slot, src, xs, xsum, dst); break;
    default: gemv_group<8, kStage, TT>(L, M, w, slot, src, xs, xsum, dst); break;
  }
}

// Counting sort of the P pairs by expert in one CTA (prefill only; P <= kChunkTokens·k). Invalid indices are
// dropped here and flagged by combine(). Order inside an expert does not matter: each pair's sums are its own.
__global__ void route_pairs(const int64_t* __restrict__ indices, int P, int E, Groups g) {
  extern __shared__ int sh[];
  int *count = sh, *fill = sh + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t v = indices[p];
    if (v >= 0 && v < E) atomicAdd(&count[v], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp scans: lane l owns a contiguous run of experts
    const int lane = threadIdx.x, per = (E + 31) / 32, lo = min(E, lane * per), hi = min(E, lo + per);
    int pairs = 0, groups = 0;
    for (int e = lo; e < hi; ++e) pairs += count[e], groups += count[e] > 0;
    int ip = pairs, ig = groups;  // inclusive scans
    for (int o = 1; o < 32; o <<= 1) {
      const int a = __shfl_up_sync(0xffffffffu, ip, o), b = __shfl_up_sync(0xffffffffu, ig, o);
      if (lane >= o) ip += a, ig += b;
    }
    int pos = ip - pairs, grp = ig - groups;
    for (int e = lo; e < hi; ++e) {
      fill[e] = pos;
      if (count[e] > 0) g.expert[grp] = e, g.start[grp] = pos, ++grp;
      pos += count[e];
    }
    if (lane == 31) *g.count = ig, g.start[ig] = ip;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t v = indices[p];
    if (v >= 0 && v < E) g.pairs[atomicAdd(&fill[v], 1)] = p;
  }
}

// out[t] = Σ_j weights[t,j]·y[t·k+j], slots in order (deterministic). Flags the first invalid index.
template <class T>
__global__ void combine(const float* __restrict__ y, const int64_t* __restrict__ indices, const T* __restrict__ weights,
                        int k, int H, int E, T* __restrict__ out, int* flag, int pair_base) {
  const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= H) return;
  float acc = 0.f;
#pragma unroll 8
  for (int j = 0; j < k; ++j) {  // unrolled so the k loads are in flight together (k round trips otherwise)
    const size_t p = static_cast<size_t>(t) * k + j;
    const int64_t v = indices[p];
    if (v >= 0 && v < E) acc += to_f32(weights[p]) * y[p * H + c];
    else if (c == 0) atomicMin(flag, pair_base + static_cast<int>(p));
  }
  out[static_cast<size_t>(t) * H + c] = from_f32<T>(acc);
}

// ---------------------------------------------------------------------------------------------------------
// Host side: validation (OPS.md) and launch plan.

template <class... A>
Status fail(Code code, const A&... parts) {
  std::ostringstream m;
  m << "mopeq.MoEExperts (CUDA): ";
  (m << ... << parts);
  return {code, m.str()};
}

std::string shape_str(const Tensor& t) {
  std::ostringstream o;
  o << "[";
  for (int i = 0; i < t.rank; ++i) o << (i ? ", " : "") << t.shape[i];
  return o.str() + "]";
}

bool has_shape(const Tensor& t, std::initializer_list<int64_t> want) {
  if (t.rank != static_cast<int>(want.size())) return false;
  int i = 0;
  for (int64_t d : want) if (t.shape[i++] != d) return false;
  return true;
}

std::string want_str(std::initializer_list<int64_t> want) {
  Tensor t;
  t.rank = static_cast<int>(want.size());
  int i = 0;
  for (int64_t d : want) t.shape[i++] = d;
  return shape_str(t);
}

struct Plan {
  int64_t T = 0, H = 0, I = 0, E = 0, k = 0;
  int group_size = 0, gelu = 0;
  int bits[kMaxExperts] = {}, slots[kMaxExperts] = {};
  size_t chunk = 0, off_y = 0, off_groups = 0, off_flag = 0, bytes = 0;
};

constexpr size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// A layout-v1 tensor ([E, rows, J], rank 3) gets a hint: the shapes alone say which layout was exported.
const char* v1_hint(const Tensor& t) {
  return t.rank == 3 ? "; a rank-3 tensor is layout v1 (row-major), which this kernel no longer reads: re-export the model"
                     : "";
}

Status check_matrix(const Tensor* m, const char* name, const Plan& pl, int64_t rows, int64_t K) {
  if (rows <= 0 || rows % kTileRows)  // validate() words this for H and 2I; kept for any other caller
    return fail(Code::kInvalidArgument, name, " has ", rows, " rows, not a positive multiple of ", kTileRows,
                " (layout v2 stores expert matrices in tiles of ", kTileRows, " rows, FORMAT.md §3)");
  const int64_t G = num_groups(K, pl.group_size), tiles = rows / kTileRows;
  for (int i = 4; i < 6; ++i) {
    const char* what = i == 4 ? ".scales" : ".zeros";
    if (!has_shape(m[i], {pl.E, tiles, G, kTileRows}))
      return fail(Code::kInvalidArgument, name, what, " has shape ", shape_str(m[i]), ", expected ",
                  want_str({pl.E, tiles, G, kTileRows}), " = [E, rows/16, G, 16] (rows = ", rows, ", G = ceil(K / group_size) = ",
                  G, ")", v1_hint(m[i]));
    if (!m[i].data) return fail(Code::kInvalidArgument, name, what, " is a null pointer");
  }
  for (int wi = 0; wi < 4; ++wi) {
    const int b = kSupportedBits[wi];
    int64_t eb = 0;
    for (int e = 0; e < pl.E; ++e) eb += pl.bits[e] == b;
    if (!has_shape(m[wi], {eb, tiles, num_blocks(K) * b, kTileRows}))
      return fail(Code::kInvalidArgument, name, ".q", b, " has shape ", shape_str(m[wi]), ", expected ",
                  want_str({eb, tiles, num_blocks(K) * b, kTileRows}), " = [E_b, rows/16, NB*b, 16] (expert_bits lists ", eb,
                  " experts of width ", b, "; rows = ", rows, ", NB = ceil(K / 32) = ", num_blocks(K), ")", v1_hint(m[wi]));
    if (eb && !m[wi].data) return fail(Code::kInvalidArgument, name, ".q", b, " is a null pointer");
    if (eb && reinterpret_cast<uintptr_t>(m[wi].data) % 16)  // the kernel loads 4 rows' word as one uint4
      return fail(Code::kInvalidArgument, name, ".q", b, " is not 16-byte aligned");
  }
  return {};
}

Status validate(const MoeArgs& a, Plan* pl) {
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16)
    return fail(Code::kInvalidArgument, "dtype must be float32 or float16");
  if (a.layout_version != kLayoutVersion)
    return fail(Code::kInvalidArgument, "layout_version ", a.layout_version, " is not supported (this kernel reads ",
                kLayoutVersion, "); re-export the model or update the runtime");
  if (a.group_size <= 0 || a.group_size % kBlock || a.group_size > (1 << 20))
    return fail(Code::kInvalidArgument, "group_size ", a.group_size, " is not a positive multiple of ", kBlock);
  pl->group_size = static_cast<int>(a.group_size);
  const std::string act = a.activation ? a.activation : "silu";
  if (act != "silu" && act != "gelu")
    return fail(Code::kInvalidArgument, "activation '", act, "' unknown; use silu or gelu");
  pl->gelu = act == "gelu";
  if (!a.expert_bits || a.num_expert_bits <= 0) return fail(Code::kInvalidArgument, "expert_bits is empty");
  if (a.num_expert_bits > kMaxExperts)
    return fail(Code::kInvalidArgument, a.num_expert_bits, " experts; the CUDA kernel takes at most ", kMaxExperts);
  pl->E = a.num_expert_bits;
  int count[9] = {};
  for (int64_t e = 0; e < pl->E; ++e) {
    const int64_t b = a.expert_bits[e];
    if (b < 0 || b > 8 || !is_supported_bits(static_cast<int>(b)))
      return fail(Code::kInvalidArgument, "expert_bits[", e, "] = ", b, "; widths must be 2, 3, 4 or 8");
    pl->bits[e] = static_cast<int>(b);
    pl->slots[e] = count[b]++;  // FORMAT.md §4; < 512, fits the 12 bits of the packed table
  }
  if (a.hidden.rank != 2) return fail(Code::kInvalidArgument, "hidden must be [T, H], got ", shape_str(a.hidden));
  pl->T = a.hidden.shape[0], pl->H = a.hidden.shape[1];
  // w1.scales is [E, 2I/16, G, 16]: it fixes I (a multiple of 8, since 2I rows come in tiles of 16).
  const Tensor& s1 = a.w1[4];
  if (s1.rank != 4 || s1.shape[1] <= 0 || s1.shape[3] != kTileRows)
    return fail(Code::kInvalidArgument, "w1.scales has shape ", shape_str(s1), ", expected [E, 2I/16, G, 16] with I > 0",
                v1_hint(s1));
  if (s1.shape[0] != pl->E)
    return fail(Code::kInvalidArgument, "expert_bits lists ", pl->E, " experts but w1.scales holds ", s1.shape[0]);
  pl->I = std::min<int64_t>(s1.shape[1], 1 << 24) * kTileRows / 2;  // no overflow; >= 2^24 is refused below
  if (pl->T < 0 || pl->H <= 0 || pl->H >= (1 << 24) || pl->I >= (1 << 24))
    return fail(Code::kInvalidArgument, "unsupported sizes T=", pl->T, ", H=", pl->H, ", I=", pl->I);
  if (pl->H % kTileRows)
    return fail(Code::kInvalidArgument, "hidden size H = ", pl->H, " is not a multiple of ", kTileRows,
                ": layout v2 stores w2's H rows in tiles of ", kTileRows, " rows (FORMAT.md §3)");
  if (a.indices.rank != 2 || a.indices.shape[0] != pl->T || a.indices.shape[1] < 0)
    return fail(Code::kInvalidArgument, "indices must be [T=", pl->T, ", k], got ", shape_str(a.indices));
  pl->k = a.indices.shape[1];
  if (pl->k > 64) return fail(Code::kInvalidArgument, "top-k ", pl->k, " is larger than this kernel's 64");
  if (!has_shape(a.weights, {pl->T, pl->k}))
    return fail(Code::kInvalidArgument, "weights has shape ", shape_str(a.weights), ", expected ",
                want_str({pl->T, pl->k}));
  if (Status s = check_matrix(a.w1, "w1", *pl, 2 * pl->I, pl->H); !s.ok()) return s;
  if (Status s = check_matrix(a.w2, "w2", *pl, pl->H, pl->I); !s.ok()) return s;
  if (pl->T * pl->k > 0 && (!a.hidden.data || !a.indices.data || !a.weights.data))
    return fail(Code::kInvalidArgument, "hidden, indices or weights is a null pointer");
  if (pl->T > 0 && !a.out) return fail(Code::kInvalidArgument, "out is a null pointer");

  // Workspace per chunk of tokens: h [P, I], y [P, H], routing groups, the bad-index flag.
  pl->chunk = static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(pl->T, 1), kChunkTokens));
  const size_t P = pl->chunk * std::max<int64_t>(pl->k, 1), gmax = std::min<size_t>(pl->E, P);
  pl->off_y = align_up(P * pl->I * sizeof(float));
  pl->off_groups = pl->off_y + align_up(P * pl->H * sizeof(float));
  pl->off_flag = pl->off_groups + align_up((1 + gmax + gmax + 1 + P) * sizeof(int));
  pl->bytes = pl->off_flag + 256;
  return {};
}

Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  return fail(Code::kCudaError, what, ": ", cudaGetErrorString(e));
}

void fill_matrix(DevMat* d, const Tensor* m, int rows, int K, int G) {
  for (int b : kSupportedBits) d->codes[b] = nullptr;
  for (int wi = 0; wi < 4; ++wi) d->codes[kSupportedBits[wi]] = static_cast<const uint32_t*>(m[wi].data);
  d->scales = static_cast<const __half*>(m[4].data);
  d->zeros = static_cast<const uint8_t*>(m[5].data);
  d->rows = rows, d->K = K, d->nb = static_cast<int>(num_blocks(K)), d->G = G;
}

size_t stage_smem(int TT, int K) { return static_cast<size_t>(TT) * num_blocks(K) * (kXStride + 1) * sizeof(float); }

// Raises a kernel's dynamic shared-memory limit past the 48 KB default when it needs more.
template <class Kern>
Status allow_smem(Kern kernel, size_t bytes, int optin) {
  if (bytes > static_cast<size_t>(optin))
    return fail(Code::kInvalidArgument, "a staged activation row needs ", bytes, " bytes of shared memory, over this GPU's ",
                optin, "; hidden or intermediate size is too large for this kernel");
  if (bytes <= 48 * 1024) return {};
  return cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                     "cudaFuncSetAttribute");
}

template <class T, int TT>
Status launch_stages(const DevLayer& L, const Plan& pl, const T* hidden, const int64_t* idx, Groups g, bool grouped,
                     int P, int gmax, float* h, float* y, int* flag, bool reset, int optin, cudaStream_t st) {
  const size_t sm1 = stage_smem(TT, pl.H), sm2 = stage_smem(TT, pl.I);
  auto k1 = expert_gemv<T, 1, TT>;
  auto k2 = expert_gemv<float, 2, TT>;
  if (Status s = allow_smem(k1, sm1, optin); !s.ok()) return s;
  if (Status s = allow_smem(k2, sm2, optin); !s.ok()) return s;
  const unsigned gy = grouped ? gmax : P;
  const dim3 grid1((pl.I + kWarps * kRows / 2 - 1) / (kWarps * kRows / 2), gy);
  const dim3 grid2((pl.H + kWarps * kRows - 1) / (kWarps * kRows), gy);
  k1<<<grid1, kThreads, sm1, st>>>(L, hidden, idx, g, grouped, h, flag, false);
  k2<<<grid2, kThreads, sm2, st>>>(L, h, idx, g, grouped, y, flag, reset);
  return {};
}

template <class T>
Status run(const MoeArgs& a, const Plan& pl, cudaStream_t st) {
  int dev = 0, optin = 0;
  if (Status s = cuda_status(cudaGetDevice(&dev), "cudaGetDevice"); !s.ok()) return s;
  if (Status s = cuda_status(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                             "cudaDeviceGetAttribute");
      !s.ok())
    return s;
  DevLayer L;
  const int H = static_cast<int>(pl.H), I = static_cast<int>(pl.I), k = static_cast<int>(pl.k);
  fill_matrix(&L.w1, a.w1, 2 * I, H, static_cast<int>(num_groups(H, pl.group_size)));
  fill_matrix(&L.w2, a.w2, H, I, static_cast<int>(num_groups(I, pl.group_size)));
  L.E = static_cast<int>(pl.E), L.H = H, L.I = I, L.k = k, L.blocks_per_group = pl.group_size / kBlock, L.gelu = pl.gelu;
  for (int e = 0; e < L.E; ++e) L.expert[e] = static_cast<uint16_t>(pl.slots[e] << 4 | pl.bits[e]);

  char* ws = static_cast<char*>(a.workspace);
  float* h = reinterpret_cast<float*>(ws);
  float* y = reinterpret_cast<float*>(ws + pl.off_y);
  int* flag = reinterpret_cast<int*>(ws + pl.off_flag);
  const T* hidden = static_cast<const T*>(a.hidden.data);
  const T* weights = static_cast<const T*>(a.weights.data);
  const int64_t* indices = static_cast<const int64_t*>(a.indices.data);
  T* out = static_cast<T*>(a.out);

  for (int64_t t0 = 0; t0 < pl.T; t0 += static_cast<int64_t>(pl.chunk)) {
    const int n = static_cast<int>(std::min<int64_t>(pl.chunk, pl.T - t0)), P = n * k;
    const int gmax = static_cast<int>(std::min<int64_t>(pl.E, P));
    const int64_t* idx = indices + t0 * k;
    int* gi = reinterpret_cast<int*>(ws + pl.off_groups);
    const Groups g{gi, gi + 1, gi + 1 + gmax, gi + 2 + 2 * gmax};
    if (k > 0) {
      const bool grouped = a.path == Path::kGrouped || (a.path == Path::kAuto && P > kDirectMaxPairs);
      if (grouped) route_pairs<<<1, 1024, 2 * L.E * sizeof(int), st>>>(idx, P, L.E, g);
      // 4 tokens per pass pays only where groups average 2+ tokens (else 3/4 of the math is on padding),
      // and only while 4 staged rows fit in shared memory.
      const bool four = grouped && P >= 2 * gmax && stage_smem(kGroupTokens, std::max(H, I)) <= static_cast<size_t>(optin);
      const T* x = hidden + t0 * H;
      const Status s = four ? launch_stages<T, kGroupTokens>(L, pl, x, idx, g, true, P, gmax, h, y, flag, t0 == 0, optin, st)
                            : launch_stages<T, 1>(L, pl, x, idx, g, grouped, P, gmax, h, y, flag, t0 == 0, optin, st);
      if (!s.ok()) return s;
    }
    combine<T><<<dim3((H + 255) / 256, n), 256, 0, st>>>(y, idx, weights + t0 * k, k, H, L.E, out + t0 * H, flag,
                                                        static_cast<int>(t0 * k));
    if (Status s = cuda_status(cudaGetLastError(), "kernel launch"); !s.ok()) return s;
  }
  if (!a.check_indices || pl.T * pl.k == 0) return {};
  int bad = INT_MAX;
  if (Status s = cuda_status(cudaMemcpyAsync(&bad, flag, sizeof(int), cudaMemcpyDeviceToHost, st), "flag copy"); !s.ok())
    return s;
  if (Status s = cuda_status(cudaStreamSynchronize(st), "kernel"); !s.ok()) return s;
  if (bad == INT_MAX) return {};
  int64_t v = 0;  // error path only: fetch the offending value for the message
  if (Status s = cuda_status(cudaMemcpy(&v, indices + bad, sizeof(v), cudaMemcpyDeviceToHost), "index copy"); !s.ok())
    return s;
  return fail(Code::kBadIndex, "indices[", bad / pl.k, ", ", bad % pl.k, "] = ", v, " is outside [0, ", pl.E, ")");
}

}  // namespace
}  // namespace cuda
}  // namespace mopeq

mopeq::cuda::Status mopeq_cuda_moe_workspace_bytes(const mopeq::cuda::MoeArgs& args, size_t* bytes) {
  using namespace mopeq::cuda;
  Plan pl;
  Status s = validate(args, &pl);
  if (s.ok()) *bytes = pl.bytes;
  return s;
}

int mopeq_cuda_current_device() {
  int d = 0;
  return cudaGetDevice(&d) == cudaSuccess ? d : 0;
}

mopeq::cuda::Status mopeq_cuda_moe_experts(const mopeq::cuda::MoeArgs& args, CUstream_st* stream) {
  using namespace mopeq::cuda;
  Plan pl;
  if (Status s = validate(args, &pl); !s.ok()) return s;
  if (pl.T == 0) return {};
  if (!args.workspace || args.workspace_bytes < pl.bytes)
    return fail(Code::kInvalidArgument, "workspace of ", args.workspace_bytes, " bytes; this call needs ", pl.bytes,
                " (mopeq_cuda_moe_workspace_bytes)");
  return args.dtype == DType::kFloat32 ? run<float>(args, pl, stream) : run<__half>(args, pl, stream);
}
