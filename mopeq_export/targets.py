"""Deployment targets as data: what each device gets (activation dtype, providers, opset/IR, memory).

Opset and IR version are chosen per target, deliberately:
- `cpu` (PyPI onnxruntime >= 1.20; >= 1.22 for a plan with an 8-bit dense class, MatMulNBits bits=8): opset 21, IR 10. PyPI onnxruntime 1.32 would take IR 14, but nothing
  in our graphs needs more than IR 10, and IR 10 keeps older desktop runtimes working.
- `cuda` (PyPI onnxruntime-gpu): opset 21, IR 10. onnxruntime-gpu 1.31.1 refuses IR 14 ("max supported IR
  version: 13"), see docs/FACTS.md; IR 10 has margin.
- `jetson-*` (ONNX Runtime built for JetPack, which lags PyPI: JetPack 5 builds are ORT 1.15-1.17,
  JetPack 6 builds 1.17-1.20): opset 19, IR 9. Opset 19 is the floor for our graphs: the portable function
  body needs BitwiseAnd/BitwiseOr (opset 18) and Equal on strings (opset 19, to pick the activation from
  the node's string attribute). ORT runs opset 19 since 1.16 and IR 9 since 1.15, so any JetPack 6 build
  (and late JetPack 5 builds) load the files.

`jetson` is an alias of `jetson-orin-nano`: the smallest Orin (8 GB shared CPU/GPU memory), so a bundle built
for plain "jetson" fits every Orin; a bigger board only gains headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import MopeqError


@dataclass(frozen=True)
class Target:
    name: str
    activation_dtype: str           # 'float32' | 'float16': activations, KV cache and non-expert weights
    providers: tuple[str, ...]      # ONNX Runtime execution providers, in preference order
    arch: str                       # 'x86_64' | 'aarch64'
    cuda_arch: str | None           # e.g. 'sm_87' (Orin); None for CPU-only or "any CUDA GPU"
    memory_gib: float               # device memory (on Jetson: shared by CPU and GPU)
    memory_share: float             # fraction of memory_gib usable for model weights + KV cache
    default_avg_bits: float         # MoPEQ average bit budget suggested for this device
    opset: int
    ir_version: int
    description: str
    # widths of com.microsoft.MatMulNBits that the target's ONNX Runtime runs (dense layers quantized at
    # another width are exported dequantized): 4 since ORT 1.17 (CPU, CUDA); 8 since ORT 1.22 on the CPU
    nbits_widths: tuple[int, ...] = (4,)
    # MatMulNBits' accuracy_level: 4 = int8 activations (ORT's integer kernels), 0 = float activations. On
    # the cpu target 4: text-moe's held-out perplexity moved +0.0007 %, 4 of 5 prompts kept 32 identical greedy
    # tokens (the fifth flipped at a 0.08-logit near-tie), and the OLMoE-1B-7B-shape bundle decodes 1.5x
    # faster (docs/RESULTS.md "CPU decode"). ORT's CUDA provider ignores it.
    nbits_accuracy_level: int = 0

    def to_json(self) -> dict:
        return asdict(self)


_CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
_JETSON = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "float32", ("CPUExecutionProvider",), "x86_64", None, 24, 0.5, 3.0, 21, 10,
           "x86-64 desktop/server CPU (AVX2/AVX-512), our C++ kernel", (4, 8), nbits_accuracy_level=4),
    Target("cuda", "float16", _CUDA, "x86_64", None, 24, 0.8, 3.0, 21, 10,
           "discrete NVIDIA GPU with onnxruntime-gpu"),
    Target("jetson-orin-nano", "float16", _JETSON, "aarch64", "sm_87", 8, 0.5, 2.5, 19, 9,
           "Jetson Orin Nano 8 GB (68 GB/s; memory shared with the OS and the CPU)"),
    Target("jetson-orin-nx", "float16", _JETSON, "aarch64", "sm_87", 16, 0.6, 3.0, 19, 9,
           "Jetson Orin NX 16 GB (102 GB/s)"),
    Target("jetson-agx-orin", "float16", _JETSON, "aarch64", "sm_87", 64, 0.7, 4.0, 19, 9,
           "Jetson AGX Orin 64 GB (205 GB/s)"),
)}

ALIASES = {"jetson": "jetson-orin-nano"}  # the smallest Orin: a plain "jetson" bundle fits all of them


def get_target(name: str) -> Target:
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        valid = ", ".join([*TARGETS, *(f"{a} (= {t})" for a, t in ALIASES.items())])
        raise MopeqError(f"unknown target '{name}'; choose one of: {valid}")
    return TARGETS[key]
