"""`mopeq-export plan`: sensitivity.json -> plan.json (an ordered map expert -> bits)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from ..allocation import BitPlan, PlanConfig
from ..cli import app, console
from ..errors import MopeqError


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise MopeqError(f"--bits-candidates {text!r}: give comma-separated integers, e.g. 2,3,4") from None
    if not widths:
        raise MopeqError("--bits-candidates is empty; give e.g. 2,3,4")
    return widths


def parse_override(text: str) -> tuple[str, int]:
    name, sep, bits = text.rpartition("=")
    if not sep or not name or not bits.strip().isdigit():
        raise MopeqError(f"--set {text!r}: expected NAME=BITS, e.g. model.layers.0.mlp.experts.3=4")
    return name.strip(), int(bits)


@app.command()
def plan(
    sensitivity: Path = typer.Option(..., "--sensitivity", help="sensitivity.json from `mopeq-export analyze`"),
    out: Path = typer.Option(..., "--out", help="plan file to write (JSON)"),
    method: str = typer.Option("budget", help="budget | kmeans | frequency | uniform"),
    scope: str = typer.Option("model", help="model (all experts together) | layer (each MoE layer alone)"),
    avg_bits: float = typer.Option(None, "--avg-bits", help="average bits per routed-expert weight "
                                   "(budget: default mean of the candidates; uniform: the width)"),
    bits_candidates: str = typer.Option("2,3,4", "--bits-candidates", help="candidate widths"),
    overrides: list[str] = typer.Option(None, "--set", help="NAME=BITS, repeatable; fixed before the budget is solved"),
    dense_bits: int = typer.Option(None, "--dense-bits", help="dense weights (attention, shared experts, lm_head, "
                                   "embeddings): 4 = quantized (default; embeddings 8), 16 = kept float"),
    force: bool = typer.Option(False, "--force", help="replace an existing file at --out"),
) -> None:
    """Allocate a bit width to every routed expert."""
    cfg = PlanConfig(method=method, scope=scope, avg_bits=avg_bits, candidates=parse_widths(bits_candidates),
                     overrides=tuple(parse_override(o) for o in overrides or ()), dense_bits=dense_bits)
    from ..api import plan as run

    result = run(sensitivity, cfg, out=out, force=force)
    console.print(summary_table(result))
    _report_budget(result)
    console.print("dense weights: " + ", ".join(f"{c} {'float' if b == 16 else f'{b}-bit'}"
                                                for c, b in result.dense.items()))
    console.print(f"{len(result.experts)} experts, average {result.avg_bits:.4f} bits -> {out}")


def _report_budget(result: BitPlan) -> None:
    target = result.target_avg_bits
    if target is not None and target - result.avg_bits > 0.01:
        console.print(f"[yellow]note:[/] realized {result.avg_bits:.4f} bits is more than 0.01 under the budget "
                      f"{target}: the widths cannot fill it more closely (expert sizes, overrides or zero-trace experts)")
    if result.solver.get("gap_bound", 0) > 0:
        console.print(f"[yellow]note:[/] {result.solver['name']} solution, predicted loss within "
                      f"{result.solver['gap_bound']:.3g} of the optimum")


def summary_table(result: BitPlan) -> Table:
    """Bits histogram per layer (experts at each width) and the layer's average."""
    layers: dict[str, list[int]] = {}
    for name, bits in result.experts.items():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(bits)
    t = Table(title=f"bit plan: {result.method} (scope {result.scope}), avg {result.avg_bits:.3f} bits")
    t.add_column("experts of")
    for w in result.candidates:
        t.add_column(f"{w}-bit", justify="right")
    t.add_column("avg", justify="right")
    for path, bits in layers.items():
        hist = Counter(bits)
        t.add_row(path, *(str(hist.get(w, 0)) for w in result.candidates), f"{sum(bits) / len(bits):.2f}")
    return t
