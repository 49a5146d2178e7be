"""Benchmark `mopeq-export analyze`: wall time, seed agreement, and cost per probe.

    python scripts/bench_analyze.py [--model ../shared/models/text-moe] [--calib ../shared/data/text_calib.txt]

Runs the CLI twice with the default settings and seeds 0 and 1 (wall time includes loading, as a user
sees it), prints the Spearman rank correlation of the two runs' traces, then times fixed probe counts
(rel-tol 0 so no early stop) to show the cost is linear in probes; the baseline is the 2-probe run
and the ratio column compares each run's seconds per probe with it. The expert count does not enter:
every probe is one forward + one gradient + one Hessian-vector product for all experts together.
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
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((out / "sensitivity.json").read_text())


def main(model: str = "../shared/models/text-moe", calib: str = "../shared/data/text_calib.txt",
         probe_counts: str = "2,4,8") -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {seed: run_analyze(model, calib, Path(tmp) / f"s{seed}", "--seed", str(seed)) for seed in (0, 1)}
        traces = [[e["hessian_trace"] for e in runs[s][1]["experts"]] for s in (0, 1)]
        rho = spearmanr(*traces)[0]
        t = Table(title=f"analyze {Path(model).name}, default settings")
        for c in ("seed", "wall s", "stage s", "probes", "experts", "min trace", "no-token experts"):
            t.add_column(c, justify="right")
        for seed, (wall, rec) in runs.items():
            ex = rec["experts"]
            t.add_row(str(seed), f"{wall:.1f}", f"{rec['seconds']:.1f}", str(rec["probes"]), str(len(ex)),
                      f"{min(e['hessian_trace'] for e in ex if not e['no_tokens']):.3g}", str(sum(e["no_tokens"] for e in ex)))
        console.print(t)
        console.print(f"Spearman rank correlation of traces, seed 0 vs 1: {rho:.4f}")
        scaling = Table(title="cost vs probes (rel-tol 0: fixed probe count); baseline: the first row")
        for c in ("probes", "stage s", "s / probe", "ratio to baseline"):
            scaling.add_column(c, justify="right")
        base = None
        for p in map(int, probe_counts.split(",")):
            _, rec = run_analyze(model, calib, Path(tmp) / f"p{p}", "--probes", str(p), "--rel-tol", "1e-12")
            per = rec["seconds"] / rec["probes"]
            base = base or per
            scaling.add_row(str(rec["probes"]), f"{rec['seconds']:.1f}", f"{per:.2f}", f"{per / base:.2f}")
        console.print(scaling)


if __name__ == "__main__":
    typer.run(main)
