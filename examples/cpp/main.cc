// mopeq_cpp_generate: greedy generation from a MoPEQ bundle in C++, with ONNX Runtime's C++ API and the
// bundle's kernel library. It takes the steps of the Python runtime (runtime/mopeq_runtime/loader.py and
// model.py) for a text bundle; docs/EXPORT.md is the decoder's I/O contract, docs/BUNDLE.md the manifest.
//
//   mopeq_cpp_generate BUNDLE_DIR --ids 594,3380,662 [--max-new-tokens 32] [--threads N] [--kernel-library SO]
//                      [--device cpu|cuda|cuda:N]
//
// stdout: the new token ids, space separated, on one line (EOS excluded). stderr: what was loaded and how
// generation stopped. Any problem: one "error: ..." line on stderr and exit code 2.

#define ORT_API_MANUAL_INIT  // the API table is requested in main(), so a too-old library is a clear error
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure("cannot read " + path.string());
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Failure("OpenSSL: no SHA-256");
  std::vector<char> buf(1 << 20);
  while (in.read(buf.data(), buf.size()) || in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), in.gcount());
  if (in.bad()) throw Failure("read error in " + path.string());
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &n);
  std::string hex;
  for (unsigned int i = 0; i < n; ++i) hex += "0123456789abcdef"[md[i] >> 4], hex += "0123456789abcdef"[md[i] & 15];
  return hex;
}

bool safe_relative(const std::string& p) {
  if (p.empty() || fs::path(p).is_absolute() || p.find('\\') != std::string::npos) return false;
  for (const auto& part : fs::path(p)) if (part == "..") return false;
  return true;
}

// The manifest, checked as mopeq_runtime.load does by default (docs/BUNDLE.md, "What load checks", 1, 3-5).
json open_bundle(const fs::path& root) {
  std::ifstream in(root / "manifest.json");
  if (!in) throw Failure(root.string() + " is not a bundle: no manifest.json");
  json m = json::parse(in);
  if (m.value("kind", "") != "mopeq.bundle") throw Failure("manifest.json is not a MoPEQ bundle manifest");
  int schema = m.at("schema_version");
  if (schema != 1 && schema != 2)
    throw Failure("manifest schema version " + std::to_string(schema) + " is not 1 or 2: rebuild the bundle");

  // every listed file: a safe relative path, a regular file, its size and sha256
  std::set<std::string> listed;
  for (const json& f : m.at("files")) {
    const std::string rel = f.at("path");
    if (!safe_relative(rel)) throw Failure("manifest lists an unsafe path " + rel + "; the bundle was tampered with");
    const fs::path p = root / rel;
    if (!fs::is_regular_file(fs::symlink_status(p)))
      throw Failure("bundle file " + rel + " is missing; re-copy the whole bundle folder");
    if (fs::file_size(p) != f.at("size").get<std::uintmax_t>())
      throw Failure("bundle file " + rel + " has " + std::to_string(fs::file_size(p)) + " bytes, the manifest says " +
                    f.at("size").dump() + ": it was altered or truncated; re-copy the bundle");
    if (sha256_file(p) != f.at("sha256").get<std::string>())
      throw Failure("bundle file " + rel + " does not match its sha256 in the manifest: it was altered; "
                    "re-copy or rebuild the bundle");
    listed.insert(rel);
  }
  // and what this program loads must be among them
  std::vector<std::string> used;
  for (const json& g : m.at("graphs")) {
    used.push_back(g.at("file"));
    for (const json& d : g.at("data_files")) used.push_back(d);
  }
  if (m.at("kernel").at("status") == "binary") used.push_back(m.at("kernel").at("library"));
  for (const auto& u : used)
    if (!listed.count(u)) throw Failure("manifest refers to " + u + " but does not list its hash; it was edited");

  if (m.at("validation").value("passed", json()) != true)
    throw Failure("this bundle never passed the accuracy gate (validation.passed is not true); rebuild it");
  utsname host{};
  uname(&host);
  const json& arches = m.at("target").at("arches");
  if (std::find(arches.begin(), arches.end(), std::string(host.machine)) == arches.end())
    throw Failure("the bundle's target " + m.at("target").at("name").get<std::string>() + " is for " + arches.dump() +
                  ", this host is " + host.machine);
  return m;
}

// The kernel (loader.py: _kernel): register the bundle's library (or one built on the device from the bundle's
// kernel-src/, which is outside the bundle and so not hashed); without one the ONNX function bodies run.
std::string register_kernel(Ort::SessionOptions& options, const fs::path& root, const json& kernel,
                            const std::string& device_library) {
  if (!device_library.empty()) {
    if (!fs::is_regular_file(device_library)) throw Failure("kernel library " + device_library + " not found");
    options.RegisterCustomOpsLibrary(device_library.c_str());  // asked for explicitly: failing to load is an error
    return "mopeq.MoEExperts runs in " + device_library;
  }
  if (kernel.at("status") != "binary") return "no kernel library in the bundle: the MoE layers run the function bodies";
  utsname host{};
  uname(&host);
  if (kernel.value("arch", "") != host.machine)
    return "the bundle's kernel library is for " + kernel.value("arch", "?") + ": the function bodies run";
  const std::string lib = kernel.at("library");
  try {
    options.RegisterCustomOpsLibrary((root / lib).c_str());
    return "mopeq.MoEExperts runs in " + lib;
  } catch (const Ort::Exception& e) {
    return std::string("the kernel library did not load (") + e.what() + "): the function bodies run";
  }
}

// Whether a kernel library registers the op for ORT's CUDA provider: its mopeq_ops_providers marker (src/op.cc),
// as mopeq_runtime.host.library_providers reads it.
bool library_serves_cuda(const fs::path& lib) {
  std::ifstream in(lib, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string marker = "mopeq-ops-providers:";
  const size_t at = bytes.find(marker);
  if (at == std::string::npos) return false;
  const size_t end = bytes.find('\0', at);
  return bytes.substr(at, end == std::string::npos ? 256 : end - at).find("CUDAExecutionProvider") != std::string::npos;
}

// --device cuda[:N] (loader.py: _providers): ORT's CUDA provider, refused when this ONNX Runtime has none or the
// kernel library has no CUDA op (its MoE nodes would run on the CPU).
void use_cuda(Ort::SessionOptions& options, const std::string& device, const fs::path& root, const json& kernel,
              const std::string& device_library) {
  int id = 0;
  if (device != "cuda") {
    const std::string n = device.rfind("cuda:", 0) == 0 ? device.substr(5) : "";
    if (n.empty() || n.size() > 4 || n.find_first_not_of("0123456789") != std::string::npos)
      throw Failure("--device must be cpu, cuda or cuda:N, got '" + device + "'");
    id = std::stoi(n);
  }
  const fs::path lib = !device_library.empty() ? fs::path(device_library)
                       : kernel.at("status") == "binary" ? root / kernel.at("library").get<std::string>() : fs::path();
  if (!lib.empty() && !library_serves_cuda(lib))
    throw Failure("--device " + device + ": the kernel library " + lib.string() + " has no CUDA op (built without "
                  "MOPEQ_ORT_CUDA), so its MoE layers would run on the CPU; give a libmopeq_ops_cuda build "
                  "(--kernel-library) or --device cpu");
  OrtCUDAProviderOptions cuda{};
  cuda.device_id = id;
  try {
    options.AppendExecutionProvider_CUDA(cuda);
  } catch (const Ort::Exception& e) {
    throw Failure("--device " + device + ": this ONNX Runtime has no usable CUDA execution provider (" + e.what() +
                  "); link the onnxruntime-gpu build, or --device cpu");
  }
}

// One decoder graph on the docs/EXPORT.md contract, batch 1, with its KV cache (model.py: BundleModel.forward).
class Decoder {
 public:
  Decoder(Ort::Session& session, const json& manifest) : session_(session) {
    const json& model = manifest.at("model");
    json kv = model.value("kv_cache", json());  // per layer [key heads, key dim, value heads, value dim]
    if (manifest.at("schema_version") == 1) {   // schema 1: one grouped-query shape for every layer
      const json one = {model.at("kv_heads"), model.at("head_dim"), model.at("kv_heads"), model.at("head_dim")};
      kv = json::array();
      for (int i = 0; i < model.at("num_layers").get<int>(); ++i) kv.push_back(one);
    }
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      std::string name = session.GetInputNameAllocated(i, alloc).get();
      if (name.rfind("past_key_values.", 0) == 0) {  // past_key_values.{layer}.key | .value
        const size_t layer = std::stoul(name.substr(16));
        const bool is_value = name.size() > 6 && name.compare(name.size() - 6, 6, ".value") == 0;
        const json& shape = kv.at(layer);
        const int64_t heads = shape.at(is_value ? 2 : 0), dim = shape.at(is_value ? 3 : 1);
        past_shape_[name] = {1, heads, 0, dim};  // [batch, heads, past length 0, head dim]: the prefill past
        past_type_[name] = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
      } else if (name == "inputs_embeds") {
        throw Failure("this is a VLM bundle (decoder takes inputs_embeds); this example runs text bundles only");
      } else if (name != "input_ids" && name != "attention_mask" && name != "position_ids") {
        throw Failure("the decoder has an input " + name + " that docs/EXPORT.md does not describe");
      }
      inputs_.push_back(name);
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      outputs_.push_back(session.GetOutputNameAllocated(i, alloc).get());
  }

  // Feeds `ids` after the cached tokens; returns the argmax of the last position's logits (greedy, like
  // np.argmax: the first maximum) and keeps present.* as the next call's past_key_values.*.
  int64_t step(const std::vector<int64_t>& ids) {
    const int64_t t = static_cast<int64_t>(ids.size()), total = past_len_ + t;
    std::vector<int64_t> input_ids(ids), mask(total, 1), positions(t);
    for (int64_t j = 0; j < t; ++j) positions[j] = past_len_ + j;
    const auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const int64_t ids_shape[] = {1, t}, mask_shape[] = {1, total};
    Ort::AllocatorWithDefaultOptions alloc;
    std::vector<Ort::Value> values;
    for (const auto& name : inputs_) {
      if (name == "input_ids") {
        values.push_back(Ort::Value::CreateTensor<int64_t>(cpu, input_ids.data(), t, ids_shape, 2));
      } else if (name == "attention_mask") {  // 1 for every real token, past and new
        values.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), total, mask_shape, 2));
      } else if (name == "position_ids") {  // unpadded: past_len .. past_len + t - 1
        values.push_back(Ort::Value::CreateTensor<int64_t>(cpu, positions.data(), t, ids_shape, 2));
      } else if (past_len_ == 0) {  // prefill: a [1, heads, 0, dim] past for every layer
        values.push_back(Ort::Value::CreateTensor(alloc, past_shape_[name].data(), 4, past_type_[name]));
      } else {  // decode: the previous call's present.* as is (no copy)
        values.push_back(std::move(cache_.at(name)));
      }
    }
    std::vector<const char*> in_names, out_names;
    for (const auto& n : inputs_) in_names.push_back(n.c_str());
    for (const auto& n : outputs_) out_names.push_back(n.c_str());
    auto out = session_.Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(), values.size(),
                            out_names.data(), out_names.size());
    past_len_ = total;
    int64_t next = -1;
    for (size_t i = 0; i < outputs_.size(); ++i) {
      if (outputs_[i] == "logits") {  // float32 [1, t, vocab]
        const auto shape = out[i].GetTensorTypeAndShapeInfo().GetShape();
        const float* last = out[i].GetTensorData<float>() + (t - 1) * shape[2];
        next = std::max_element(last, last + shape[2]) - last;
      } else if (outputs_[i].rfind("present.", 0) == 0) {  // present.{i}.key -> past_key_values.{i}.key
        cache_[inputs_past_name(outputs_[i])] = std::move(out[i]);
      }
    }
    if (next < 0) throw Failure("the decoder has no logits output");
    return next;
  }

 private:
  static std::string inputs_past_name(const std::string& present) { return "past_key_values." + present.substr(8); }

  Ort::Session& session_;
  std::vector<std::string> inputs_, outputs_;
  std::map<std::string, std::vector<int64_t>> past_shape_;
  std::map<std::string, ONNXTensorElementDataType> past_type_;
  std::map<std::string, Ort::Value> cache_;
  int64_t past_len_ = 0;
};

[[noreturn]] void usage(const std::string& why) {
  throw Failure(why + "\nusage: mopeq_cpp_generate BUNDLE_DIR --ids 1,2,3 [--max-new-tokens N] [--threads N]"
                "\n       [--kernel-library libmopeq_ops.so (built on the device from the bundle's kernel-src/)]"
                "\n       [--device cpu|cuda|cuda:N]");
}

int64_t parse_int(const std::string& s, const char* what) {
  size_t used = 0;
  int64_t v = -1;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
  }
  if (s.empty() || used != s.size() || v < 0) usage(std::string(what) + " must be an integer >= 0, got '" + s + "'");
  return v;
}

int run(int argc, char** argv) {
  std::string bundle, kernel_library, device = "cpu";
  std::vector<int64_t> prompt;
  int64_t max_new = 32, threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--ids" && has_value) {
      std::string list = argv[++i], item;
      for (char& c : list) if (c == ',') c = ' ';
      for (std::istringstream in(list); in >> item;) prompt.push_back(parse_int(item, "a token id"));
    } else if (a == "--max-new-tokens" && has_value) {
      max_new = parse_int(argv[++i], "--max-new-tokens");
    } else if (a == "--kernel-library" && has_value) {
      kernel_library = argv[++i];
    } else if (a == "--threads" && has_value) {
      threads = parse_int(argv[++i], "--threads");
    } else if (a == "--device" && has_value) {
      device = argv[++i];
    } else if (a.rfind("--", 0) != 0 && bundle.empty()) {
      bundle = a;
    } else {
      usage("unexpected argument " + a);
    }
  }
  if (bundle.empty() || prompt.empty()) usage("a bundle folder and --ids are required");

  // ONNX Runtime's API table at the headers' version: any library at least that new provides it.
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api)
    throw Failure(std::string("ONNX Runtime ") + OrtGetApiBase()->GetVersionString() + " is older than the headers " +
                  "this program was built with (API " + std::to_string(ORT_API_VERSION) + "); build it with that " +
                  "ONNX Runtime's headers (ORT_ROOT or ORT_INCLUDE_DIR)");
  Ort::InitApi(api);

  const fs::path root(bundle);
  const json m = open_bundle(root);
  const json& model = m.at("model");
  const int64_t vocab = model.at("vocab").get<int64_t>();
  // the context the runtime enforces: the target's (what the memory check was made for) within the model's
  const int64_t ctx = std::min(m.at("target").at("context_length").get<int64_t>(),
                               model.at("max_position_embeddings").get<int64_t>());
  for (int64_t id : prompt)
    if (id >= vocab) throw Failure("token ids must be in [0, " + std::to_string(vocab) + ")");
  if (static_cast<int64_t>(prompt.size()) > ctx)
    throw Failure("the prompt has " + std::to_string(prompt.size()) + " tokens, longer than the bundle's context of " +
                  std::to_string(ctx));
  const json eos = m.at("tokenizer").value("eos_id", json());

  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "mopeq_cpp_generate");
  Ort::SessionOptions options;
  options.SetLogSeverityLevel(3);
  if (threads) options.SetIntraOpNumThreads(static_cast<int>(threads));
  if (device != "cpu") use_cuda(options, device, root, m.at("kernel"), kernel_library);
  const std::string kernel_note = register_kernel(options, root, m.at("kernel"), kernel_library);
  std::string decoder_file;
  for (const json& g : m.at("graphs"))
    if (g.at("name") == "decoder") decoder_file = g.at("file");
  if (decoder_file.empty()) throw Failure("the manifest lists no decoder graph");
  Ort::Session session(env, (root / decoder_file).c_str(), options);
  Decoder decoder(session, m);
  std::cerr << "onnxruntime " << Ort::GetVersionString() << "; " << kernel_note << "\n";

  // Greedy generation (model.py: BundleModel.generate at temperature 0, stop_on_eos).
  const int64_t budget = std::min<int64_t>(max_new, ctx - static_cast<int64_t>(prompt.size()));
  std::string stop = budget == max_new ? "length" : "context";
  std::vector<int64_t> generated;
  int decode_steps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t next = budget > 0 ? decoder.step(prompt) : -1;  // prefill: the whole prompt, an empty past
  const auto t1 = std::chrono::steady_clock::now();
  while (static_cast<int64_t>(generated.size()) < budget) {
    if (!eos.is_null() && next == eos.get<int64_t>()) {
      stop = "eos";
      break;
    }
    generated.push_back(next);
    if (static_cast<int64_t>(generated.size()) < budget) next = decoder.step({next}), ++decode_steps;
  }
  const auto t2 = std::chrono::steady_clock::now();

  for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? " " : "") << generated[i];
  std::cout << std::endl;
  const auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
  std::cerr << std::fixed << std::setprecision(1) << generated.size() << " new tokens (stop: " << stop
            << "); prefill of " << prompt.size() << " tokens " << ms(t1 - t0) << " ms, decode "
            << (decode_steps ? ms(t2 - t1) / decode_steps : 0.0) << " ms/token\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& e) {
    std::cerr << "error: " << e.what() << "\n";
  } catch (const Ort::Exception& e) {
    std::cerr << "error: ONNX Runtime: " << e.what() << "\n";
  } catch (const json::exception& e) {
    std::cerr << "error: manifest.json is malformed (" << e.what() << "); rebuild the bundle\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 2;
}
