"""mopeq-export: per-expert mixed-precision quantization and edge export for MoE models.

The stages as a Python API, one verb each (mopeq_export/api.py; the CLI's commands call the same functions):

    from mopeq_export import analyze, plan, quantize, export, build, load_quantized
    from mopeq_export import EstimatorConfig, PlanConfig, QuantizeConfig, BuildConfig, ProgressEvent

    report = analyze("ckpt/", EstimatorConfig(max_probes=8))          # -> SensitivityReport
    bits = plan(report, PlanConfig(avg_bits=2.5))                     # -> BitPlan
    qdir = quantize("ckpt/", bits, "work/qdir")                       # -> QuantizedCheckpoint
    graphs = export(qdir, "work/export", "cpu")                       # -> ExportedModel
    result = build(BuildConfig(model="ckpt/", target="cpu", out="bundle/", avg_bits=2.5))  # -> BuildResult
    model = load_quantized(qdir)                                      # a transformers model on packed experts

Attributes are imported on first use, so `import mopeq_export` stays free of torch.
"""

from __future__ import annotations

import importlib

_API = {
    # the verbs and their progress protocol
    "analyze": ".api", "plan": ".api", "quantize": ".api", "export": ".api", "build": ".api",
    "ProgressEvent": ".api", "load_quantized": ".quantization.loader",
    # configs
    "EstimatorConfig": ".sensitivity", "PlanConfig": ".allocation", "QuantizeConfig": ".quantization.pipeline",
    "GPTQConfig": ".quantization.gptq", "BuildConfig": ".pipeline", "GateConfig": ".validate",
    "Target": ".targets", "get_target": ".targets",
    # records and their readers
    "SensitivityReport": ".sensitivity", "load_report": ".sensitivity", "BitPlan": ".allocation",
    "QuantizedCheckpoint": ".quantization.checkpoint", "read_checkpoint": ".quantization.checkpoint",
    "ExportedModel": "mopeq_exporters", "read_export": "mopeq_exporters",
    "BuildResult": ".pipeline", "GateReport": ".validate",
    # errors
    "MopeqError": ".errors", "GateFailed": ".pipeline",
    # the stage functions under their earlier names
    "run_analyze": ".sensitivity", "plan_from_file": ".allocation", "run_quantize": ".quantization.stage",
    "export_quantized": "mopeq_exporters", "evaluate_model": ".evaluate",
    "build_bundle": (".pipeline", "build"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mopeq_export' has no attribute {name!r}")
    module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    value = getattr(importlib.import_module(module, __name__ if module.startswith(".") else None), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
