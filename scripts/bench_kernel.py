"""Microbenchmark of libmopeq_ops' mopeq.MoEExperts at OLMoE-like sizes, one token (decode).

Baseline in the same run: a large NumPy copy (memory bandwidth, read + write). The kernel's figure is
the bytes of the routed experts' packed codes + scales + zeros it must read per call, over the time.
Routing rotates over all experts so weights come from memory, not cache.

    .venv/bin/python scripts/bench_kernel.py [--calls 50] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mopeq_export.quantization import packing as P
from mopeq_runtime.native import library_path

H, E, I, TOP_K, GROUP = 2048, 64, 1024, 8, 128
BITS = [2] * 40 + [3] * 16 + [4] * 8  # average 2.5 bits


def random_layer(rng, bits):
    layer = {}
    for m, rows, k in (("w1", 2 * I, H), ("w2", H, I)):
        G = P.num_groups(k, GROUP)
        packed = {b: [] for b in P.SUPPORTED_BITS}
        for b in bits:  # random words are valid codes at every width; skip packing 64 x 6M codes
            packed[b].append(rng.integers(0, 2**32, (rows, P.num_blocks(k) * b), dtype=np.uint32))
        for b in P.SUPPORTED_BITS:
            layer[f"{m}.q{b}"] = np.stack(packed[b]) if packed[b] else np.zeros((0, rows, P.num_blocks(k) * b), np.uint32)
        layer[f"{m}.scales"] = rng.uniform(0.002, 0.02, (E, rows, G)).astype(np.float16)
        layer[f"{m}.zeros"] = rng.integers(0, 4, (E, rows, G), dtype=np.uint8)
    return layer


def expert_bytes(e):
    b = BITS[e]
    codes = (2 * I * P.num_blocks(H) + H * P.num_blocks(I)) * b * 4
    params = (2 * I * P.num_groups(H, GROUP) + H * P.num_groups(I, GROUP)) * 3  # fp16 scale + u8 zero
    return codes + params


def make_session(layer, threads):
    names = ["hidden", "indices", "weights"]
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, H]),
              helper.make_tensor_value_info("indices", TensorProto.INT64, [1, TOP_K]),
              helper.make_tensor_value_info("weights", TensorProto.FLOAT, [1, TOP_K])]
    inits = [numpy_helper.from_array(layer[n], n) for n in P.LAYER_TENSOR_NAMES]
    node = helper.make_node("MoEExperts", names + list(P.LAYER_TENSOR_NAMES), ["out"], domain="mopeq",
                            expert_bits=BITS, group_size=GROUP, activation="silu", layout_version=1)
    graph = helper.make_graph([node], "bench", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, H])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mopeq", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_path()))
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def copy_bandwidth(nbytes=512 << 20, reps=5):
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * nbytes / best  # read + write


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(sess, routes, rng, calls):
    x = rng.standard_normal((1, H)).astype(np.float32)
    w = np.full((1, TOP_K), 1.0 / TOP_K, np.float32)
    for r in routes[:5]:
        sess.run(None, {"hidden": x, "indices": r[None], "weights": w})
    times, nbytes = [], []
    for r in routes[5:5 + calls]:
        times.append(_timed(lambda: sess.run(None, {"hidden": x, "indices": r[None], "weights": w})))
        nbytes.append(sum(expert_bytes(e) for e in r))
    i = int(np.argsort(times)[len(times) // 2])
    return times[i], nbytes[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", default="1,2", help="comma-separated ORT intra-op thread counts")
    ap.add_argument("--paths", default="avx2,avx512,i8-avx2,i8-avx512,i8-avx512vnni,auto")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layer = random_layer(rng, BITS)
    routes = [rng.permutation(E)[:TOP_K].astype(np.int64) for _ in range(args.calls + 5)]
    copy_bw = copy_bandwidth()
    mean_bytes = np.mean([sum(expert_bytes(e) for e in r) for r in routes])
    print(f"OLMoE-like layer: H={H} E={E} I={I} top-{TOP_K} g={GROUP}, widths 40x2 16x3 8x4 (avg 2.5 bits); "
          f"{mean_bytes / 1e6:.1f} MB of routed weights per token")
    print(f"baseline: numpy copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write, 512 MiB); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs skew timings)\n")
    print(f"{'path':<8} {'threads':>7} {'latency ms':>11} {'weight GB/s':>12} {'vs copy':>8}")
    for threads in [int(t) for t in args.threads.split(",")]:
        sess = make_session(layer, threads)
        for path in args.paths.split(","):
            os.environ["MOPEQ_KERNEL"] = path
            try:
                t, nbytes = bench(sess, routes, rng, args.calls)
            except Exception as e:  # a path this CPU lacks
                print(f"{path:<8} {threads:>7} {'n/a':>11}   ({str(e).split(': ')[-1][:60]})")
                continue
            print(f"{path:<8} {threads:>7} {t * 1e3:>11.3f} {nbytes / t / 1e9:>12.2f} {nbytes / t / copy_bw:>8.2f}")
    os.environ.pop("MOPEQ_KERNEL", None)


if __name__ == "__main__":
    main()
