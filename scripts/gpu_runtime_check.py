"""A cuda-target bundle on the GPU through mopeq_runtime: where every node runs, greedy tokens GPU vs CPU, speed.

    python scripts/gpu_runtime_check.py BUNDLE > result.json

Needs onnxruntime-gpu (docs/RESULTS.md "GPU runtime" says how it was installed on the GPU machine) and a bundle
whose kernel library has the CUDA op (built with `make kernels-cuda`, or `pip install ./runtime` where nvcc is
found, before `mopeq-export build --target cuda`). Placement comes from ORT's profile of one prefill (each node's
provider); the greedy comparison runs 16 tokens from three prompts on device="cuda" and device="cpu", and at a
first difference reports the CPU's top-2 logit gap there (a near-tie) and the largest logit difference.
Prints one JSON object."""
import json, os, sys, time
import numpy as np
import onnxruntime as ort

ort.preload_dlls()
import mopeq_runtime  # noqa: E402

b = sys.argv[1]
res = {"ort": ort.__version__, "providers_available": ort.get_available_providers()}
gpu = mopeq_runtime.load(b, device="cuda")
cpu = mopeq_runtime.load(b, device="cpu", allow_foreign_target=True)
res["gpu_providers"], res["gpu_kernel"] = gpu.providers, gpu.kernel.reason
res["cpu_kernel"] = cpu.kernel.reason

# placement: the decoder in a profiled session with the bundle's library on the CUDA provider
man = json.load(open(os.path.join(b, "manifest.json")))
so = ort.SessionOptions()
so.register_custom_ops_library(os.path.join(b, man["kernel"]["library"]))
so.enable_profiling = True
so.profile_file_prefix = "/tmp/placement"
sess = ort.InferenceSession(os.path.join(b, "decoder.onnx"), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
ids = np.array([[3, 5, 7, 11]], np.int64)
feeds = {"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.arange(4)[None]}
for i in sess.get_inputs():
    if i.name.startswith("past"):
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float16)
sess.run(None, feeds)
prof = json.load(open(sess.end_profiling()))
place = {}
for ev in prof:
    a = ev.get("args", {})
    if ev.get("cat") == "Node" and "provider" in a:
        place.setdefault(a.get("op_name"), set()).add(a["provider"])
res["placement"] = {k: sorted(v) for k, v in sorted(place.items())}
res["moe_on_gpu_only"] = place.get("MoEExperts") == {"CUDAExecutionProvider"}

prompts = ["The os module provides", "In 1905, Albert Einstein", "def fibonacci(n):"]
res["tokens"] = []
for p in prompts:
    g, c = gpu.generate(p, max_new_tokens=16, stop_on_eos=False), cpu.generate(p, max_new_tokens=16, stop_on_eos=False)
    row = {"prompt": p, "same": g.token_ids == c.token_ids, "gpu": list(g.token_ids), "cpu": list(c.token_ids)}
    if not row["same"]:  # the first difference: logits of both at that step
        k = next(i for i, (x, y) in enumerate(zip(g.token_ids, c.token_ids)) if x != y)
        ctx = gpu.prompt_ids(p) + list(g.token_ids[:k])
        lg, _ = gpu.forward(np.array([ctx])); lc, _ = cpu.forward(np.array([ctx]))
        top = np.sort(lc[0, -1])[::-1]
        row["first_diff"] = {"step": k, "cpu_top2_gap": float(top[0] - top[1]),
                             "max_abs_logit_diff": float(np.abs(lg[0, -1] - lc[0, -1]).max())}
    res["tokens"].append(row)

def tps(m, n=64):
    m.generate("The os module provides", max_new_tokens=4, stop_on_eos=False)
    t0 = time.perf_counter(); g = m.generate("The os module provides", max_new_tokens=n, stop_on_eos=False)
    return len(g.token_ids) / (time.perf_counter() - t0)
res["tok_s_gpu"], res["tok_s_cpu_16cores"] = tps(gpu), tps(cpu)
print(json.dumps(res))
