"""The dense weights' share of a build's error, and the quantize options that treat them, in one run.

One plan (the routed experts' widths) is quantized once per variant, and each result is scored against the
float16 model on held-out text (evaluation_data/text_eval.txt, the build gate's data; PyTorch-side
evaluation of the QDIR, which computes the exported graph's weights). A variant is `+`-joined terms:

    base                 the plan as it is (its dense widths), the default QuantizeConfig
    CLASS=16             keep one dense class float (attention, shared_experts, lm_head, embeddings, dense_mlp)
    dense=16             keep every dense class float (the routed experts' error alone)
    shared_first         QuantizeConfig.shared_first: shared experts quantized before the routed experts
    head_gptq            QuantizeConfig.head_gptq: lm_head by GPTQ on the final hidden states
    head_rtn             lm_head by round-to-nearest (switches head_gptq off)
    head_float           QuantizeConfig.head_float_target on (the text default): lm_head's GPTQ around the float-logit head
    head_own             head_float_target off (the VLM default): lm_head's GPTQ on its own output (W x on its states)
    mlp_signround        QuantizeConfig.mlp_method "signround": learned rounding of shared experts / dense MLPs
    dense_samples=N      QuantizeConfig.dense_samples: calibration windows of the dense GPTQ (0: all)
    balance=N[:S]        QuantizeConfig.balance_tokens N (and balance_samples S): expert-balanced calibration
    samples=N            calibration windows of the stage (default: the method's, DEFAULT_SAMPLES)
    seed=N               the learned rounding's minibatch seed (SignRoundConfig.seed)
    method=M             the routed experts' quantizer (default: --method)

On a vision-language model (`--model ../shared/models/vlm-moe --calib ../shared/data/vqa_calib.npz
--eval evaluation_data/vqa_eval.npz`) the scores are answer-token KL and top-1 agreement, and the "ppl ratio"
column is the VQA exact-match retention.

    python scripts/compare_dense.py --plan PLAN.json [--variants base,dense=16,shared_first,...] [--out docs/dense]

A table (perplexity ratio, KL, top-1 agreement, quantize seconds, QDIR bytes) goes to stdout and to --out
(.md + .json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mopeq_export.evaluate import evaluate_model
from mopeq_export.quantization.dense import DENSE_CLASSES, FLOAT
from mopeq_export.quantization.pipeline import DEFAULT_SAMPLES, QuantizeConfig
from mopeq_export.quantization.stage import run_quantize

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("shared_first", "head_gptq")


def variant(spec: str, plan: dict, cfg: QuantizeConfig) -> tuple[dict, QuantizeConfig, int]:
    plan = json.loads(json.dumps(plan))
    samples = DEFAULT_SAMPLES[cfg.method]
    for term in spec.split("+"):
        if term == "base":
            continue
        if term.startswith("samples="):
            samples = int(term.split("=")[1])
            continue
        if term.startswith("seed="):
            cfg = replace(cfg, signround=replace(cfg.signround, seed=int(term.split("=")[1])))
            continue
        if term.startswith("method="):
            cfg = replace(cfg, method=term.split("=")[1])
            samples = DEFAULT_SAMPLES[cfg.method]
            continue
        if term in FLAGS:
            cfg = replace(cfg, **{term: True})
        elif term == "mlp_signround":
            cfg = replace(cfg, mlp_method="signround")
        elif term == "head_float":
            cfg = replace(cfg, head_float_target=True)
        elif term == "head_own":
            cfg = replace(cfg, head_float_target=False)
        elif term == "head_rtn":
            cfg = replace(cfg, head_gptq=False)
        elif term.startswith("balance="):  # expert-balanced calibration: balance_tokens[:balance_samples]
            n, _, pool = term.split("=")[1].partition(":")
            cfg = replace(cfg, balance_tokens=int(n), balance_samples=int(pool) if pool else cfg.balance_samples)
        elif term.startswith("dense_samples="):
            n = int(term.split("=")[1])
            cfg = replace(cfg, dense_samples=n or None)
        elif "=" in term:
            cls, bits = term.split("=")
            classes = DENSE_CLASSES if cls == "dense" else (cls,)
            if any(c not in DENSE_CLASSES for c in classes):
                raise SystemExit(f"unknown dense class in {term!r}: use one of {', '.join(DENSE_CLASSES)} or dense")
            for c in classes:
                plan["dense"][c] = int(bits)
        else:
            raise SystemExit(f"unknown variant term {term!r}")
    return plan, cfg, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/text-moe"))
    ap.add_argument("--plan", required=True)
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/text_calib.txt"))
    ap.add_argument("--eval", default=str(ROOT / "evaluation_data/text_eval.txt"))
    ap.add_argument("--windows", type=int, default=128, help="text: held-out windows (0: all)")
    ap.add_argument("--eval-samples", type=int, default=0, help="VQA: held-out samples (0: all)")
    ap.add_argument("--method", default="signround")
    ap.add_argument("--variants", default="base,dense=16,shared_first,head_gptq,shared_first+head_gptq")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    plan = json.loads(Path(args.plan).read_text())
    plan.setdefault("dense", {c: FLOAT for c in DENSE_CLASSES})
    base_cfg = QuantizeConfig(method=args.method)
    rows = []
    for spec in args.variants.split(","):
        p, cfg, samples = variant(spec, plan, base_cfg)
        with tempfile.TemporaryDirectory(prefix="mopeq-dense-") as tmp:
            plan_path = Path(tmp) / "plan.json"
            plan_path.write_text(json.dumps(p))
            torch.manual_seed(0)  # as the build seeds its quantize stage
            t = time.time()
            run_quantize(args.model, plan_path, Path(tmp) / "q", calib=args.calib, cfg=cfg,
                               samples=samples, device=args.device)
            seconds = time.time() - t
            size = sum(f.stat().st_size for f in (Path(tmp) / "q").rglob("*") if f.is_file())
            m = evaluate_model(args.model, Path(tmp) / "q", args.eval, max_windows=args.windows or None,
                               max_samples=args.eval_samples or None, device=args.device)["metrics"]
        scores = ({"ppl_ratio": m["ppl_ratio"], "kl": m["kl"], "top1": m["top1_agreement"]} if "ppl_ratio" in m else
                  {"ppl_ratio": m["accuracy_retention"], "kl": m["answer_kl"], "top1": m["answer_top1_agreement"]})
        row = {"variant": spec, "method": cfg.method, "seed": cfg.signround.seed, "dense": p["dense"],
               "shared_first": cfg.shared_first, "head_gptq": cfg.head_gptq, "mlp_method": cfg.mlp_method,
               "dense_samples": cfg.dense_samples, "samples": samples, "balance_tokens": cfg.balance_tokens,
               "balance_samples": cfg.balance_samples, **scores, "seconds": seconds, "bytes": size}
        rows.append(row)
        print(f"{spec:32s} x{row['ppl_ratio']:.4f}  KL {row['kl']:.5f}  top-1 {row['top1']:.4f}  "
              f"{seconds:.0f} s  {size:,} B", flush=True)
    lines = ["| variant | ppl ratio | KL | top-1 agree | quantize s | QDIR bytes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ppl_ratio']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | {r['seconds']:.0f} | "
              f"{r['bytes']:,} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"plan": str(Path(args.plan).resolve()), "windows": args.windows,
                                                        "method": args.method, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
