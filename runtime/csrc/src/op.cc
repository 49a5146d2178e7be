// ONNX Runtime glue for mopeq.MoEExperts (docs/OPS.md): attributes, input validation, float16 conversion,
// registration. Every check here runs before a kernel touches memory, so bad inputs become an ORT error.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstdlib>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "moe.h"
#ifdef MOPEQ_WITH_ORT_CUDA
#include "moe_cuda.h"  // runtime/csrc/cuda: the CUDA kernel's host API (cmake -DMOPEQ_CUDA=ON -DMOPEQ_ORT_CUDA=ON)
#endif

namespace mopeq {
namespace {

constexpr int kNumInputs = 15;  // hidden, indices, weights, then w1 and w2: q2 q3 q4 q8 scales zeros
constexpr int kW1 = 3, kW2 = 9;  // first input of each matrix's six tensors

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... A>
void require(bool ok, const A&... parts) {
  if (ok) return;
  std::ostringstream msg;
  msg << "mopeq.MoEExperts: ";
  (msg << ... << parts);
  throw OpError(msg.str());
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  return o.str() + "]";
}

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

void require_shape(const Ort::ConstValue& v, const char* name, const std::vector<int64_t>& want) {
  const auto got = shape_of(v);
  require(got == want, name, " has shape ", shape_str(got), ", expected ", shape_str(want));
}

struct Attrs {
  std::vector<int> bits, slots;
  int group_size = 0;
  Activation act = Activation::kSilu;
};

Attrs read_attrs(const Ort::ConstKernelInfo& info) {
  Attrs a;
  const auto layout = info.GetAttribute<int64_t>("layout_version");
  require(layout == kLayoutVersion, "layout_version ", layout, " is not supported by this library (it reads ",
          kLayoutVersion, "); re-export the model or update the runtime");
  const auto g = info.GetAttribute<int64_t>("group_size");
  require(g > 0 && g % kBlock == 0 && g <= (1 << 20), "group_size ", g, " is not a positive multiple of ", kBlock);
  a.group_size = static_cast<int>(g);
  std::string act = "silu";
  try {
    act = info.GetAttribute<std::string>("activation");
  } catch (const Ort::Exception&) {  // optional attribute, default silu
  }
  require(act == "silu" || act == "gelu", "activation '", act, "' unknown; use silu or gelu");
  a.act = act == "silu" ? Activation::kSilu : Activation::kGelu;
  int count[9] = {0};
  for (int64_t b : info.GetAttributes<int64_t>("expert_bits")) {
    require(b >= 0 && b <= 8 && is_supported_bits(static_cast<int>(b)), "expert_bits holds width ", b,
            "; widths must be 2, 3, 4 or 8");
    a.bits.push_back(static_cast<int>(b));
    a.slots.push_back(count[b]++);  // slot table of FORMAT.md §4
  }
  require(!a.bits.empty(), "expert_bits is empty");
  return a;
}

// Checks one matrix's six tensors (codes by width, scales, zeros) and fills the layer view.
void check_matrix(const Ort::KernelContext& ctx, int first, const char* m, const Attrs& at, int64_t rows,
                  int64_t K, const uint32_t** codes, const uint16_t** scales, const uint8_t** zeros) {
  const int64_t E = static_cast<int64_t>(at.bits.size()), G = num_groups(K, at.group_size), RT = rows / kTileRows;
  const std::string sm = std::string(m) + ".scales", zm = std::string(m) + ".zeros";
  require_shape(ctx.GetInput(first + 4), sm.c_str(), {E, RT, G, kTileRows});
  require_shape(ctx.GetInput(first + 5), zm.c_str(), {E, RT, G, kTileRows});
  *scales = reinterpret_cast<const uint16_t*>(ctx.GetInput(first + 4).GetTensorData<Ort::Float16_t>());
  *zeros = ctx.GetInput(first + 5).GetTensorData<uint8_t>();
  for (int wi = 0; wi < 4; ++wi) {
    const int b = kSupportedBits[wi];
    int64_t eb = 0;
    for (int x : at.bits) eb += x == b;
    const std::string name = std::string(m) + ".q" + std::to_string(b);
    const auto v = ctx.GetInput(first + wi);
    require_shape(v, name.c_str(), {eb, RT, num_blocks(K) * b, kTileRows});
    codes[b] = eb ? v.GetTensorData<uint32_t>() : nullptr;
  }
}

int env_threads() {
  const char* s = std::getenv("MOPEQ_NUM_THREADS");
  return s ? std::atoi(s) : 0;
}

// MOPEQ_NUM_THREADS caps ORT's intra-op pool for this op (1 = on the calling thread); unset = ORT decides.
void run_parallel(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  const int threads = env_threads();
  if (threads == 1 || total <= 1) {
    for (size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  static_cast<const Ort::KernelContext*>(ctx)->ParallelFor(fn, total, threads > 0 ? threads : 0, data);
}

std::vector<float> to_float(const Ort::Float16_t* p, size_t n) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = p[i].ToFloat();
  return out;
}

template <class Elem>  // float or Ort::Float16_t: the type of hidden, weights and out
struct Kernel {
  static constexpr const char* kProvider = nullptr;  // ORT's CPU execution provider
  Attrs at;

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    require(ctx.GetInputCount() == kNumInputs, "expects ", kNumInputs, " inputs, got ", ctx.GetInputCount());
    const auto hs = shape_of(ctx.GetInput(0));
    require(hs.size() == 2, "hidden must be [T, H], got ", shape_str(hs));
    const int64_t T = hs[0], H = hs[1], E = static_cast<int64_t>(at.bits.size());
    const auto s1 = shape_of(ctx.GetInput(kW1 + 4));
    require(s1.size() == 4 && s1[1] > 0 && s1[3] == kTileRows, "w1.scales must be [E, 2I/16, G, 16] (layout v",
            kLayoutVersion, ", FORMAT.md §4), got ", shape_str(s1));
    require(H > 0 && H < (1 << 24) && s1[1] < (1 << 21), "unsupported sizes H=", H, ", 2I=", s1[1] * kTileRows);
    require(H % kTileRows == 0, "hidden size ", H, " is not a multiple of ", kTileRows,
            "; layout v2 stores expert matrices in tiles of 16 rows");
    require(s1[0] == E, "expert_bits lists ", E, " experts but w1.scales holds ", s1[0]);
    const int64_t I = s1[1] * kTileRows / 2;
    const auto is = shape_of(ctx.GetInput(1));
    require(is.size() == 2 && is[0] == T, "indices must be [T=", T, ", k], got ", shape_str(is));
    const int64_t k = is[1];
    require_shape(ctx.GetInput(2), "weights", {T, k});

    LayerView L{static_cast<int>(E), static_cast<int>(H), static_cast<int>(I), at.group_size,
                at.bits.data(), at.slots.data(), {}, {}, nullptr, nullptr, nullptr, nullptr};
    check_matrix(ctx, kW1, "w1", at, 2 * I, H, L.w1_codes, &L.w1_scales, &L.w1_zeros);
    check_matrix(ctx, kW2, "w2", at, H, I, L.w2_codes, &L.w2_scales, &L.w2_zeros);

    const int64_t* idx = ctx.GetInput(1).GetTensorData<int64_t>();
    for (int64_t i = 0; i < T * k; ++i)
      require(idx[i] >= 0 && idx[i] < E, "indices[", i / k, ", ", i % k, "] = ", idx[i], " is outside [0, ", E, ")");

    KernelPath kernel{};
    const char* error = nullptr;
    const bool found = select_kernel(&kernel, &error);  // before reading error: argument order is unspecified
    require(found, error ? error : "no kernel");

    auto out = ctx.GetOutput(0, hs);
    if (T == 0) return;
    const Elem* hidden = ctx.GetInput(0).GetTensorData<Elem>();
    const Elem* weights = ctx.GetInput(2).GetTensorData<Elem>();
    const Parallel par{run_parallel, &ctx};
    if constexpr (std::is_same_v<Elem, float>) {
      moe_forward(L, hidden, idx, weights, T, k, at.act, kernel, par, out.GetTensorMutableData<float>());
    } else {  // float16: convert in, accumulate in float32, convert out
      const auto x = to_float(hidden, T * H), w = to_float(weights, T * k);
      std::vector<float> y(T * H);
      moe_forward(L, x.data(), idx, w.data(), T, k, at.act, kernel, par, y.data());
      Elem* o = out.GetTensorMutableData<Elem>();
      for (size_t i = 0; i < y.size(); ++i) o[i] = Ort::Float16_t(y[i]);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
};

#ifdef MOPEQ_WITH_ORT_CUDA
// The same op on ORT's CUDA execution provider: inputs and output stay on the device, scratch comes from
// the provider's allocator, work goes on its compute stream. mopeq_cuda_moe_experts validates every shape
// and attribute again (one validator for all CUDA callers) and, with check_indices, syncs the stream once
// to turn an index outside [0, E) into an error status as OPS.md requires.
template <class Elem>
struct CudaKernel {
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  Attrs at;

  static cuda::Tensor view(const Ort::ConstValue& v) {
    const auto s = shape_of(v);
    require(s.size() <= 4, "an input has rank ", s.size(), "; the op takes ranks 2 to 4 only");
    cuda::Tensor t;
    t.data = v.GetTensorRawData();
    t.rank = static_cast<int>(s.size());
    for (size_t i = 0; i < s.size(); ++i) t.shape[i] = s[i];
    return t;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    require(ctx.GetInputCount() == kNumInputs, "expects ", kNumInputs, " inputs, got ", ctx.GetInputCount());
    const std::vector<int64_t> bits(at.bits.begin(), at.bits.end());
    cuda::MoeArgs a;
    a.dtype = std::is_same_v<Elem, float> ? cuda::DType::kFloat32 : cuda::DType::kFloat16;
    a.hidden = view(ctx.GetInput(0)), a.indices = view(ctx.GetInput(1)), a.weights = view(ctx.GetInput(2));
    for (int i = 0; i < 6; ++i) a.w1[i] = view(ctx.GetInput(kW1 + i)), a.w2[i] = view(ctx.GetInput(kW2 + i));
    a.expert_bits = bits.data(), a.num_expert_bits = static_cast<int64_t>(bits.size());
    a.group_size = at.group_size, a.layout_version = kLayoutVersion;  // read_attrs refused any other version
    a.activation = at.act == Activation::kSilu ? "silu" : "gelu";
    auto out = ctx.GetOutput(0, shape_of(ctx.GetInput(0)));  // before the sizing: it validates out too
    a.out = out.GetTensorMutableRawData();
    size_t bytes = 0;
    if (auto s = mopeq_cuda_moe_workspace_bytes(a, &bytes); !s.ok()) throw OpError(s.message);
    const Ort::MemoryInfo mem("Cuda", OrtDeviceAllocator, mopeq_cuda_current_device(), OrtMemTypeDefault);
    OrtAllocator* alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(mem));
    require(alloc != nullptr, "no CUDA allocator from ONNX Runtime for the scratch memory");
    a.workspace = alloc->Alloc(alloc, bytes), a.workspace_bytes = bytes;
    require(a.workspace != nullptr, "could not allocate ", bytes, " bytes of CUDA scratch memory");
    // Freed right after enqueueing: ORT's CUDA arena hands it out again only to work on this same stream.
    const auto s = mopeq_cuda_moe_experts(a, static_cast<CUstream_st*>(ctx.GetGPUComputeStream()));
    alloc->Free(alloc, a.workspace);
    if (!s.ok()) throw OpError(s.message);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
};
#endif

template <class KernelT, ONNXTensorElementDataType kType>
struct Op : Ort::CustomOpBase<Op<KernelT, kType>, KernelT, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new KernelT{read_attrs(Ort::ConstKernelInfo(info))};
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return "MoEExperts"; }
  const char* GetExecutionProviderType() const { return KernelT::kProvider; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 0 || i == 2) return kType;
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    switch ((i - kW1) % 6) {
      case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case 5: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    }
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

}  // namespace
}  // namespace mopeq

// The execution providers this build registers the op for, readable from the file's bytes without loading it
// (mopeq_runtime.host.library_providers): the runtime refuses a GPU load whose library has no CUDA op.
extern "C" __attribute__((visibility("default"))) const char mopeq_ops_providers[] =
#ifdef MOPEQ_WITH_ORT_CUDA
    "mopeq-ops-providers:CPUExecutionProvider,CUDAExecutionProvider";
#else
    "mopeq-ops-providers:CPUExecutionProvider";
#endif

// One op name, two registrations (float, float16): ORT picks the kernel whose type constraints match.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "libmopeq_ops needs ONNX Runtime >= 1.21");
  Ort::InitApi(api);
  static const mopeq::Op<mopeq::Kernel<float>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_f32;
  static const mopeq::Op<mopeq::Kernel<Ort::Float16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_f16;
#ifdef MOPEQ_WITH_ORT_CUDA
  static const mopeq::Op<mopeq::CudaKernel<float>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_cuda_f32;
  static const mopeq::Op<mopeq::CudaKernel<Ort::Float16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_cuda_f16;
#endif
  static std::mutex mu;
  static std::vector<Ort::CustomOpDomain> keep_alive;  // a domain must outlive every session using it
  try {
    Ort::CustomOpDomain domain("mopeq");
    domain.Add(&op_f32);
    domain.Add(&op_f16);
#ifdef MOPEQ_WITH_ORT_CUDA  // same name and domain; ORT picks by the provider a node is assigned to
    domain.Add(&op_cuda_f32);
    domain.Add(&op_cuda_f16);
#endif
    Ort::ThrowOnError(api->AddCustomOpDomain(options, domain));
    std::lock_guard<std::mutex> lock(mu);
    keep_alive.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
