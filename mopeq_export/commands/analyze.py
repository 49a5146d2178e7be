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
from ..fsutil import check_out, require_free_space, staged_dir, write_json
from ..sensitivity import DATA_DEFAULTS, TEXT_SEQ_LEN, EstimatorConfig, SensitivityReport, run_analyze

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
    from ..calibration import calibration_kind, check_sizes
    from ..devices import resolve_device
    from ..models.loading import model_info

    calib = calib or default_calib(model_info(model).is_vlm)  # settings are checked before the model loads
    default_samples, default_batch = DATA_DEFAULTS[calibration_kind(calib)]
    samples = default_samples if samples is None else samples
    batch_size = default_batch if batch_size is None else batch_size
    check_sizes(samples, seq_len, batch_size)
    cfg = EstimatorConfig(seed=seed, curvature=curvature, max_probes=probes,
                          min_probes=min(DEFAULTS.min_probes, probes), rel_tol=rel_tol, batch_size=batch_size, cover=cover)
    resolve_device(device)
    check_out(out, "analyze", force=force, inputs=(model, calib))
    require_free_space(Path(out).resolve().parent, 1 << 20, "the sensitivity file")
    with staged_dir(out, "analyze", force=force, inputs=(model, calib)) as stage:
        report = _run(model, calib, cfg, samples, seq_len, device, dtype, trust_remote_code)
        write_json(stage / "sensitivity.json", report.to_json())
        heatmap(report, stage / "sensitivity.png")
    console.print(summary_table(report))
    added = report.calibration.coverage_samples
    console.print(f"{len(report.experts)} experts, {report.probes} {cfg.curvature} probes "
                  f"({'converged' if report.converged else 'probe cap reached'}), "
                  + (f"{added} sample(s) added to reach unrouted experts, " if added else "")
                  + f"{report.seconds:.1f} s, peak {report.resources['peak_rss_bytes'] / 2**30:.2f} GiB host"
                  + (f", {report.resources['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if report.resources['peak_gpu_bytes']
                     else "") + f" -> {out}/sensitivity.json")


def _run(model, calib, cfg: EstimatorConfig, samples, seq_len, device, dtype, trust_remote_code) -> SensitivityReport:
    columns = (TextColumn("Hutchinson probes"), BarColumn(), MofNCompleteColumn(),
               TextColumn("worst rel. stderr {task.fields[worst]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("probes", total=cfg.max_probes, worst="-")
        return run_analyze(model, calib, cfg=cfg, samples=samples, seq_len=seq_len, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, say=console.print,
                           on_probe=lambda i, w: progress.update(task, completed=i, worst=f"{w:.3f}"))


def _by_layer(report: SensitivityReport) -> dict[int, list]:
    layers: dict[int, list] = {}
    for e in report.experts:
        layers.setdefault(e.layer, []).append(e)
    return layers


def heatmap(report: SensitivityReport, path: Path) -> None:
    """Layers x experts, log10 Hessian trace; experts without tokens (or trace <= 0) left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = _by_layer(report)
    width = max(len(v) for v in layers.values())
    grid = np.full((len(layers), width), np.nan)
    for r, experts in enumerate(layers.values()):
        for e in experts:
            if not e.no_tokens and e.hessian_trace > 0:
                grid[r, e.expert] = np.log10(e.hessian_trace)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * width + 2), max(2.5, 0.4 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{report.model.name}: log10 {report.estimator.curvature} trace per expert (blank: no tokens)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(report: SensitivityReport) -> Table:
    t = Table(title=f"sensitivity of {report.model.name} ({report.calibration.kind}, "
                    f"{report.calibration.tokens} tokens, {report.probes} probes)")
    for col in ("layer", "experts", "tokens", "trace min", "trace median", "trace max", "max rel. stderr", "no tokens"):
        t.add_column(col, justify="right")
    for layer, experts in _by_layer(report).items():
        tr = np.array([e.hessian_trace for e in experts])
        rel = [math.inf if e.hessian_trace_stderr is None else e.hessian_trace_stderr / abs(e.hessian_trace)
               for e in experts if not e.no_tokens and e.hessian_trace]
        t.add_row(str(layer), str(len(experts)), str(experts[0].layer_tokens), f"{tr.min():.3g}",
                  f"{np.median(tr):.3g}", f"{tr.max():.3g}", f"{max(rel, default=0):.2f}",
                  str(sum(e.no_tokens for e in experts)))
    return t
