"""Compare bit allocations at matched sizes on text-moe or vlm-moe: quality vs size, table + plot into docs/.

Methods at each average width B in --sizes:
  random     seeded random assignment of the two widths around B (the baseline a plan must beat)
  frequency  ranked by activation frequency (the paper's ablation, filled to B)
  hessian    ranked by Hessian trace (the paper's signal, filled to B)
  budget     exact knapsack on the second-order loss estimate (this project's default)
  budget:P   the same knapsack on predictor P's loss table [expert, width] from scripts/bench_predictor.py's
             JSON (--predictions FILE --budget-on P,Q,...: e.g. gn_output, freq_x_err)
plus uniform 2/3/4 bits and the paper's k-means clustering (layer and model scope) at its own average, with
the budget plan at that same average beside it. Every plan is quantized with --quantizer (default signround,
the build's text default; the families in --rtn also with RTN), once per --seeds seed (learned rounding
samples its token batches), and evaluated against the float16 model: a text model on the first --windows
windows of text_dev (perplexity ratio, KL, top-1 agreement), a VLM on the first --windows samples of vqa_dev
(teacher-forced answer tokens: KL, top-1 agreement, answer perplexity ratio).

Besides the rows, the table holds the default plan against each baseline at the same size (`paired_table`):
per evaluation unit, seeds averaged, with bootstrap intervals over the units.

    python scripts/compare_allocations.py --sensitivity work/sens/sensitivity.json [--windows 128] [--rtn uniform,random,budget]
        [--quantizer signround|gptq] [--seeds 0,1] [--device cuda] [--predictions docs/predictor.json --budget-on gn_output]
    python scripts/compare_allocations.py merge docs/compare_x part0/compare_text.json part1/compare_text.json ...
        [--external work/ext/text.json ...]

`--external` adds scripts/compare_quantizers.py's rows of other quantizers (AutoRound, GPTQModel) at uniform widths,
scored on the same data and units, as plans "uniform-B" of their own quantizer (bytes: this format's at that width),
each compared with this project's default quantizer on the same uniform plan (`external_table`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mopeq_export.allocation import PlanConfig, budget_widths, make_plan
from mopeq_export.calibration import collate_vqa, load_calibration, read_vqa, to_device, vqa_examples, vqa_format_for
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


class _Units:
    """Per-unit sums (a unit: one evaluation window of text, one VQA sample): token count, NLL of the reference
    and of the candidate, KL(ref || cand), top-1 agreements. Metrics are ratios of their totals, and the
    units are what the paired bootstrap of `paired_table` resamples."""

    def __init__(self):
        self.cols = {k: [] for k in ("n", "nll_ref", "nll", "kl", "agree")}

    def add(self, lr: torch.Tensor, lq: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> None:
        """lr, lq: log-probs [B, T, V] (float32); t: targets [B, T]; keep: bool [B, T]."""
        m = keep.float()
        tr, tq = lr.gather(-1, t[..., None])[..., 0], lq.gather(-1, t[..., None])[..., 0]
        for k, v in (("n", m), ("nll_ref", -tr * m), ("nll", -tq * m),
                     ("kl", (lr.exp() * (lr - lq)).sum(-1) * m), ("agree", (lr.argmax(-1) == lq.argmax(-1)) * m)):
            self.cols[k].extend(v.sum(1).double().cpu().tolist())

    def metrics(self) -> dict:
        c = {k: float(np.sum(v)) for k, v in self.cols.items()}
        n = c["n"]
        return {"ppl_ref": float(np.exp(c["nll_ref"] / n)), "ppl": float(np.exp(c["nll"] / n)),
                "ppl_ratio": float(np.exp((c["nll"] - c["nll_ref"]) / n)), "kl": c["kl"] / n, "top1": c["agree"] / n,
                "units": {k: [round(x, 6) for x in v] for k, v in self.cols.items()}}


class RefLogProbs:
    """Float16 reference log-probabilities of the text evaluation windows, computed once."""

    kind = "text"

    def __init__(self, model, windows: torch.Tensor, batch: int = 8):
        windows = windows.to(next(model.parameters()).device)
        self.windows, self.batch = windows, batch
        with torch.no_grad():
            self.logp = [torch.log_softmax(model(input_ids=w).logits.float(), -1).half() for w in windows.split(batch)]

    def score(self, model) -> dict:
        u = _Units()
        with torch.no_grad():
            for w, lr in zip(self.windows.split(self.batch), self.logp):
                lq = torch.log_softmax(model(input_ids=w).logits.float(), -1)[:, :-1]
                t = w[:, 1:]
                u.add(lr[:, :-1].float(), lq, t, torch.ones_like(t, dtype=torch.bool))
        return u.metrics()


class RefAnswers:
    """vlm-moe: the float16 model's teacher-forced log-probabilities of the answer tokens of a VQA set (the
    prompt format of mopeq_export.calibration), computed once. `ppl_ratio` is then the answer tokens'
    perplexity ratio, `kl` and `top1` the answer-token KL and agreement (exact match barely moves here)."""

    kind = "vqa"

    def __init__(self, model, data: str, tokenizer, max_samples: int | None = None, batch: int = 16):
        fmt = vqa_format_for(model.config)
        d = read_vqa(Path(data), fmt.image_size)
        n = len(d["questions"]) if not max_samples else min(max_samples, len(d["questions"]))
        pixels = fmt.pixel_values(d["images"][:n])
        ex = vqa_examples(fmt, tokenizer, d["questions"][:n], [str(a) for a in d["answers"][:n]])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        dev = next(model.parameters()).device
        self.batches, self.logp = [], []
        with torch.no_grad():
            for i in range(0, n, batch):
                b = collate_vqa(ex[i:i + batch], pixels[i:i + batch], pad)
                labels = b.pop("labels")
                t = torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], 1)
                b = to_device(b, dev)
                keep = (t != -100).to(dev)
                self.batches.append((b, t.clamp(min=0).to(dev), keep))
                self.logp.append(torch.log_softmax(model(**b).logits.float(), -1).half())

    def score(self, model) -> dict:
        u = _Units()
        with torch.no_grad():
            for (b, t, keep), lr in zip(self.batches, self.logp):
                u.add(lr.float(), torch.log_softmax(model(**b).logits.float(), -1), t, keep)
        return u.metrics()


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


# the default plan against each baseline at the same size: (baseline, the default plan's row at its size)
PAIRS = (("random", "budget"), ("frequency", "budget"), ("hessian", "budget"),
         ("kmeans-layer", "budget@kmeans-layer"), ("kmeans-model", "budget@kmeans-model"))


def _pooled(rows: list[dict]) -> dict[str, np.ndarray]:
    """A plan's per-unit sums averaged over its seeds (every seed scores the same units)."""
    return {k: np.mean([r["units"][k] for r in rows], 0) for k in rows[0]["units"]}


def paired_diff(mine: list[dict], base: list[dict], rng, boot: int = 2000) -> dict:
    """One plan's rows minus another's, per evaluation unit and averaged over seeds (both scored on the same
    units), with 95 % bootstrap intervals over the units: the difference in KL and the ratio of perplexity
    ratios; `verdict_*` is "worse" or "better" only when the whole interval is on one side."""
    u, v = _pooled(mine), _pooled(base)
    n = u["n"]
    dkl, dnll = u["kl"] - v["kl"], u["nll"] - v["nll"]
    idx = rng.integers(0, n.size, (boot, n.size))
    bk = dkl[idx].sum(1) / n[idx].sum(1)
    bn = np.exp(dnll[idx].sum(1) / n[idx].sum(1))
    lo_k, hi_k = np.percentile(bk, [2.5, 97.5])
    lo_n, hi_n = np.percentile(bn, [2.5, 97.5])
    verdict = lambda lo, hi, one: "better" if hi < one else ("worse" if lo > one else "tie")  # noqa: E731
    ppl = lambda w: float(np.exp((w["nll"].sum() - w["nll_ref"].sum()) / w["n"].sum()))  # noqa: E731
    return {"kl": float(u["kl"].sum() / n.sum()), "kl_base": float(v["kl"].sum() / n.sum()),
            "dkl": float(dkl.sum() / n.sum()), "dkl_ci": [float(lo_k), float(hi_k)],
            "ppl_ratio": ppl(u), "ppl_ratio_base": ppl(v), "ratio": float(np.exp(dnll.sum() / n.sum())),
            "ratio_ci": [float(lo_n), float(hi_n)], "verdict_kl": verdict(lo_k, hi_k, 0),
            "verdict_ppl": verdict(lo_n, hi_n, 1)}


def paired_line(data, size, q, plan: str, mine: list[dict], base: list[dict], d: dict) -> str:
    return (f"| {data} | {size:g} | {q} | {plan} | {len(mine)}/{len(base)} | {d['kl']:.5f} / {d['kl_base']:.5f} | "
            f"{d['dkl']:+.5f} [{d['dkl_ci'][0]:+.5f}, {d['dkl_ci'][1]:+.5f}] | x{d['ppl_ratio']:.4f} / "
            f"x{d['ppl_ratio_base']:.4f} | {d['ratio']:.4f} [{d['ratio_ci'][0]:.4f}, {d['ratio_ci'][1]:.4f}] | "
            f"{d['verdict_kl']} / {d['verdict_ppl']} |")


PAIRED_HEADER = ["| data | size | quantizer | default vs | seeds | KL default / baseline | dKL [95% CI] | ppl ratio "
                 "default / baseline | ratio of ratios [95% CI] | verdict KL / ppl |",
                 "|---|---|---|---|---|---|---|---|---|---|"]


def paired_table(rows: list[dict], boot: int = 2000, seed: int = 0, pairs=PAIRS) -> list[str]:
    """The default (budget) plan minus each baseline at the same size and quantizer (`paired_diff`); `pairs`:
    (baseline family, default family) as PAIRS."""
    rng = np.random.default_rng(seed)
    lines = list(PAIRED_HEADER)
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["plan"], round(r["avg_bits"], 4), r["quantizer"], r.get("data")), []).append(r)
    for (plan, size, q, data), base in sorted(keyed.items(), key=lambda kv: (str(kv[0][3]), kv[0][1], kv[0][0])):
        mine = next((keyed[(d, size, q, data)] for b, d in pairs if b == plan and (d, size, q, data) in keyed), None)
        if mine is None:
            continue
        lines.append(paired_line(data, size, q, plan, mine, base, paired_diff(mine, base, rng, boot)))
    return lines


def write_outputs(rows: list[dict], out_md: Path, out_png: Path, kind: str = "text") -> None:
    lines = ["| plan | avg bits | quantizer | seed | expert MB | ppl ratio | KL | top-1 agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['avg_bits']:.3f} | {r['quantizer']} | {r.get('seed', 0)} | "
                     f"{r['expert_mb']:.2f} | {r['ppl_ratio']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} |")
    # the default plan also against the budget plans on other predictors' tables (budget:P), from a bootstrap
    # stream of their own (the baselines' intervals stay those of a run without them)
    extra = tuple((p, "budget") for p in dict.fromkeys(r["plan"] for r in rows) if p.startswith("budget:"))
    lines += ["", *paired_table(rows), *(paired_table(rows, pairs=extra)[2:] if extra else [])]
    out_md.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "ppl_ratio" if kind == "text" else "kl"
    fam = lambda r: r["plan"].split("@")[0].split("-")[0]  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (plan, q), marker in zip(sorted({(fam(r), r["quantizer"]) for r in rows}), "os^vDPX*<>hH8pd1234"):
        pts: dict[float, list[float]] = {}
        for r in rows:
            if fam(r) == plan and r["quantizer"] == q:
                pts.setdefault(round(r["expert_mb"], 3), []).append(r[metric])
        xy = sorted((x, float(np.mean(ys))) for x, ys in pts.items())  # seeds averaged
        ax.plot(*zip(*xy), marker=marker, label=f"{plan} ({q})", linestyle="-" if len(xy) > 1 else "none")
    ax.set_xlabel("routed-expert bytes, MB (codes + scales + zeros)")
    ax.set_ylabel("perplexity / float16 perplexity" if kind == "text" else "answer-token KL(float16 || quantized)")
    ax.set_title(f"{'text-moe' if kind == 'text' else 'vlm-moe'}: size vs quality by allocation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def signround_fields(spec: str) -> dict:
    """"k=v,k=v" -> SignRoundConfig keyword arguments, typed by the field's default."""
    out = {}
    for term in filter(None, spec.split(",")):
        k, _, v = term.partition("=")
        if k not in SignRoundConfig.__dataclass_fields__ or k in ("iters", "seed"):
            raise SystemExit(f"--signround: {k!r} is not a SignRoundConfig field (iters and seed have their options)")
        default = getattr(SignRoundConfig, k)
        if isinstance(default, bool):
            if v.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--signround: {k} takes true or false, not {v!r}")
            out[k] = v.lower() in ("true", "1")
        else:
            out[k] = type(default)(v) if default is not None else float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--model", default=str(SHARED / "models/text-moe"))
    ap.add_argument("--calib", default=None, help="default: text_calib.txt, or vqa_calib.npz for a VLM")
    ap.add_argument("--data", default=None, help="default: text_dev.txt, or vqa_dev.npz for a VLM")
    ap.add_argument("--windows", type=int, default=128, help="text windows (0: all) or VQA samples (0: all)")
    ap.add_argument("--sizes", default="2.25,2.5,2.75,3.0,3.5")
    ap.add_argument("--rtn", default="uniform,random,budget",
                    help="plan families also quantized with RTN (comma list; empty for none)")
    ap.add_argument("--skip", default="", help="plan families or plan names to leave out (comma list), e.g. to "
                                               "resume, or uniform-2,uniform-4 to keep only uniform 3 bits")
    ap.add_argument("--quantizer", default="signround", choices=("signround", "gptq"))
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default: the method's)")
    ap.add_argument("--seeds", default="0", help="signround seeds (comma list): each plan is quantized once per seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=SignRoundConfig.iters, help="signround's steps per layer")
    ap.add_argument("--signround", default="", help="other SignRoundConfig fields, e.g. v_range=1.0,batch_tokens=256")
    ap.add_argument("--predictions", default=None, help="scripts/bench_predictor.py's JSON (all experts' predictions)")
    ap.add_argument("--budget-on", default="", help="predictors of --predictions to allocate by (comma list)")
    ap.add_argument("--no-fixed", action="store_true", help="leave out uniform and k-means (e.g. a parallel part)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = load_report(args.sensitivity)
    ref, info = load_model(args.model, device=args.device)
    tok = load_tokenizer(args.model)
    data = args.data or str(SHARED / "data" / ("vqa_dev.npz" if info.is_vlm else "text_dev.txt"))
    calib_path = args.calib or str(SHARED / "data" / ("vqa_calib.npz" if info.is_vlm else "text_calib.txt"))
    limit = args.windows or None
    scorer = (RefAnswers(ref, data, tok, limit) if info.is_vlm
              else RefLogProbs(ref, text_windows(data, tok, max_windows=limit)))
    samples = args.samples or DEFAULT_SAMPLES[args.quantizer]
    calib = load_calibration(calib_path, tok, ref.config, samples=samples)
    del ref
    tables = {}
    if args.predictions:
        doc = json.loads(Path(args.predictions).read_text())
        assert doc["all_expert_names"] == [e.name for e in report.experts], "predictions are for another model"
        tables = {k: doc["predictions"][k] for k in args.budget_on.split(",") if k}
    sr_fields = signround_fields(args.signround)
    if sr_fields and args.quantizer != "signround":
        raise SystemExit("--signround sets learned rounding's fields: it needs --quantizer signround")
    rows = []
    family = lambda name: name.split("@")[0].split("-")[0]  # noqa: E731
    seeds = [int(x) for x in args.seeds.split(",") if x]
    for name, avg, bits in plans(report, [float(s) for s in args.sizes.split(",") if s], args.sensitivity, tables,
                                  not args.no_fixed):
        if family(name) in args.skip.split(",") or name in args.skip.split(","):
            continue
        for method in (args.quantizer, "rtn") if family(name) in args.rtn.split(",") else (args.quantizer,):
            for seed in seeds if method == "signround" else seeds[:1]:  # GPTQ and RTN are deterministic
                model, _ = load_model(args.model, device=args.device)
                layers = find_moe_layers(model)
                t = time.time()
                res = quantize_layers(model, layers, bits, calib, QuantizeConfig(
                    method=method, signround=SignRoundConfig(iters=args.iters, seed=seed, **sr_fields)))
                nbytes = sum(a.nbytes for rs in res for a in layer_tensors(rs).values())
                label = method + (f"[{','.join(f'{k}={v}' for k, v in sr_fields.items())}]"
                                  if sr_fields and method == "signround" else "")
                row = {"plan": name, "avg_bits": avg, "quantizer": label, "seed": seed, "iters": args.iters,
                       "samples": samples, "data": Path(data).name, "kind": scorer.kind, "expert_mb": nbytes / 1e6,
                       "seconds": time.time() - t, **scorer.score(model)}
                rows.append(row)
                del model, layers, res
                print(f"{name:22s} {avg:.3f} {method:9s} s{seed} {row['expert_mb']:.2f} MB  ppl x{row['ppl_ratio']:.4f}  "
                      f"kl {row['kl']:.5f}  top1 {row['top1']:.4f}  {row['seconds']:.0f}s", flush=True)
                (out / "compare_text.json").write_text(json.dumps(rows))  # after every row: a crash keeps them
    write_outputs(rows, out / "compare_text.md", out / "compare_text.png", scorer.kind)


def external_rows(quantizer_rows: list[dict], study: list[dict]) -> list[dict]:
    """compare_quantizers.py's rows (method, bits, scores) of quantizers the study does not have, as study rows:
    plan "uniform-B" of quantizer `method`, with the study's own uniform-B bytes (the same format at that width).
    Refused unless they were scored on the study's data, kind and units, and the study has that uniform plan."""
    out = []
    ours = {r["quantizer"] for r in study}
    for q in quantizer_rows:
        if q["method"] in ours:  # the study's own rows of that quantizer stand
            continue
        mine = [r for r in study if r["plan"] == f"uniform-{q['bits']}"]
        if not mine:
            raise SystemExit(f"the study has no uniform-{q['bits']} plan to size {q['method']}'s row by")
        for key in ("data", "kind"):
            if q.get(key) != mine[0].get(key):
                raise SystemExit(f"{q['method']} at {q['bits']} bits was scored on {key} {q.get(key)!r}, the study on "
                                 f"{mine[0].get(key)!r}")
        # the same units: token counts equal, the float16 references equal up to the device's arithmetic (the study
        # may have run on CUDA, the external tools on the CPU; measured 2e-6 nats per token on text_dev, 3e-5 on
        # vqa_dev), so that a perplexity ratio against either reference differs by less than 1e-4
        ref_q, ref_s = np.array(q["units"]["nll_ref"]), np.array(mine[0]["units"]["nll_ref"])
        if q["units"]["n"] != mine[0]["units"]["n"] or np.abs(ref_q - ref_s).sum() > 1e-4 * np.sum(q["units"]["n"]):
            raise SystemExit(f"{q['method']} at {q['bits']} bits was scored on other evaluation units than the study "
                             "(compare_quantizers.py --windows must match the study's, 0 for all)")
        out.append({**{k: v for k, v in q.items() if k not in ("method", "bits")}, "plan": f"uniform-{q['bits']}",
                    "avg_bits": float(q["bits"]), "quantizer": q["method"], "seed": 0,
                    "expert_mb": mine[0]["expert_mb"], "external": True})
    return out


def external_table(rows: list[dict], default: str = "signround", boot: int = 2000, seed: int = 0) -> list[str]:
    """This project's default quantizer on each uniform plan minus each external quantizer on it (`paired_diff`)."""
    rng = np.random.default_rng(seed)
    lines = [PAIRED_HEADER[0].replace("default vs", "quantizer vs"), PAIRED_HEADER[1]]
    for r in rows:
        if not r.get("external"):
            continue
        mine = [m for m in rows if m["plan"] == r["plan"] and m["quantizer"] == default and not m.get("external")]
        if mine:
            lines.append(paired_line(r["data"], r["avg_bits"], default, f"{r['plan']} ({r['quantizer']})", mine, [r],
                                     paired_diff(mine, [r], rng, boot)))
    return lines


def merge(paths: list[str], out: str, external: list[str] = ()) -> None:
    """Several parts' compare_text.json (parallel processes) into one table, paired comparison and plot, with
    other quantizers' rows from compare_quantizers.py (`external_rows`)."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text()) if not r.get("external")]
    ext = external_rows([q for p in external for q in json.loads(Path(p).read_text())], rows)
    rows += ext
    o = Path(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    o.with_suffix(".json").write_text(json.dumps(rows))
    write_outputs(rows, o.with_suffix(".md"), o.with_suffix(".png"), rows[0].get("kind", "text"))
    if ext:
        with o.with_suffix(".md").open("a") as f:
            f.write("\n" + "\n".join(external_table(rows)) + "\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "merge":  # compare_allocations.py merge OUT PART.json ... [--external Q.json ...]
        argv = sys.argv[3:]
        cut = argv.index("--external") if "--external" in argv else len(argv)
        merge(argv[:cut], sys.argv[2], argv[cut + 1:])
    else:
        main()
