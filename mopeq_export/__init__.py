"""mopeq-export: per-expert mixed-precision quantization and edge export for MoE models.

The stages as a Python API (the CLI's commands call the same functions):

    from mopeq_export import EstimatorConfig, run_analyze, PlanConfig, plan_from_file, QuantizeConfig, \\
        run_quantize, export_quantized, load_quantized, evaluate_model, BuildConfig, build_bundle

Attributes are imported on first use, so `import mopeq_export` (and `mopeq_export.errors`, which the
runtime uses) stays free of torch.
"""

from __future__ import annotations

import importlib

_API = {
    "MopeqError": ".errors",
    "EstimatorConfig": ".sensitivity", "run_analyze": ".sensitivity", "load_report": ".sensitivity",
    "PlanConfig": ".allocation", "plan_from_file": ".allocation",
    "QuantizeConfig": ".quantization.pipeline", "run_quantize": ".quantization.stage",
    "load_quantized": ".quantization.loader",
    "export_quantized": "mopeq_exporters",
    "evaluate_model": ".evaluate",
    "BuildConfig": ".pipeline", "build_bundle": (".pipeline", "build"),  # `mopeq_export.pipeline` is the module
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
