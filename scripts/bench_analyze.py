"""Benchmark `mopeq-export analyze`: wall time, seed agreement, positivity, and cost per probe.

    python scripts/bench_analyze.py [--model ../shared/models/text-moe] [--calib ../shared/data/text_calib.txt]

Runs the CLI with the default settings and seeds 0 and 1 (wall time includes loading, as a user sees
it) for the default curvature (gauss-newton) and for the baseline, the exact-Hessian Hutchinson
estimator (`--curvature hessian`, the paper's), and prints per curvature: wall seconds, probes, the
Spearman rank correlation of the two seeds' traces, how many routed experts got an estimate <= 0, and
the wall-time ratio to the baseline; then the Spearman correlation between the two curvatures. Last,
it times fixed probe counts of the default curvature (rel-tol ~0, so no early stop) to show the cost
is linear in probes: seconds per added probe between consecutive rows should stay constant (ratio ~1).
The expert count does not enter: a probe is one forward + one backward for all experts together.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr


def run_analyze(model: str, calib: str, out: Path, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mopeq_export", "analyze", "--model", model, "--calib", calib, "--out", str(out), *extra]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((out / "sensitivity.json").read_text())


def traces(rec: dict) -> list[float]:
    return [e["hessian_trace"] for e in rec["experts"]]


def main(model: str = "../shared/models/text-moe", calib: str = "../shared/data/text_calib.txt",
         baseline: bool = typer.Option(True, help="also run the exact-Hessian baseline"),
         probe_counts: str = "8,16,32") -> None:
    console = Console(width=150)
    curvatures = ["gauss-newton"] + (["hessian"] if baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(c, s): run_analyze(model, calib, Path(tmp) / f"{c}{s}", "--curvature", c, "--seed", str(s))
                for c in curvatures for s in (0, 1)}
        t = Table(title=f"analyze {Path(model).name}, default settings, seeds 0 and 1; baseline: hessian")
        for col in ("curvature", "wall s", "probes", "experts", "no-token experts", "estimates <= 0",
                    "Spearman seed 0 vs 1", "wall ratio to baseline"):
            t.add_column(col, justify="right")
        base = sum(runs["hessian", s][0] for s in (0, 1)) if baseline else None
        for c in curvatures:
            (w0, r0), (w1, r1) = runs[c, 0], runs[c, 1]
            ex = r0["experts"]
            nonpos = max(sum(e["hessian_trace"] <= 0 for e in r["experts"] if not e["no_tokens"]) for r in (r0, r1))
            t.add_row(c, f"{w0:.1f} / {w1:.1f}", f"{r0['probes']} / {r1['probes']}", str(len(ex)),
                      str(sum(e["no_tokens"] for e in ex)), str(nonpos), f"{spearmanr(traces(r0), traces(r1))[0]:.4f}",
                      f"{(w0 + w1) / base:.2f}" if base else "-")
        console.print(t)
        cov = runs["gauss-newton", 0][1]["calibration"]
        console.print(f"calibration: {cov['samples']} samples ({cov['coverage_samples']} added for coverage), "
                      f"{cov['tokens']} tokens")
        if baseline:
            rho = spearmanr(traces(runs["gauss-newton", 0][1]), traces(runs["hessian", 0][1]))[0]
            console.print(f"Spearman gauss-newton vs hessian (seed 0): {rho:.4f}")
        scaling = Table(title="gauss-newton cost vs probes (fixed probe count): seconds per probe between rows; "
                              "baseline: the first such step")
        for col in ("probes", "stage s", "s per added probe", "ratio to baseline"):
            scaling.add_column(col, justify="right")
        prev = first = None
        for p in map(int, probe_counts.split(",")):
            _, rec = run_analyze(model, calib, Path(tmp) / f"p{p}", "--probes", str(p), "--rel-tol", "1e-12")
            if prev is None:  # the first row carries the fixed costs (loading, routing, coverage, RTN errors)
                scaling.add_row(str(p), f"{rec['seconds']:.1f}", "-", "-")
            else:
                per = (rec["seconds"] - prev[1]) / (p - prev[0])
                first = first or per
                scaling.add_row(str(p), f"{rec['seconds']:.1f}", f"{per:.2f}", f"{per / first:.2f}")
            prev = (p, rec["seconds"])
        console.print(scaling)


if __name__ == "__main__":
    typer.run(main)
