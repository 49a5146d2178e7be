// mopeq.MoEExperts on CUDA (docs/OPS.md, docs/FORMAT.md, design in docs/KERNELS.md): the host API.
// Free of ONNX Runtime so the standalone harness, a plain C++ runtime and the ORT CUDA op (op.cc under
// MOPEQ_WITH_ORT_CUDA) share one entry point and one validator.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

struct CUstream_st;  // = cudaStream_t, so callers need no CUDA header

namespace mopeq {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1 };

// A device tensor as a graph sees it: pointer and shape (rank <= 4: layout v2 stores codes, scales and zeros as
// [E, rows/16, J, 16] tiles, FORMAT.md §4). Shapes are checked, not trusted.
struct Tensor {
  const void* data = nullptr;
  int rank = 0;
  int64_t shape[4] = {0, 0, 0, 0};
};

// kAuto: one group per (token, slot) pair while T*k <= 16 (decode, no routing launch), else pairs sorted
// by expert so each expert's rows are read once per chunk of tokens. The harness forces each to test both.
enum class Path : int { kAuto = 0, kDirect = 1, kGrouped = 2 };

// Inputs and attributes of one node, in OPS.md order. All tensors live on the device; attributes on the host.
struct MoeArgs {
  DType dtype = DType::kFloat16;  // of hidden, weights and out
  Tensor hidden;                  // [T, H]
  Tensor indices;                 // [T, k] int64
  Tensor weights;                 // [T, k]
  Tensor w1[6];                   // q2 q3 q4 q8 (uint32), scales (float16), zeros (uint8): inputs 3-8, 4-D tiles
  Tensor w2[6];                   // same for the down projection: inputs 9-14
  const int64_t* expert_bits = nullptr;  // attribute, [num_expert_bits]
  int64_t num_expert_bits = 0;
  int64_t group_size = 0;
  int64_t layout_version = 0;
  const char* activation = nullptr;  // "silu" (also for nullptr) or "gelu"
  void* out = nullptr;               // [T, H], dtype
  void* workspace = nullptr;         // device scratch of at least mopeq_cuda_moe_workspace_bytes()
  size_t workspace_bytes = 0;
  // Indices outside [0, E) never cause an out-of-bounds read: such a pair contributes 0 and a device flag
  // records it. With check_indices the call reads that flag back (one 4-byte copy and a stream sync) and
  // returns kBadIndex, as OPS.md requires; without it the call stays asynchronous (CUDA-graph capturable).
  bool check_indices = true;
  Path path = Path::kAuto;
};

enum class Code : int { kOk = 0, kInvalidArgument = 1, kBadIndex = 2, kCudaError = 3 };

struct Status {
  Code code = Code::kOk;
  std::string message;  // "mopeq.MoEExperts (CUDA): ..." with what to fix
  bool ok() const { return code == Code::kOk; }
};

}  // namespace cuda
}  // namespace mopeq

// Validates shapes and attributes (everything of OPS.md except index values) and sizes the scratch memory.
mopeq::cuda::Status mopeq_cuda_moe_workspace_bytes(const mopeq::cuda::MoeArgs& args, size_t* bytes);

// The calling thread's current CUDA device (cudaGetDevice), for callers that include no CUDA header.
int mopeq_cuda_current_device();

// Validates, then enqueues the kernels on `stream`. Returns before the GPU finishes unless check_indices.
mopeq::cuda::Status mopeq_cuda_moe_experts(const mopeq::cuda::MoeArgs& args, CUstream_st* stream);
