"""Compare bit allocations at matched sizes on text-moe: quality vs size, table + plot into docs/.

Methods at each average width B in --sizes:
  random     seeded random assignment of the two widths around B (the baseline a plan must beat)
  frequency  ranked by activation frequency (the paper's ablation, filled to B)
  hessian    ranked by Hessian trace (the paper's signal, filled to B)
  budget     exact knapsack on the second-order loss estimate (this project's default)
  budget:P   the same knapsack on predictor P's loss table [expert, width] from scripts/bench_predictor.py's
             JSON (--predictions FILE --budget-on P,Q,...: e.g. gn_output, freq_x_err)
plus uniform 2/3/4 bits and the paper's k-means clustering (layer and model scope) at its own average.
Every plan is quantized with --quantizer (default signround, the build's text default; the families in --rtn
also with RTN) and evaluated against the float16 model on the first --windows windows of text_dev
(perplexity ratio, KL, top-1 agreement).

    python scripts/compare_allocations.py --sensitivity work/sens/sensitivity.json [--windows 128] [--rtn uniform,random,budget]
        [--quantizer signround|gptq] [--device cuda] [--predictions docs/predictor.json --budget-on gn_output]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mopeq_export.allocation import PlanConfig, budget_widths, make_plan
from mopeq_export.calibration import load_calibration
from mopeq_export.evaluate import text_windows
from mopeq_export.models.adapters import find_moe_layers
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.quantization.checkpoint import layer_tensors
from mopeq_export.quantization.pipeline import DEFAULT_SAMPLES, QuantizeConfig, quantize_layers
from mopeq_export.quantization.signround import SignRoundConfig
from mopeq_export.sensitivity import load_report

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def random_plan(names, params, budget: float, seed: int = 0) -> dict[str, int]:
    lo = int(np.floor(budget)) if budget < 4 else 3
    n_hi = int(round((budget - lo) * len(names)))  # experts of one layer size: equal params
    rng = np.random.default_rng(seed)
    hi = set(rng.choice(len(names), n_hi, replace=False).tolist())
    return {n: lo + 1 if i in hi else lo for i, n in enumerate(names)}


class RefLogProbs:
    """Float16 reference log-probabilities of the evaluation windows, computed once."""

    def __init__(self, model, windows: torch.Tensor, batch: int = 8):
        windows = windows.to(next(model.parameters()).device)
        self.windows, self.batch = windows, batch
        with torch.no_grad():
            self.logp = [torch.log_softmax(model(input_ids=w).logits.float(), -1).half() for w in windows.split(batch)]

    def score(self, model) -> dict:
        nll_ref = nll = kl = agree = n = 0.0
        with torch.no_grad():
            for w, lr in zip(self.windows.split(self.batch), self.logp):
                lq = torch.log_softmax(model(input_ids=w).logits.float(), -1)[:, :-1]
                lr = lr[:, :-1].float()
                t = w[:, 1:, None]
                nll_ref += float(-lr.gather(-1, t).sum())
                nll += float(-lq.gather(-1, t).sum())
                kl += float((lr.exp() * (lr - lq)).sum())
                agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
                n += t.numel()
        return {"ppl_ref": float(np.exp(nll_ref / n)), "ppl": float(np.exp(nll / n)),
                "ppl_ratio": float(np.exp((nll - nll_ref) / n)), "kl": kl / n, "top1": agree / n}


def table_plan(report, table: dict[str, list[float]], size: float, widths=(2, 3, 4)) -> dict[str, int]:
    """The budget plan's exact knapsack (allocation.budget_widths) on a given loss table."""
    loss = np.array([table[str(b)] for b in widths], dtype=np.float64).T  # [experts, widths]
    bits, _ = budget_widths(report.experts, widths, size, loss)
    return {e.name: int(b) for e, b in zip(report.experts, bits)}


def plans(report, sizes, src, tables: dict | None = None, fixed: bool = True) -> list[tuple[str, float, dict]]:
    """Every plan of the study; `fixed`: also uniform 2/3/4 and k-means at its own sizes."""
    names = [e.name for e in report.experts]
    params = [e.params for e in report.experts]
    out = [(f"uniform-{b}", float(b), make_plan(report, PlanConfig("uniform", avg_bits=b), src).experts)
           for b in (2, 3, 4)] if fixed else []
    for scope in ("layer", "model") if fixed else ():
        p = make_plan(report, PlanConfig("kmeans", scope=scope), src)
        out.append((f"kmeans-{scope}", p.avg_bits, p.experts))
        out.append((f"budget@kmeans-{scope}", p.avg_bits,
                    make_plan(report, PlanConfig("budget", avg_bits=p.avg_bits), src).experts))
    for b in sizes:
        out.append(("random", b, random_plan(names, params, b)))
        out.append(("frequency", b, make_plan(report, PlanConfig("frequency", avg_bits=b), src).experts))
        out.append(("hessian", b, make_plan(report, PlanConfig("kmeans", avg_bits=b), src).experts))
        out.append(("budget", b, make_plan(report, PlanConfig("budget", avg_bits=b), src).experts))
        for key, table in (tables or {}).items():
            out.append((f"budget:{key}", b, table_plan(report, table, b)))
    return out


def write_outputs(rows: list[dict], out_md: Path, out_png: Path) -> None:
    lines = ["| plan | avg bits | quantizer | expert MB | ppl ratio | KL | top-1 agree |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['avg_bits']:.3f} | {r['quantizer']} | {r['expert_mb']:.2f} | "
                     f"{r['ppl_ratio']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} |")
    out_md.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (plan, q), marker in zip(sorted({(r["plan"].split("@")[0].split("-")[0], r["quantizer"]) for r in rows}),
                                 "os^vDPX*<>hH8pd1234"):
        pts = sorted((r["expert_mb"], r["ppl_ratio"]) for r in rows
                     if r["plan"].split("@")[0].split("-")[0] == plan and r["quantizer"] == q)
        ax.plot(*zip(*pts), marker=marker, label=f"{plan} ({q})", linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel("routed-expert bytes, MB (codes + scales + zeros)")
    ax.set_ylabel("perplexity / float16 perplexity")
    ax.set_title("text-moe: size vs quality by allocation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--model", default=str(SHARED / "models/text-moe"))
    ap.add_argument("--calib", default=str(SHARED / "data/text_calib.txt"))
    ap.add_argument("--data", default=str(SHARED / "data/text_dev.txt"))
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--sizes", default="2.25,2.5,2.75,3.0,3.5")
    ap.add_argument("--rtn", default="uniform,random,budget",
                    help="plan families also quantized with RTN (comma list; empty for none)")
    ap.add_argument("--skip", default="", help="plan families to leave out (comma list), e.g. to resume")
    ap.add_argument("--quantizer", default="signround", choices=("signround", "gptq"))
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default: the method's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=SignRoundConfig.iters, help="signround's steps per layer")
    ap.add_argument("--predictions", default=None, help="scripts/bench_predictor.py's JSON (all experts' predictions)")
    ap.add_argument("--budget-on", default="", help="predictors of --predictions to allocate by (comma list)")
    ap.add_argument("--no-fixed", action="store_true", help="leave out uniform and k-means (e.g. a parallel part)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = load_report(args.sensitivity)
    ref, _ = load_model(args.model, device=args.device)
    tok = load_tokenizer(args.model)
    ref_lp = RefLogProbs(ref, text_windows(args.data, tok, max_windows=args.windows))
    samples = args.samples or DEFAULT_SAMPLES[args.quantizer]
    calib = load_calibration(args.calib, tok, ref.config, samples=samples)
    tables = {}
    if args.predictions:
        doc = json.loads(Path(args.predictions).read_text())
        assert doc["all_expert_names"] == [e.name for e in report.experts], "predictions are for another model"
        tables = {k: doc["predictions"][k] for k in args.budget_on.split(",") if k}
    rows = []
    family = lambda name: name.split("@")[0].split("-")[0]  # noqa: E731
    for name, avg, bits in plans(report, [float(s) for s in args.sizes.split(",") if s], args.sensitivity, tables,
                                  not args.no_fixed):
        if family(name) in args.skip.split(","):
            continue
        for method in (args.quantizer, "rtn") if family(name) in args.rtn.split(",") else (args.quantizer,):
            model, _ = load_model(args.model, device=args.device)
            layers = find_moe_layers(model)
            t = time.time()
            res = quantize_layers(model, layers, bits, calib,
                                  QuantizeConfig(method=method, signround=SignRoundConfig(iters=args.iters)))
            nbytes = sum(a.nbytes for rs in res for a in layer_tensors(rs).values())
            row = {"plan": name, "avg_bits": avg, "quantizer": method, "iters": args.iters, "samples": samples,
                   "expert_mb": nbytes / 1e6,
                   "seconds": time.time() - t, **ref_lp.score(model)}
            rows.append(row)
            print(f"{name:22s} {avg:.3f} {method:9s} {row['expert_mb']:.2f} MB  ppl x{row['ppl_ratio']:.4f}  "
                  f"kl {row['kl']:.4f}  top1 {row['top1']:.4f}  {row['seconds']:.0f}s", flush=True)
            (out / "compare_text.json").write_text(json.dumps(rows, indent=1))  # after every row: a crash keeps them
    write_outputs(rows, out / "compare_text.md", out / "compare_text.png")


if __name__ == "__main__":
    main()
