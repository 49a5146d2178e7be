"""Per-token decode latency of text-moe through ONNX Runtime: the custom-op graph vs float32 stock ops.

    python scripts/bench_decode.py [--model ../shared/models/text-moe] [--work /tmp/mopeq_bench]
                                   [--tokens 64] [--rounds 3] [--threads 1]

Builds (once, cached in --work) a 2.5-average-bit plan (per layer 10 experts at 2 bits, 4 at 3, 2 at 4,
shuffled), quantizes it with RTN, exports it for the cpu target, and exports the same model at float32
with stock ops (experts unquantized). Then, in one process, it decodes greedily after a 32-token prompt
and times every single-token decoder call:

    float32 stock ops     the baseline
    mopeq + kernel        custom-op graph, libmopeq_ops registered
    mopeq function body   the same file in stock ORT (function inlined, dequantized densely)

Variants are interleaved round by round so that load from other jobs hits all of them alike. Ratios are
baseline latency / variant latency (> 1: faster than float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
MIX = [2] * 10 + [3] * 4 + [4] * 2  # 2.5 bits on average per layer of 16 experts


def build(model_dir: Path, work: Path) -> tuple[Path, Path]:
    from mopeq_export.models.adapters import find_moe_layers
    from mopeq_export.models.loading import load_model
    from mopeq_export.quantization.pipeline import QuantizeConfig
    from mopeq_export.quantization.stage import run_quantize
    from mopeq_exporters import export_float_reference, export_quantized

    work.mkdir(parents=True, exist_ok=True)
    quant, ref = work / "onnx_mopeq_2.5bit", work / "onnx_float32"
    if not (quant / "export.json").exists():
        model, info = load_model(model_dir)
        rng = np.random.default_rng(0)
        plan = {}
        for layer in find_moe_layers(model):
            if layer.num_experts != len(MIX):
                raise SystemExit(f"the 2.5-bit mix is written for 16 experts per layer, got {layer.num_experts}")
            plan.update(zip(layer.expert_names, (int(b) for b in rng.permutation(MIX))))
        (work / "plan.json").write_text(json.dumps({"kind": "mopeq.bitplan", "experts": plan, "method": "bench-2.5", "avg_bits": 2.5,
                                                    "model": {"weights_sha256": info.weights_sha256}}))
        run_quantize(model_dir, work / "plan.json", work / "q", calib=None, cfg=QuantizeConfig(method="rtn"))
        export_quantized(work / "q", "cpu", quant)
    if not (ref / "export.json").exists():
        export_float_reference(model_dir, ref, "cpu")
    return quant, ref


def decode_times(ex, prompt: np.ndarray, tokens: int) -> list[float]:
    logits, past = ex.step(prompt, ex.empty_past(1))
    nxt = logits[:, -1:].argmax(-1).astype(np.int64)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits, past = ex.step(nxt, past)
        times.append(time.perf_counter() - t0)
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "text-moe")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mopeq_bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from mopeq_exporters.ort_check import Exported

    quant, ref = build(args.model, args.work)
    variants = {
        "float32 stock ops": Exported(ref, kernel=False, threads=args.threads),
        "mopeq 2.5-bit + kernel": Exported(quant, kernel=True, threads=args.threads),
        "mopeq 2.5-bit function body": Exported(quant, kernel=False, threads=args.threads),
    }
    prompt = np.random.default_rng(0).integers(3, 4096, (1, 32)).astype(np.int64)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for ex in variants.values():  # warm-up: session creation, first-run allocations
        decode_times(ex, prompt, 4)
    for _ in range(args.rounds):
        for name, ex in variants.items():
            times[name] += decode_times(ex, prompt, args.tokens)

    sizes = {name: sum(f.stat().st_size for f in ex.folder.glob("decoder.onnx*")) for name, ex in variants.items()}
    base = statistics.median(times["float32 stock ops"])
    print(f"text-moe decode, batch 1, prompt 32, {args.tokens} tokens x {args.rounds} rounds, "
          f"intra-op threads {args.threads}")
    print("| graph | file MiB | median ms/token | p90 ms/token | tokens/s | speed vs float32 |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        med, p90 = statistics.median(t), float(np.percentile(t, 90))
        print(f"| {name} | {sizes[name] / 2**20:.1f} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | {1 / med:.0f} | "
              f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
