"""Per-matrix widths (an expert's w1 and w2 at their own widths) against the build's per-expert plans, on
text-moe, to decide whether a format change that allows them is worth making (issue "Quality per byte": at
2.75 bits the default build is behind uniform 3 bits).

The packed format holds one width per expert (docs/FORMAT.md); the quantizer takes a width pair for studies
(quantization/primitives.Width), so this runs on the PyTorch side only, with the allocation study's protocol
(scripts/compare_allocations.py): routed experts only, everything else float, learned rounding (the build's
quantizer), scored against the float16 model on the first --windows windows of text_dev.

Plans, at each size of --sizes (average bits over the routed experts' weights):
  budget         the build's default: the exact knapsack on trace x error, one width per expert
  matrix-budget  the same knapsack over matrices: w1 and w2 of every expert are items of their own, each with
                 the expert's trace per weight times the matrix's own RTN error (the default predictor split
                 by matrix, with curvature assumed even over an expert's weights)
plus uniform 3 bits and the two uniform splits w1@3/w2@2 (8/3 bits: w1 holds 2/3 of an expert's weights) and
w1@2/w2@3 (7/3 bits). Paired differences with bootstrap intervals over the windows (seeds averaged):
matrix-budget against budget at each size, both at the largest size against uniform 3, and budget against each
uniform split at the split's size. The intervals do not include the quantizer's own run-to-run noise (on CUDA,
learned rounding is not deterministic).

    python scripts/compare_matrix_widths.py --sensitivity work/sens_text/sensitivity.json [--seeds 0,1]
        [--sizes 2.3333,2.5,2.6667,2.75] [--device cuda] [--out docs/matrix_widths]
    python scripts/compare_matrix_widths.py merge docs/matrix_widths part0.json part1.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_allocations import PAIRED_HEADER, RefLogProbs, paired_diff, paired_line  # noqa: E402

from mopeq_export.allocation import PlanConfig, budget_widths, make_plan  # noqa: E402
from mopeq_export.calibration import load_calibration  # noqa: E402
from mopeq_export.evaluate import text_windows  # noqa: E402
from mopeq_export.models.adapters import find_moe_layers  # noqa: E402
from mopeq_export.models.loading import load_model, load_tokenizer  # noqa: E402
from mopeq_export.quantization.pipeline import DEFAULT_SAMPLES, QuantizeConfig, quantize_layers  # noqa: E402
from mopeq_export.quantization.primitives import matrix_widths, rtn  # noqa: E402
from mopeq_export.quantization.signround import SignRoundConfig  # noqa: E402
from mopeq_export.sensitivity import load_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIDTHS = (2, 3, 4)


def matrix_errors(model, group_size: int) -> dict[str, list[dict[int, float]]]:
    """Per expert [w1's, w2's] {bits: ||W - Q_b(W)||^2} (RTN with the clipping search, as analyze's quant_error,
    which is their sum)."""
    out = {}
    for layer in find_moe_layers(model):
        for e, name in enumerate(layer.expert_names):
            out[name] = [{b: float(((w.float() - rtn(w, b, group_size).dequantize()) ** 2).sum()) for b in WIDTHS}
                         for w in (layer.get_w1(e), layer.get_w2(e))]
    return out


def matrix_plan(report, errors, params: dict[str, list[int]], size: float) -> dict[str, tuple[int, int]]:
    """The knapsack over matrices at `size` average bits (the default predictor, split by matrix)."""
    items, loss = [], []
    for e in report.experts:
        per_weight = (0.0 if e.no_tokens else max(e.hessian_trace, 0.0)) / e.params
        for m in range(2):
            items.append(SimpleNamespace(params=params[e.name][m]))
            loss.append([per_weight * errors[e.name][m][b] for b in WIDTHS])
    bits, _ = budget_widths(items, WIDTHS, size, np.array(loss))
    return {e.name: (int(bits[2 * i]), int(bits[2 * i + 1])) for i, e in enumerate(report.experts)}


def avg_bits(plan: dict, params: dict[str, list[int]]) -> float:
    tot = sum(p for ps in params.values() for p in ps)
    return sum(b * p for n, w in plan.items() for b, p in zip(matrix_widths(w), params[n])) / tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--model", default=str(SHARED / "models/text-moe"))
    ap.add_argument("--calib", default=str(SHARED / "data/text_calib.txt"))
    ap.add_argument("--data", default=str(SHARED / "data/text_dev.txt"))
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--sizes", default="2.3333333333,2.5,2.6666666667,2.75")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--iters", type=int, default=SignRoundConfig.iters, help="learned rounding's steps per layer")
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES["signround"], help="calibration windows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "work" / "matrix_widths"))
    args = ap.parse_args()
    torch.manual_seed(0)
    report = load_report(args.sensitivity)
    ref, _ = load_model(args.model, device=args.device)
    tok = load_tokenizer(args.model)
    scorer = RefLogProbs(ref, text_windows(args.data, tok, max_windows=args.windows or None))
    calib = load_calibration(args.calib, tok, ref.config, samples=args.samples)
    errors = matrix_errors(ref, 32)
    params = {n: [int(l.get_w1(e).numel()), int(l.get_w2(e).numel())]
              for l in find_moe_layers(ref) for e, n in enumerate(l.expert_names)}
    for e in report.experts:  # the split errors are analyze's quant_error, matrix by matrix
        assert abs(sum(m[3] for m in errors[e.name]) - e.quant_error[3]) <= 1e-3 * e.quant_error[3], e.name
    del ref
    names = [e.name for e in report.experts]
    plans = [("uniform-3", 3.0, {n: 3 for n in names}), ("split-w1@3-w2@2", 8 / 3, {n: (3, 2) for n in names}),
             ("split-w1@2-w2@3", 7 / 3, {n: (2, 3) for n in names})]
    for s in (float(x) for x in args.sizes.split(",")):
        plans.append(("budget", s, make_plan(report, PlanConfig("budget", avg_bits=s), args.sensitivity).experts))
        plans.append(("matrix-budget", s, matrix_plan(report, errors, params, s)))
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, target, plan in plans:
        size = avg_bits(plan, params)
        for seed in seeds:
            model, _ = load_model(args.model, device=args.device)
            layers = find_moe_layers(model)
            t = time.time()
            res = quantize_layers(model, layers, plan, calib, QuantizeConfig(method="signround",
                                                                             signround=SignRoundConfig(iters=args.iters, seed=seed)))
            nbytes = sum(q.codes.numel() * q.bits / 8 + q.scales.numel() * 3  # codes + float16 scale + 8-bit zero
                         for rs in res for r in rs for q in (r.w1, r.w2))
            row = {"plan": name, "size": target, "avg_bits": size, "quantizer": "signround", "seed": seed, "data": Path(args.data).name,
                   "expert_mb": nbytes / 1e6, "seconds": time.time() - t,
                   "w2_lower": sum(1 for w in plan.values() if matrix_widths(w)[1] < matrix_widths(w)[0]),
                   "w2_higher": sum(1 for w in plan.values() if matrix_widths(w)[1] > matrix_widths(w)[0]),
                   **scorer.score(model)}
            rows.append(row)
            del model, layers, res
            print(f"{name:18s} {size:.4f} s{seed} {row['expert_mb']:.3f} MB  ppl x{row['ppl_ratio']:.4f}  "
                  f"kl {row['kl']:.5f}  top1 {row['top1']:.4f}  w2 lower/higher {row['w2_lower']}/{row['w2_higher']}  "
                  f"{row['seconds']:.0f}s", flush=True)
            out.with_suffix(".json").write_text(json.dumps({"rows": rows}))
    print(write_report(rows, out, {"windows": args.windows, "seeds": seeds, "iters": args.iters,
                                   "samples": args.samples}))


def write_report(rows: list[dict], out: Path, protocol: dict) -> str:
    """The table (seeds averaged) and the paired differences, to OUT.md and OUT.json."""
    rng = np.random.default_rng(0)
    data = rows[0]["data"]
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["plan"], round(r["size"], 3)), []).append(r)
    lines = ["| plan | avg bits | seeds | expert MB | ppl ratio | KL | top-1 agree | experts with w2 below / above w1 |",
             "|---|---|---|---|---|---|---|---|"]
    for (plan, size), rs in by.items():
        lines.append(f"| {plan} | {rs[0]['avg_bits']:.3f} | {len(rs)} | {rs[0]['expert_mb']:.3f} | "
                     f"{np.mean([r['ppl_ratio'] for r in rs]):.4f} | {np.mean([r['kl'] for r in rs]):.5f} | "
                     f"{np.mean([r['top1'] for r in rs]):.4f} | {rs[0]['w2_lower']} / {rs[0]['w2_higher']} |")
    lines += ["", *PAIRED_HEADER]
    paired = []
    sizes = sorted({k[1] for k in by if k[0] == "budget"})
    pairs = [(("matrix-budget", s), ("budget", s)) for s in sizes]
    pairs += [((p, sizes[-1]), ("uniform-3", 3.0)) for p in ("matrix-budget", "budget")]
    pairs += [(("budget", round(8 / 3, 3)), ("split-w1@3-w2@2", round(8 / 3, 3))),
              (("budget", round(7 / 3, 3)), ("split-w1@2-w2@3", round(7 / 3, 3)))]
    for mine, base in pairs:
        if mine in by and base in by:
            d = paired_diff(by[mine], by[base], rng)
            paired.append({"mine": list(mine), "base": list(base), **d})
            lines.append(paired_line(data, mine[1], "signround", f"{mine[0]} vs {base[0]}@{base[1]:g}",
                                     by[mine], by[base], d))
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "paired": paired, "protocol": protocol}))
    return text


def merge(out: str, paths: list[str]) -> None:
    """One report from parts run separately (e.g. one seed each): their rows together."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    protocol = dict(docs[0].get("protocol", {}), seeds=sorted({r["seed"] for d in docs for r in d["rows"]}))
    print(write_report([r for d in docs for r in d["rows"]], Path(out), protocol))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        merge(sys.argv[2], sys.argv[3:])
    else:
        main()
