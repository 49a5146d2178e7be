"""Plots of stage records (matplotlib, headless): the analyze stage's heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .sensitivity import SensitivityReport


def by_layer(report: SensitivityReport) -> dict[int, list]:
    layers: dict[int, list] = {}
    for e in report.experts:
        layers.setdefault(e.layer, []).append(e)
    return layers


def heatmap(report: SensitivityReport, path: Path) -> None:
    """Layers x experts, log10 Hessian trace; experts without tokens (or trace <= 0) left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = by_layer(report)
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
