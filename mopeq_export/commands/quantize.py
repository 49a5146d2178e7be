"""`mopeq-export quantize`: pack every routed expert at its planned width."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress
from rich.table import Table

from ..cli import app, console
from ..quantization.gptq import GPTQConfig
from ..quantization.pipeline import QuantizeConfig
from ..quantization.signround import SignRoundConfig


@app.command()
def quantize(
    model: Path = typer.Option(..., "--model", help="Hugging Face checkpoint folder"),
    plan: Path = typer.Option(..., "--plan", help="plan.json from `mopeq-export plan`"),
    out: Path = typer.Option(..., "--out", help="output folder (QDIR), written atomically"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration data (default: calibration_data/)"),
    method: str = typer.Option("gptq", "--method",
                               help="gptq | signround (learned rounding on each layer's output) | rtn"),
    group_size: int = typer.Option(32, "--group-size", help="quantization group size (multiple of 32)"),
    samples: Optional[int] = typer.Option(None, "--samples",
                                          help="calibration samples (default: 32 for gptq, 128 for signround)"),
    iters: int = typer.Option(SignRoundConfig.iters, "--iters", help="signround: signed-gradient steps per layer"),
    seq_len: int = typer.Option(256, "--seq-len", help="text calibration window"),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: columns by decreasing Hessian diagonal"),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ dampening (fraction of mean diagonal)"),
    min_tokens: int = typer.Option(64, "--min-tokens", help="experts with fewer routed tokens fall back to RTN"),
    head_gptq: bool = typer.Option(QuantizeConfig.head_gptq, "--head-gptq/--head-rtn",
                                   help="lm_head by GPTQ on the final hidden states, or round-to-nearest"),
    mlp_method: str = typer.Option(QuantizeConfig.mlp_method, "--mlp-method",
                                   help="shared experts and dense MLPs: gptq | signround (learned rounding)"),
    shared_first: bool = typer.Option(QuantizeConfig.shared_first, "--shared-first/--shared-last",
                                      help="quantize shared experts before the routed experts (learned rounding "
                                           "then offsets their error) or after them"),
    balance_tokens: int = typer.Option(QuantizeConfig.balance_tokens, "--balance-tokens",
                                       help="expert-balanced calibration: an expert routed fewer tokens gets more "
                                            "from spare calibration samples, up to N (0: off, the default)"),
    balance_samples: int = typer.Option(QuantizeConfig.balance_samples, "--balance-samples",
                                        help="with --balance-tokens: spare calibration samples carried beside the set"),
    quantize_dense: Optional[int] = typer.Option(None, "--quantize-dense",
                                                 help="also quantize shared experts uniformly to 4 or 8 bits"),
    dense_attention: bool = typer.Option(False, "--dense-attention", help="with --quantize-dense: attention too"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    device: str = typer.Option("auto", "--device", help="auto (a CUDA GPU when visible), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("float32", "--dtype", help="compute dtype of the layer being quantized: float32 "
                                                          "(one layer is resident, so it costs little) or bfloat16"),
    force: bool = typer.Option(False, "--force", help="replace a previous quantize output at --out (nothing else)"),
) -> None:
    """Quantize routed experts (GPTQ per expert on its own routed tokens, learned rounding on each layer's output, or RTN) into the packed format."""
    from ..api import quantize as run

    t0 = time.time()
    cfg = QuantizeConfig(method=method, group_size=group_size,
                         gptq=GPTQConfig(damp=damp, act_order=act_order, min_tokens=min_tokens),
                         signround=SignRoundConfig(iters=iters), head_gptq=head_gptq, mlp_method=mlp_method,
                         shared_first=shared_first, balance_tokens=balance_tokens, balance_samples=balance_samples)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"quantizing experts ({method})", total=None)

        def show(e):
            if e.done is not None:
                bar.update(task, completed=e.done, total=e.total)
            elif e.message:
                console.print(e.message)

        ckpt = run(model, plan, out, cfg, calib=calib, samples=samples, seq_len=seq_len, dense_bits=quantize_dense,
                   dense_attention=dense_attention, force=force, device=device, dtype=dtype,
                   trust_remote_code=trust_remote_code, progress=show)
    print_quantize_summary(ckpt.record, time.time() - t0)


def print_quantize_summary(rec: dict, seconds: float) -> None:
    s = rec["sizes"]
    t = Table(title=f"quantized {rec['model']['name']} ({rec['method']}, group {rec['group_size']}) in {seconds:.0f}s")
    for c in ("layer", "2-bit", "3-bit", "4-bit", "8-bit", "mean w1 rel err", "mean w2 rel err"):
        t.add_column(c, justify="right")
    for layer in rec["layers"]:
        ex = [e for e in rec["experts"] if e["name"].startswith(layer["experts_path"] + ".")]
        counts = [str(sum(e["bits"] == b for e in ex)) for b in (2, 3, 4, 8)]
        t.add_row(layer["experts_path"], *counts, f"{sum(e['w1_rel_error'] for e in ex) / len(ex):.4f}",
                  f"{sum(e['w2_rel_error'] for e in ex) / len(ex):.4f}")
    console.print(t)
    r = rec.get("resources") or {}
    if r:
        gpu = f", {r['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if r.get("peak_gpu_bytes") else ""
        console.print(f"on {r['device']} in {r['dtype']}: peak {r['peak_rss_bytes'] / 2**30:.2f} GiB host{gpu}")
    console.print(
        f"routed experts: nominal {s['nominal_bits']:.3f} bits, effective {s['effective_bits']:.3f} bits/weight, "
        f"{s['expert_bytes'] / 1e6:.2f} MB (float16 {s['expert_bytes_float16'] / 1e6:.2f} MB); whole model "
        f"{s['model_bytes'] / 1e6:.2f} MB vs float16 {s['model_bytes_float16'] / 1e6:.2f} MB"
    )
    if rec["rtn_fallbacks"]:
        console.print(f"{len(rec['rtn_fallbacks'])} expert(s) had too few routed tokens and used RTN: "
                      + ", ".join(rec["rtn_fallbacks"][:6]) + (" …" if len(rec["rtn_fallbacks"]) > 6 else ""))
