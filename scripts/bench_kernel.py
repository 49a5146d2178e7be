"""Benchmark mopeq.MoEExperts against ONNX Runtime's QMoE (2/4/8 bits) and MoE (float32), OLMoE-like layer.

    .venv/bin/python scripts/bench_kernel.py --tokens 1,16,256 --threads 1,2 --calls 50 [--json out.json]
        [--experts 64] [--group 128]

Layer: H=2048, 64 experts, I=1024, top-8, group/block 128, SwiGLU. Variants, all on the CPU provider:
  mopeq <path>    our op (mixed widths 40x2 16x3 8x4 bits, fp16 scales + u8 zeros), MOPEQ_KERNEL=<path>
                  (--paths; default: auto = the best integer path, plus the float-activation path avx2)
  QMoE <b>b acc<a>  com.microsoft.QMoE, expert_weight_bits=b (2, 4, 8; ORT's CPU kernel refuses 3 bits with
                  float32 activations), block_size=128, accuracy_level=a (0, 4), swiglu_fusion=1 (gate/up rows
                  interleaved), symmetric (no zero points: ORT's default zero point 2^(b-1)), float32 scales
  MoE fp32        com.microsoft.MoE with float32 weights, swiglu_fusion=1
Each call feeds T random tokens and random router logits [T, 64]; QMoE/MoE take the top-8 of the logits and
softmax over them (normalize_routing_weights=1); our op gets the same top-8 indices and weights. Each call
uses fresh logits, so consecutive calls touch different experts; the variants run round-robin (call by call,
in a shuffled order); with --flush, a read of 1.5x the L3 cache before each call evicts the weights
(the two mopeq paths share one weight buffer, as do QMoE acc0/acc4 of one width).
Weight bytes per call = the bytes of the distinct experts the call routes to, in each variant's own format.
µs/call is the median; GB/s = mean bytes / median time; "of copy" = GB/s over a 512 MiB NumPy copy measured
in the same run (read + write bytes / time). The last column is QMoE 4b acc4's time over the variant's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from mopeq_export.quantization import packing as P
from mopeq_runtime.native import library_path

H, E, I, TOP_K, GROUP = 2048, 64, 1024, 8, 128
BITS = [2] * 40 + [3] * 16 + [4] * 8  # our mix: average 2.5 bits
PARAMS = 2 * I * H + H * I  # weights of one expert (fused gate/up + down)
REF = "QMoE 4b acc4"


# ---------------------------------------------------------------------------------------------- our op
def random_layer(rng):
    """Layout v2 (docs/FORMAT.md §4): every expert matrix in tiles of 16 rows, [rows/16, J, 16]."""
    layer, tile = {}, P.TILE_ROWS
    for m, rows, k in (("w1", 2 * I, H), ("w2", H, I)):
        P.check_tile_rows(rows, f"the benchmark layer's {m}")
        G = P.num_groups(k, GROUP)
        packed = {b: [] for b in P.SUPPORTED_BITS}
        for b in BITS:  # random words are valid codes at every width, in any order: drawn tiled, no packing
            packed[b].append(rng.integers(0, 2**32, (rows // tile, P.num_blocks(k) * b, tile), dtype=np.uint32))
        for b in P.SUPPORTED_BITS:
            empty = np.zeros((0, rows // tile, P.num_blocks(k) * b, tile), np.uint32)
            layer[f"{m}.q{b}"] = np.stack(packed[b]) if packed[b] else empty
        # random per (row, group), so drawn in the tiled shape directly (= tile_rows of a [E, rows, G] draw)
        layer[f"{m}.scales"] = rng.uniform(0.002, 0.02, (E, rows // tile, G, tile)).astype(np.float16)
        layer[f"{m}.zeros"] = rng.integers(0, 4, (E, rows // tile, G, tile), dtype=np.uint8)
    return {n: aligned(a) for n, a in layer.items()}


def mopeq_expert_bytes(e):
    codes = (2 * I * P.num_blocks(H) + H * P.num_blocks(I)) * BITS[e] * 4
    params = (2 * I * P.num_groups(H, GROUP) + H * P.num_groups(I, GROUP)) * 3  # fp16 scale + u8 zero
    return codes + params


def aligned(a, align=4096):
    """A page-aligned copy of a (ORT's own allocator aligns initializers; a large NumPy array is 16-aligned)."""
    buf = np.empty(a.nbytes + align, np.uint8)
    off = -buf.ctypes.data % align
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _session(nodes, inputs, inits, threads, domain, custom_lib=None):
    """One-node session; the weights are handed over in memory (add_external_initializers: no 2 GB protobuf)."""
    tensors = []
    for name, a in inits.items():
        t = TensorProto(name=name, dims=a.shape, data_type=helper.np_dtype_to_tensor_dtype(a.dtype))
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=f"in-memory/{name}")
        tensors.append(t)
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", H])
    graph = helper.make_graph(nodes, "bench", inputs, [out], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    if custom_lib:
        so.register_custom_ops_library(custom_lib)
    so.intra_op_num_threads = threads
    # nine sessions share two cores: idle pool threads must not spin-wait through the other sessions' calls
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in inits.values()]  # no copy: keep them alive
    so.add_external_initializers(list(inits), values)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.keep_alive = values
    return sess


def mopeq_session(layer, threads):
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", H]),
              helper.make_tensor_value_info("indices", TensorProto.INT64, ["T", TOP_K]),
              helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["T", TOP_K])]
    node = helper.make_node("MoEExperts", ["hidden", "indices", "weights", *P.LAYER_TENSOR_NAMES], ["out"],
                            domain="mopeq", expert_bits=BITS, group_size=GROUP, activation="silu",
                            layout_version=P.LAYOUT_VERSION)
    inits = {n: layer[n] for n in P.LAYER_TENSOR_NAMES}
    return _session([node], inputs, inits, threads, "mopeq", str(library_path()))


# ------------------------------------------------------------------------------------- ONNX Runtime ops
def ort_weights(rng, bits):
    """QMoE (bits) or MoE (bits=None) initializers: fc1 [E, 2I, H*b/8] rows interleaved gate/up, fc2 [E, H, I*b/8]."""
    if bits is None:
        w = {"fc1": rng.random((E, 2 * I, H), np.float32) - 0.5, "fc2": rng.random((E, H, I), np.float32) - 0.5}
    else:
        w = {"fc1": rng.integers(0, 256, (E, 2 * I, H * bits // 8), dtype=np.uint8),
             "fc1_s": rng.uniform(0.002, 0.02, (E, 2 * I, H // GROUP)).astype(np.float32),
             "fc2": rng.integers(0, 256, (E, H, I * bits // 8), dtype=np.uint8),
             "fc2_s": rng.uniform(0.002, 0.02, (E, H, I // GROUP)).astype(np.float32)}
    return {n: aligned(a) for n, a in w.items()}


def ort_session(weights, bits, acc, threads):
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", H]),
              helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, ["T", E])]
    attrs = dict(k=TOP_K, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                 activation_alpha=1.0, activation_beta=0.0)  # silu(gate) * up
    if bits is None:  # input, router_probs, fc1_experts_weights, fc1_experts_bias, fc2_experts_weights
        node = helper.make_node("MoE", ["input", "router_probs", "fc1", "", "fc2"], ["out"],
                                domain="com.microsoft", **attrs)
    else:  # ... fc1_experts_weights, fc1_scales, fc1_experts_bias, fc2_experts_weights, fc2_scales
        node = helper.make_node("QMoE", ["input", "router_probs", "fc1", "fc1_s", "", "fc2", "fc2_s"], ["out"],
                                domain="com.microsoft", expert_weight_bits=bits, block_size=GROUP,
                                accuracy_level=acc, weights_prepacked=0, **attrs)
    return _session([node], inputs, weights, threads, "com.microsoft")


def ort_expert_bytes(bits):
    if bits is None:
        return PARAMS * 4
    return PARAMS * bits // 8 + PARAMS // GROUP * 4  # packed codes + float32 block scales


# -------------------------------------------------------------------------------------------- measuring
def copy_bandwidth(nbytes=512 << 20, reps=5):
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * nbytes / best  # read + write


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def l3_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) << {"K": 10, "M": 20, "G": 30}[s[-1]]
    except (OSError, KeyError, ValueError):
        return 64 << 20


def make_variants(args, layer, ort_w, threads):
    """[(name, session, kernel path or None, bytes of one expert e)] for one thread count."""
    variants = []
    sess = mopeq_session(layer, threads)
    for path in args.paths.split(","):
        variants.append((f"mopeq {path}", sess, path, mopeq_expert_bytes))
    for bits in (2, 4, 8):
        for acc in (0, 4):
            s = ort_session(ort_w[bits], bits, acc, threads)
            variants.append((f"QMoE {bits}b acc{acc}", s, None, lambda e, b=bits: ort_expert_bytes(b)))
    if not args.no_float:
        s = ort_session(ort_w[None], None, 0, threads)
        variants.append(("MoE fp32", s, None, lambda e: ort_expert_bytes(None)))
    return variants


def run_call(variant, x, idx, w, logits):
    name, sess, path, _ = variant
    if path is not None:
        os.environ["MOPEQ_KERNEL"] = path
        return _timed(lambda: sess.run(None, {"hidden": x, "indices": idx, "weights": w}))
    return _timed(lambda: sess.run(None, {"input": x, "router_probs": logits}))


def bench(variants, T, calls, rng, flush_buf):
    """Round-robin: every call, all variants (shuffled order) on the same tokens and routing. -> per-variant stats."""
    times = {v[0]: [] for v in variants}
    nbytes = {v[0]: [] for v in variants}
    failed = {}
    warmup = 1 if T >= 256 else 2
    for c in range(warmup + calls):
        x = rng.standard_normal((T, H), np.float32)
        logits = rng.standard_normal((T, E), np.float32)
        idx = np.argsort(-logits, axis=1)[:, :TOP_K].astype(np.int64)
        top = np.take_along_axis(logits, idx, 1)
        w = np.exp(top - top.max(1, keepdims=True))
        w = (w / w.sum(1, keepdims=True)).astype(np.float32)
        experts = np.unique(idx)
        for k in rng.permutation(len(variants)):
            v = variants[k]
            if v[0] in failed:
                continue
            if flush_buf is not None:
                flush_buf.max()  # read 1.5x L3: no weights left in cache (variants may share weight buffers)
            try:
                t = run_call(v, x, idx, w, logits)
            except Exception as e:  # e.g. a kernel path this CPU lacks
                failed[v[0]] = str(e).split(": ")[-1][:80]
                continue
            if c >= warmup:
                times[v[0]].append(t)
                nbytes[v[0]].append(sum(v[3](int(e)) for e in experts))
    os.environ.pop("MOPEQ_KERNEL", None)
    stats = {}
    for name, _, _, _ in variants:
        if name in failed:
            stats[name] = {"error": failed[name]}
        else:
            t, b = float(np.median(times[name])), float(np.mean(nbytes[name]))
            stats[name] = {"us": t * 1e6, "mb": b / 1e6, "gbs": b / t / 1e9}
    return stats


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    global E, BITS, GROUP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50, help="timed calls per variant (fewer at large T, min 5)")
    ap.add_argument("--tokens", default="1,16,256", help="comma-separated token counts T")
    ap.add_argument("--threads", default="1,2", help="comma-separated ORT intra-op thread counts")
    ap.add_argument("--paths", default="auto", help="MOPEQ_KERNEL paths of our op (auto: the best integer path)")
    ap.add_argument("--no-float", action="store_true", help="skip ORT MoE float32 (1.6 GB of weights)")
    ap.add_argument("--flush", action="store_true",
                    help="read 1.5x the L3 size before each call (on VMs that report a huge L3 this inflated "
                         "every variant's time about 5x; off by default: variants rotate through ~2.5 GB)")
    ap.add_argument("--json", help="also write the rows (and run facts) to this JSON file")
    ap.add_argument("--experts", type=int, default=E, help="experts in the layer (8: every call routes to all "
                    "of them, so the weights stay in cache: the compute-bound time; 64: the OLMoE layer)")
    ap.add_argument("--group", type=int, default=GROUP, help="group/block size of every variant (our bundles' "
                    "default is 32; ORT's QMoE takes 16..128 powers of two)")
    args = ap.parse_args()
    if args.experts < TOP_K:
        ap.error(f"--experts must be at least top-k ({TOP_K})")
    if args.experts != E:  # the same 2.5-bit mix, scaled; 8 experts (all routed each call) stay in the L3 cache
        E = args.experts
        BITS = [2] * round(E * 40 / 64) + [3] * round(E * 16 / 64)
        BITS += [4] * (E - len(BITS))
    GROUP = args.group
    tokens = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    layer = random_layer(rng)
    ort_w = {b: ort_weights(rng, b) for b in (2, 4, 8)}
    if not args.no_float:
        ort_w[None] = ort_weights(rng, None)
    copy_bw = copy_bandwidth()
    flush_buf = None if not args.flush else np.ones(int(1.5 * l3_bytes()) // 8, np.uint64)
    load = os.getloadavg()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, L3 {l3_bytes() >> 20} MiB; onnxruntime {ort.__version__}; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write, 512 MiB); load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; L3 flush {'off' if not args.flush else 'on'}")
    mix = " ".join(f"{BITS.count(b)}x{b}" for b in (2, 3, 4))
    print(f"layer H={H} E={E} I={I} top-{TOP_K} group {GROUP}; mopeq widths {mix} (avg {np.mean(BITS):.2f} bits)\n")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        variants = make_variants(args, layer, ort_w, threads)
        for T in tokens:
            calls = min(args.calls, max(5, args.calls * 16 // T))
            stats = bench(variants, T, calls, rng, flush_buf)
            ref = stats.get(REF, {}).get("us")
            for name, s in stats.items():
                row = {"T": T, "threads": threads, "variant": name, "calls": calls, **s}
                if "us" in s:
                    row["of_copy"] = s["gbs"] * 1e9 / copy_bw
                    row["vs_ref"] = ref / s["us"] if ref else None
                rows.append(row)
        del variants
    rows.sort(key=lambda r: (r["T"], r["threads"]))
    print("| T | threads | variant | µs/call | weight MB/call | GB/s | of copy | vs QMoE 4-bit acc4 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['T']} | {r['threads']} | {r['variant']} | n/a ({r['error']}) | | | | |")
            continue
        vs = f"{r['vs_ref']:.2f}" if r["vs_ref"] else "-"
        print(f"| {r['T']} | {r['threads']} | {r['variant']} | {r['us']:.0f} | {r['mb']:.1f} | {r['gbs']:.2f} | "
              f"{r['of_copy']:.2f} | {vs} |")
    if args.json:
        meta = {"cpu": cpu_model(), "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "copy_gbs": copy_bw / 1e9,
                "loadavg": load, "l3_flush": args.flush, "experts": E, "group": GROUP, "bits": BITS}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
