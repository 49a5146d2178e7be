"""`mopeq-export build`: a Hugging Face MoE checkpoint -> a validated bundle for one target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli import app, console
from ..targets import ALIASES, TARGETS

STAGES = ("analyze", "plan", "quantize", "export", "package", "validate")


@app.command()
def build(
    model: Path = typer.Option(..., "--model", help="Hugging Face checkpoint folder"),
    target: str = typer.Option(..., "--target", help=f"one of {', '.join([*TARGETS, *ALIASES])}"),
    out: Path = typer.Option(..., "--out", help="bundle folder (or .tar with --tar), written only if the gate passes"),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="average expert bits (default: the target's)"),
    dense_bits: Optional[int] = typer.Option(None, "--dense-bits", help="dense weights (attention, shared experts, "
                                             "lm_head, embeddings): 4 = quantized (default; embeddings 8), 16 = float"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="use this plan.json instead of analyze + plan"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration data (default: calibration_data/)"),
    method: Optional[str] = typer.Option(None, "--method", help="expert quantizer: signround (learned rounding) | "
                                         "gptq | rtn (default: signround)"),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="held-out data for the gate (default: evaluation_data/)"),
    seed: int = typer.Option(0, "--seed", help="seed of the sensitivity probes and of everything random"),
    tar: bool = typer.Option(False, "--tar", help="write one deterministic .tar instead of a folder"),
    context: Optional[int] = typer.Option(None, "--context", help="tokens for the memory check (default: model max)"),
    max_ppl_ratio: float = typer.Option(1.05, "--max-ppl-ratio", help="gate: bundle/float16 perplexity, at most"),
    min_vqa_retention: float = typer.Option(0.985, "--min-vqa-retention", help="gate: VQA retention, at least"),
    eval_windows: int = typer.Option(128, "--eval-windows", help="gate: text windows of 256 tokens (0 = all)"),
    eval_samples: int = typer.Option(0, "--eval-samples", help="gate: VQA samples (0 = all)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="stage cache (default: ~/.cache/mopeq-export)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute every stage"),
    device: str = typer.Option("auto", "--device", help="analyze, quantize and the gate's reference: auto (a CUDA "
                                                        "GPU when visible), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="analysis/reference compute dtype: auto (float32 up to 1B "
                                                      "parameters, else bfloat16), float32 or bfloat16"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the checkpoint's own code"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="also write the build summary (sizes, "
                                           "metrics, each stage's time and peak memory) as JSON here"),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="ed25519 private key (from `keygen`): "
                                            "sign the bundle's manifest (manifest.sig)"),
    force: bool = typer.Option(False, "--force", help="replace a previous bundle at --out (and the --summary "
                                                     "file); never anything else"),
) -> None:
    """analyze -> plan -> quantize -> export -> package -> validate, with a cache of the stages."""
    from ..api import build as run_build
    from ..pipeline import BuildConfig, GateFailed
    from ..errors import MopeqError
    from ..targets import get_target
    from ..validate import GateConfig

    if avg_bits is not None and plan is not None:
        raise MopeqError("give --avg-bits or --plan, not both")
    if dense_bits is not None and plan is not None:
        raise MopeqError("the plan file holds the dense widths: give --dense-bits to `plan`, not with --plan")
    get_target(target)
    cfg = BuildConfig(model=model, target=target, out=out, avg_bits=avg_bits, plan=plan, calib=calib,
                      eval=eval_data, seed=seed, tar=tar, cache=cache, use_cache=not no_cache, context=context,
                      gate=GateConfig(max_ppl_ratio, min_vqa_retention, eval_windows or None, eval_samples or None),
                      device=device, dtype=dtype, trust_remote_code=trust_remote_code, force=force, sign_key=sign_key,
                      dense_bits=dense_bits, method=method)
    if summary is not None:
        from ..fsutil import check_out

        check_out(summary, "file", force=force, inputs=(model, out), file=True)
    if sign_key is not None:
        from ..signing import load_private_key

        load_private_key(sign_key)  # a bad key fails now, not after the build
    cols = (SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*cols, console=console) as bar:
        tasks = {s: bar.add_task(s, total=1, status="", start=False) for s in STAGES if not (plan and s == "analyze")}

        def show(e) -> None:
            t = tasks.get(e.stage)
            if t is None:
                return
            if e.done is not None:  # gate windows
                bar.update(t, total=cfg.gate.max_windows, completed=e.done)
            elif e.message == "run":
                bar.start_task(t)
                bar.update(t, status="running")
            elif e.message:
                bar.update(t, completed=1, total=1, status=e.message)

        try:
            result = run_build(cfg, progress=show)
        except GateFailed as e:
            bar.stop()
            console.print(summary_table(e.result.summary))
            _write_summary(summary, e.result.summary, force)
            raise
    console.print(summary_table(result.summary))
    _write_summary(summary, result.summary, force)
    console.print(f"[green]gate passed[/]; bundle -> {result.out}")


def _write_summary(path: Path | None, summary: dict, force: bool) -> None:
    if path is not None:
        from ..fsutil import staged_file, write_json

        with staged_file(path, force=force) as tmp:
            write_json(tmp, summary)


def summary_table(s: dict) -> Table:
    t = Table(title=f"bundle for {s['target']} ({s['activation_dtype']} activations)", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    hist = ", ".join(f"{n} x {b}-bit" for b, n in s["bits_histogram"].items())
    t.add_row("experts", f"{hist} (avg {s['avg_bits']:.3f} bits)")
    for name, size in s["file_sizes"].items():
        if name.endswith((".onnx", ".data", ".so")):
            t.add_row(f"  {name}", f"{size / 2**20:.2f} MiB")
    m = s["memory"]
    t.add_row("bundle size", f"{s['bundle_bytes'] / 2**20:.2f} MiB")
    t.add_row("weights + KV cache", f"{m['weights_bytes'] / 2**20:.1f} + {m['kv_bytes'] / 2**20:.1f} MiB at "
                                    f"{m['context']} tokens (share {m['share_bytes'] / 2**20:.0f} MiB)")
    met = s["metrics"]
    if "ppl_ratio" in met:
        t.add_row("perplexity float16 -> bundle", f"{met['ppl_ref']:.3f} -> {met['ppl']:.3f} (x{met['ppl_ratio']:.4f})")
        t.add_row("KL / top-1 agreement", f"{met['kl']:.4f} / {met['top1_agreement']:.4f}")
    else:
        t.add_row("VQA exact match float16 -> bundle",
                  f"{met['accuracy_ref']:.4f} -> {met['accuracy']:.4f} ({met['accuracy_retention']:.2%})")
        t.add_row("answer KL / agreement", f"{met['answer_kl']:.4f} / {met['answer_top1_agreement']:.4f}")
    t.add_row("cached stages", ", ".join(s["cached_stages"]) or "-")
    for stage, r in s.get("stages", {}).items():
        gpu = f", GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r.get("peak_gpu_bytes") else ""
        t.add_row(f"  {stage}", f"{r['seconds']:.0f} s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB host{gpu}")
    t.add_row("gate", "[green]PASS[/]" if s["passed"] else "[red]FAIL[/]")
    return t
