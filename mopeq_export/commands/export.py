"""`mopeq-export export`: QDIR -> ODIR with ONNX graph(s) for a target (docs/EXPORT.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..cli import app, console
from ..targets import ALIASES, TARGETS


@app.command()
def export(
    quantized: Path = typer.Option(..., "--quantized", help="quantized checkpoint folder (from `quantize`)"),
    target: str = typer.Option("cpu", "--target", help=f"one of {', '.join([*TARGETS, *ALIASES])}"),
    out: Path = typer.Option(..., "--out", help="output folder (graphs + export.json)"),
    model: Path = typer.Option(None, "--model", help="source checkpoint; default: the one recorded in QDIR"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the checkpoint's own code"),
    force: bool = typer.Option(False, "--force", help="replace a previous export output at --out (nothing else)"),
) -> None:
    """Export to ONNX: one mopeq.MoEExperts node per MoE layer, with a portable function fallback."""
    from ..api import export as run
    from ..targets import get_target

    tgt = get_target(target)  # fail on a bad name before loading anything
    with console.status("exporting") as status:
        exported = run(quantized, out, tgt, model=model, force=force, trust_remote_code=trust_remote_code,
                       progress=lambda e: status.update(f"exporting: {e.message}"))
    console.print(_summary(exported.record, out))


@app.command()
def targets() -> None:
    """List deployment targets (activation dtype, opset/IR, memory)."""
    t = Table("target", "activations", "opset/IR", "memory", "avg bits", "providers", "description")
    for x in TARGETS.values():
        t.add_row(x.name, x.activation_dtype, f"{x.opset}/{x.ir_version}",
                  f"{x.memory_gib:g} GiB x {x.memory_share:g}", f"{x.default_avg_bits:g}",
                  ", ".join(p.replace("ExecutionProvider", "") for p in x.providers), x.description)
    console.print(t)
    for alias, name in ALIASES.items():
        console.print(f"{alias} = {name}")


def _summary(record: dict, out: Path) -> Table:
    t = Table("graph", "file", "inputs", "outputs", "custom ops", title=f"exported for {record['target']['name']} "
              f"({record['activation_dtype']}, opset {record['opset']}, IR {record['ir_version']}) -> {out}")
    for name, g in record["graphs"].items():
        size = sum(f.stat().st_size for f in out.glob(f"{g['file']}*"))
        t.add_row(name, f"{g['file']} ({size / 2**20:.1f} MiB)", str(len(g["inputs"])), str(len(g["outputs"])),
                  ", ".join(g["custom_ops"]) or "-")
    return t
