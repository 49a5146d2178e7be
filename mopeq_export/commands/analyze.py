"""`mopeq-export analyze`: per-expert sensitivity statistics -> OUT/sensitivity.json (+ heatmap)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli import app, console, default_calib
from ..plots import by_layer
from ..sensitivity import DATA_DEFAULTS, TEXT_SEQ_LEN, EstimatorConfig, SensitivityReport

DEFAULTS = EstimatorConfig()


@app.command()
def analyze(
    model: Path = typer.Option(..., "--model", help="Hugging Face checkpoint folder"),
    out: Path = typer.Option(..., "--out", help="output folder (sensitivity.json, sensitivity.png)"),
    calib: Path = typer.Option(None, "--calib", help="calibration data (.txt/.jsonl text, VQA .npz or folder); "
                                                     "default: the shipped set for the model's kind"),
    seed: int = typer.Option(DEFAULTS.seed, help="seed of the Rademacher probes"),
    curvature: str = typer.Option(DEFAULTS.curvature, help="gauss-newton (Gauss-Newton/Fisher part of the "
                                  "Hessian, the default) or hessian (exact Hessian, double backward)"),
    probes: int = typer.Option(DEFAULTS.max_probes, help="maximum Hutchinson probes (one batch each)"),
    samples: Optional[int] = typer.Option(None, help=f"calibration samples [default: {DATA_DEFAULTS['text'][0]} text windows, "
                                           f"{DATA_DEFAULTS['vqa'][0]} VQA samples]"),
    seq_len: int = typer.Option(TEXT_SEQ_LEN, help="tokens per text sample"),
    batch_size: Optional[int] = typer.Option(None, help=f"samples per probe [default: {DATA_DEFAULTS['text'][1]} text, "
                                              f"{DATA_DEFAULTS['vqa'][1]} VQA]"),
    rel_tol: float = typer.Option(DEFAULTS.rel_tol, help="stop when every expert's relative stderr is below this"),
    cover: bool = typer.Option(DEFAULTS.cover, help="add unused calibration samples that reach experts the chosen "
                                                   "samples never routed to"),
    device: str = typer.Option("auto", "--device", help="auto (a CUDA GPU when visible), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="compute dtype: auto (float32 up to 1B parameters, else "
                                                      "bfloat16), float32 or bfloat16"),
    trust_remote_code: bool = typer.Option(False, help="run the checkpoint's own Python code (only if you trust it)"),
    force: bool = typer.Option(False, "--force", help="replace a previous analyze output at --out (nothing else)"),
) -> None:
    """Estimate every routed expert's Hessian trace (Hutchinson) and routing statistics."""
    from ..api import analyze as run
    from ..calibration import calibration_kind
    from ..models.loading import model_info

    calib = calib or default_calib(model_info(model).is_vlm)  # settings are checked before the model loads
    batch_size = DATA_DEFAULTS[calibration_kind(calib)][1] if batch_size is None else batch_size
    cfg = EstimatorConfig(seed=seed, curvature=curvature, max_probes=probes,
                          min_probes=min(DEFAULTS.min_probes, probes), rel_tol=rel_tol, batch_size=batch_size, cover=cover)
    columns = (TextColumn("Hutchinson probes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("probes", total=cfg.max_probes)

        def show(e):
            if e.done is not None:
                bar.update(task, completed=e.done)
            elif e.message:
                console.print(e.message)

        report = run(model, cfg, calib=calib, samples=samples, seq_len=seq_len, out=out, force=force, device=device,
                     dtype=dtype, trust_remote_code=trust_remote_code, progress=show)
    console.print(summary_table(report))
    added = report.calibration.coverage_samples
    console.print(f"{len(report.experts)} experts, {report.probes} {cfg.curvature} probes "
                  f"({'converged' if report.converged else 'probe cap reached'}), "
                  + (f"{added} sample(s) added to reach unrouted experts, " if added else "")
                  + f"{report.seconds:.1f} s, peak {report.resources['peak_rss_bytes'] / 2**30:.2f} GiB host"
                  + (f", {report.resources['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if report.resources['peak_gpu_bytes']
                     else "") + f" -> {out}/sensitivity.json")


def summary_table(report: SensitivityReport) -> Table:
    t = Table(title=f"sensitivity of {report.model.name} ({report.calibration.kind}, "
                    f"{report.calibration.tokens} tokens, {report.probes} probes)")
    for col in ("layer", "experts", "tokens", "trace min", "trace median", "trace max", "max rel. stderr", "no tokens"):
        t.add_column(col, justify="right")
    for layer, experts in by_layer(report).items():
        tr = np.array([e.hessian_trace for e in experts])
        rel = [math.inf if e.hessian_trace_stderr is None else e.hessian_trace_stderr / abs(e.hessian_trace)
               for e in experts if not e.no_tokens and e.hessian_trace]
        t.add_row(str(layer), str(len(experts)), str(experts[0].layer_tokens), f"{tr.min():.3g}",
                  f"{np.median(tr):.3g}", f"{tr.max():.3g}", f"{max(rel, default=0):.2f}",
                  str(sum(e.no_tokens for e in experts)))
    return t
