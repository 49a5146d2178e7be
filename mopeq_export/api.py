"""The public Python API: one verb per stage, exported from the package root.

    from mopeq_export import analyze, plan, quantize, export, build, load_quantized

Every verb has the same shape: its input (a path, or the record the previous verb returned), a typed frozen
config, then keyword-only run settings (`out`, `force`, `device`, `progress`, ...); it returns a typed record.
The CLI's commands call these functions. Progress is one protocol for all stages: a callable that receives
`ProgressEvent`s.

    report = analyze("ckpt/", EstimatorConfig(max_probes=8), out="work/analysis")
    bits = plan(report, PlanConfig(avg_bits=2.5), out="work/plan.json")
    qdir = quantize("ckpt/", bits, "work/qdir", QuantizeConfig(method="gptq"))
    graphs = export(qdir, "work/export", "cpu")
    result = build(BuildConfig(model="ckpt/", target="cpu", out="bundle/", avg_bits=2.5))
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the records' modules import torch; importing this module does not
    from mopeq_exporters import ExportedModel

    from .allocation import BitPlan, PlanConfig
    from .pipeline import BuildConfig, BuildResult
    from .quantization.checkpoint import QuantizedCheckpoint
    from .quantization.pipeline import QuantizeConfig
    from .sensitivity import EstimatorConfig, SensitivityReport
    from .targets import Target

PathLike = str | Path


@dataclass(frozen=True)
class ProgressEvent:
    """What a stage reports while it runs.

    `stage` is analyze | plan | quantize | export | validate | build (the build also reports its inner stages
    under their names); `message` is a line worth showing; `done`/`total` count the stage's units (probes,
    experts, evaluation windows) when it counts them, else None."""

    stage: str
    message: str | None = None
    done: int | None = None
    total: int | None = None


Progress = Callable[[ProgressEvent], None]


def _quiet(event: ProgressEvent) -> None:
    pass


def analyze(model: PathLike, config: EstimatorConfig | None = None, *, calib: PathLike | None = None,
            samples: int | None = None, seq_len: int | None = None, out: PathLike | None = None, force: bool = False,
            device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
            progress: Progress = _quiet) -> SensitivityReport:
    """Per-expert sensitivity (Hutchinson trace of the loss curvature) and routing statistics of `model`.

    `calib` defaults to the shipped set for the model's kind, `samples` and the probe batch to that kind's
    defaults. With `out`, the record is also written to OUT/sensitivity.json, with its heatmap
    OUT/sensitivity.png (the CLI's layout; the folder appears only when both are complete)."""
    from dataclasses import replace

    from .calibration import calibration_kind, check_sizes
    from .cli import default_calib
    from .devices import resolve_device
    from .fsutil import check_out, require_free_space, staged_dir, write_json
    from .models.loading import model_info
    from .plots import heatmap
    from .sensitivity import DATA_DEFAULTS, TEXT_SEQ_LEN, EstimatorConfig, run_analyze

    calib = Path(calib) if calib is not None else default_calib(model_info(model).is_vlm)
    default_samples, default_batch = DATA_DEFAULTS[calibration_kind(calib)]
    cfg = config or replace(EstimatorConfig(), batch_size=default_batch)
    samples = default_samples if samples is None else samples
    seq_len = TEXT_SEQ_LEN if seq_len is None else seq_len
    check_sizes(samples, seq_len, cfg.batch_size)
    resolve_device(device)

    def run():
        return run_analyze(model, calib, cfg=cfg, samples=samples, seq_len=seq_len, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, say=lambda s: progress(ProgressEvent("analyze", s)),
                           on_probe=lambda i, worst: progress(ProgressEvent(
                               "analyze", f"probe {i}: worst relative stderr {worst:.3f}", i, cfg.max_probes)))

    if out is None:
        return run()
    check_out(out, "analyze", force=force, inputs=(model, calib))
    require_free_space(Path(out).resolve().parent, 1 << 20, "the sensitivity file")
    with staged_dir(out, "analyze", force=force, inputs=(model, calib)) as stage:
        report = run()
        write_json(stage / "sensitivity.json", report.to_json())
        heatmap(report, stage / "sensitivity.png")
    return report


def plan(sensitivity: PathLike | SensitivityReport, config: PlanConfig | None = None, *, out: PathLike | None = None,
         force: bool = False, progress: Progress = _quiet) -> BitPlan:
    """A bit width per expert from a sensitivity record (or its sensitivity.json / analyze folder)."""
    from .allocation import PlanConfig, make_plan
    from .fsutil import check_out, staged_file, write_json
    from .sensitivity import SensitivityReport, load_report

    cfg = config or PlanConfig()
    source = None
    if not isinstance(sensitivity, SensitivityReport):
        source = Path(sensitivity)
        source = source / "sensitivity.json" if source.is_dir() else source
    inputs = (source,) if source else ()
    if out is not None:  # the output is checked before anything is read
        check_out(out, "file", force=force, inputs=inputs, file=True)
    report = sensitivity if source is None else load_report(source)
    bitplan = make_plan(report, cfg, source)
    if out is not None:
        with staged_file(out, force=force, inputs=inputs) as tmp:
            write_json(tmp, bitplan.to_json())
    progress(ProgressEvent("plan", f"{len(bitplan.experts)} experts, {bitplan.avg_bits:.3f} bits on average"))
    return bitplan


def quantize(model: PathLike, bitplan: PathLike | BitPlan, out: PathLike, config: QuantizeConfig | None = None, *,
             calib: PathLike | None = None, samples: int | None = None, seq_len: int = 256,
             dense_bits: int | None = None,
             dense_attention: bool = False, force: bool = False, device: str = "auto", dtype: str = "float32",
             trust_remote_code: bool = False, progress: Progress = _quiet) -> QuantizedCheckpoint:
    """Quantize and pack every routed expert at its planned width into OUT (a QDIR); returns its record."""
    from .allocation import BitPlan
    from .cli import default_calib
    from .devices import resolve_dtype
    from .fsutil import write_json
    from .models.loading import model_info
    from .quantization.checkpoint import read_checkpoint
    from .quantization.pipeline import QuantizeConfig
    from .quantization.stage import run_quantize

    cfg = config or QuantizeConfig()
    if calib is None and cfg.uses_calibration:
        calib = default_calib(model_info(model).is_vlm)
    counted = [0]

    def one_expert():
        counted[0] += 1
        progress(ProgressEvent("quantize", None, counted[0], total))

    with tempfile.TemporaryDirectory(prefix="mopeq-plan-") as tmp:
        if isinstance(bitplan, BitPlan):
            plan_path = Path(tmp) / "plan.json"
            write_json(plan_path, bitplan.to_json())
            total = len(bitplan.experts)
        else:
            plan_path, total = Path(bitplan), None
        run_quantize(model, plan_path, out, calib=calib, cfg=cfg, samples=samples, seq_len=seq_len,
                     dense_bits=dense_bits, dense_attention=dense_attention, trust_remote_code=trust_remote_code,
                     progress=one_expert, device=device, dtype=resolve_dtype(dtype, 0),
                     say=lambda s: progress(ProgressEvent("quantize", s)), force=force)
    return read_checkpoint(out)


def export(quantized: PathLike | QuantizedCheckpoint, out: PathLike, target: str | Target = "cpu", *,
           model: PathLike | None = None, force: bool = False, trust_remote_code: bool = False,
           progress: Progress = _quiet) -> ExportedModel:
    """ONNX graphs of a quantized checkpoint for a deployment target (docs/EXPORT.md) into OUT."""
    from mopeq_exporters import export_quantized, read_export

    from .quantization.checkpoint import QuantizedCheckpoint

    qdir = quantized.path if isinstance(quantized, QuantizedCheckpoint) else Path(quantized)
    export_quantized(qdir, target, out, model, say=lambda s: progress(ProgressEvent("export", s)),
                     trust_remote_code=trust_remote_code, force=force)
    return read_export(out)


def build(config: BuildConfig, *, progress: Progress = _quiet) -> BuildResult:
    """The whole pipeline into a validated bundle (analyze, plan, quantize, export, gate, package, cached).

    Raises GateFailed (a MopeqError carrying the result) when the bundle misses the accuracy gate."""
    from .pipeline import build as run_build

    windows = [0]

    def window(n: int) -> None:
        windows[0] += n
        progress(ProgressEvent("validate", None, windows[0], None))

    return run_build(config, lambda stage, status: progress(ProgressEvent(stage, status)), window)

