"""`mopeq-export evaluate`: fidelity of a quantized checkpoint against the float16 original."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..cli import app, console


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="the float16 source checkpoint"),
    quantized: Path = typer.Option(..., "--quantized", help="QDIR from `mopeq-export quantize`"),
    data: Path = typer.Option(..., "--data", help="text file (perplexity) or VQA .npz / folder"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="text: evaluate only the first N windows"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="VQA: evaluate only the first N samples"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the JSON report here"),
    device: str = typer.Option("auto", "--device", help="auto (a CUDA GPU when visible), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 up to 1B parameters, else bfloat16), "
                                                      "float32 or bfloat16"),
    force: bool = typer.Option(False, "--force", help="replace an existing file at --out"),
) -> None:
    """Perplexity / KL / top-1 agreement (text) or VQA exact match + answer KL (vision-language)."""
    from ..evaluate import evaluate_model
    from ..fsutil import check_out, staged_file, write_json

    inputs = (model, quantized, data)
    if out is not None:
        check_out(out, "file", force=force, inputs=inputs, file=True)
    report = evaluate_model(model, quantized, data, max_windows=max_windows, max_samples=max_samples,
                            device=device, dtype=dtype)
    print_report(report)
    if out is not None:
        with staged_file(out, force=force, inputs=inputs) as tmp:
            write_json(tmp, report)
        console.print(f"report written to {out}")


def print_report(report: dict) -> None:
    t = Table(title=f"fidelity vs float16: {report['model']} ({report['kind']})")
    t.add_column("metric")
    t.add_column("float16", justify="right")
    t.add_column("quantized", justify="right")
    m = report["metrics"]
    if report["kind"] == "text":
        t.add_row("perplexity", f"{m['ppl_ref']:.4f}", f"{m['ppl']:.4f} (x{m['ppl_ratio']:.4f})")
        t.add_row("KL(float16 || quantized)", "0", f"{m['kl']:.5f}")
        t.add_row("top-1 agreement", "1", f"{m['top1_agreement']:.4f}")
    else:
        t.add_row("VQA exact match", f"{m['accuracy_ref']:.4f}", f"{m['accuracy']:.4f} ({m['accuracy_retention']:.2%})")
        t.add_row("answer-token KL", "0", f"{m['answer_kl']:.5f}")
        t.add_row("answer top-1 agreement", "1", f"{m['answer_top1_agreement']:.4f}")
    console.print(t)
