"""The best any per-expert allocation could do, by the measured in-context truth (issue "Quality per byte").

scripts/bench_predictor.py's in-context truth measures, for every expert, the KL drop of raising it alone from
2 to 3 bits with every other expert at 2 (g23), and from 3 to 4 with the others at 3 (g34), on held-out windows
of evaluation_data/text_eval.txt. Read as additive costs against uniform 3 bits (an expert at 2 adds g23, at 4
subtracts g34), the exact optimum over widths {2, 3, 4} at each average width is a knapsack, solved here by
dynamic programming over the net width offset (experts of one size: a plan at B bits has sum(b - 3) =
(B - 3) x experts). The table gives, per size, that optimum's predicted KL change against uniform 3 bits:
where it is above zero, no per-expert allocation with this quantizer reaches uniform 3 bits' KL, unless the
costs are far from additive (which --loss-table lets scripts/compare_allocations.py test: it writes the same
costs as a predictor table, `--predictions OUT --budget-on context_truth`).

    python scripts/oracle_allocation.py [--predictor docs/predictor_signround.json] [--sizes 2.5,2.75,2.875,3]
        [--loss-table work/oracle_table.json]
    python scripts/oracle_allocation.py --score ROWS.json   # compare_allocations rows: each plan vs uniform-3

The optimum is that of the additive model: an estimate, not a bound (the costs are measured one expert at a
time, against all-2-bit or all-3-bit contexts, and do not add exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def best_offsets(g23: np.ndarray, g34: np.ndarray) -> dict[int, tuple[float, np.ndarray]]:
    """Net width offset -> (minimum additive KL change against uniform 3, the widths reaching it)."""
    n = len(g23)
    cost = np.full(2 * n + 1, np.inf)  # index: offset + n
    cost[n] = 0.0
    choice = np.zeros((n, 2 * n + 1), dtype=np.int8)  # the width step (-1, 0, +1) taken for expert i
    for i in range(n):
        new = np.full_like(cost, np.inf)
        for step, c in ((-1, g23[i]), (0, 0.0), (1, -g34[i])):
            shifted = np.full_like(cost, np.inf)
            if step < 0:
                shifted[:-1] = cost[1:] + c
            elif step > 0:
                shifted[1:] = cost[:-1] + c
            else:
                shifted = cost + c
            better = shifted < new
            new[better], choice[i, better] = shifted[better], step
        cost = new
    out = {}
    for off in range(-n, n + 1):
        if not np.isfinite(cost[off + n]):
            continue
        widths, o = np.zeros(n, dtype=int), off + n
        for i in range(n - 1, -1, -1):
            step = int(choice[i, o])
            widths[i] = 3 + step
            o -= step
        out[off] = (float(cost[off + n]), widths)
    return out


def score(rows_path: str) -> None:
    """Every plan of a compare_allocations.py run minus its uniform-3 rows, paired over the evaluation units
    (seeds averaged, bootstrap intervals: compare_allocations.paired_diff)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_allocations import paired_diff

    rows = json.loads(Path(rows_path).read_text())
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["plan"], round(r["avg_bits"], 4)), []).append(r)
    base = by[("uniform-3", 3.0)]
    rng = np.random.default_rng(0)
    print("| plan | avg bits | ppl ratio | KL | dKL vs uniform 3 [95 % CI] |\n|---|---|---|---|---|")
    for (plan, size), rs in by.items():
        if plan == "uniform-3":
            continue
        d = paired_diff(rs, base, rng)
        print(f"| {plan} | {size:g} | {d['ppl_ratio']:.4f} | {d['kl']:.5f} | {d['dkl']:+.5f} "
              f"[{d['dkl_ci'][0]:+.5f}, {d['dkl_ci'][1]:+.5f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", default=str(ROOT / "docs" / "predictor_signround.json"))
    ap.add_argument("--sizes", default="2.25,2.5,2.75,2.875,3.0")
    ap.add_argument("--loss-table", default=None, help="also write the costs as a predictor table for "
                                                        "compare_allocations.py --predictions")
    ap.add_argument("--score", default=None, help="compare_allocations.py rows (JSON): each plan vs uniform-3")
    args = ap.parse_args()
    if args.score:
        return score(args.score)
    doc = json.loads(Path(args.predictor).read_text())
    gain = doc["truth_context_gain"]
    g23, g34 = np.array(gain["2->3"], dtype=np.float64), np.array(gain["3->4"], dtype=np.float64)
    names = doc["expert_names"]
    if len(names) != len(g23) or names != doc["all_expert_names"]:
        raise SystemExit("the in-context truth must cover every expert (run bench_predictor.py without --limit)")
    n = len(g23)
    best = best_offsets(g23, g34)
    print(f"{n} experts; in-context truth on {doc['heldout']['windows']} windows of {doc['heldout']['file']}; "
          f"its quantizer: {doc.get('quantization')}")
    print("| avg bits | additive model's optimum: KL change vs uniform 3 | experts at 2 / 3 / 4 |\n|---|---|---|")
    rows = []
    for s in (float(x) for x in args.sizes.split(",")):
        off = int(round((s - 3) * n))
        kl, widths = best[off]
        counts = [int((widths == b).sum()) for b in (2, 3, 4)]
        rows.append({"avg_bits": 3 + off / n, "kl_change": kl, "counts": counts})
        print(f"| {3 + off / n:.4f} | {kl:+.5f} | {counts[0]} / {counts[1]} / {counts[2]} |")
    even = min(o for o, (kl, _) in best.items() if kl <= 0)
    print(f"smallest size whose optimum is no worse than uniform 3: {3 + even / n:.4f} bits")
    if args.loss_table:
        table = {"2": g23.tolist(), "3": [0.0] * n, "4": (-g34).tolist()}
        Path(args.loss_table).write_text(json.dumps({"all_expert_names": names,
                                                     "predictions": {"context_truth": table}, "bound": rows}))


if __name__ == "__main__":
    main()
