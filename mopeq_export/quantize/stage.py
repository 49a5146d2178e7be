"""`mopeq-export quantize`: plan + model (+ calibration) -> QDIR, all or nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import load_calibration
from ..errors import MopeqError
from ..fsutil import staged_dir
from ..models.adapters import find_moe_layers
from ..models.loading import load_model, load_tokenizer
from .checkpoint import (SCHEMA_VERSION, DenseRecord, dense_tensors, layer_record, layer_tensors, size_report,
                         to_json_layers, write_checkpoint)
from .packing import LAYOUT_VERSION
from .pipeline import QuantizeConfig, quantize_layers
from .plan_io import PlanBits, read_plan_bits
from .primitives import check_width, rtn

_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class QuantizeResult:
    out: Path
    record: dict
    seconds: float


def _dense_targets(model, layers, include_attention: bool) -> list[str]:
    """Shared-expert projections, and (optionally) attention projections of the language model."""
    paths = []
    for layer in layers:
        if layer.shared_expert_path:
            shared = model.get_submodule(layer.shared_expert_path)
            paths += [f"{layer.shared_expert_path}.{n}" for n, m in shared.named_modules()
                      if isinstance(m, torch.nn.Linear)]
    if include_attention:
        blocks = {l.block_path.rsplit(".", 1)[0] for l in layers}  # decoder layers holding MoE blocks
        for b in sorted(blocks):
            for n, m in model.get_submodule(b).named_modules():
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in _ATTN_NAMES:
                    paths.append(f"{b}.{n}")
    return paths


def _quantize_dense(model, paths: list[str], bits: int, group_size: int):
    records, tensors = [], {}
    for p in paths:
        lin = model.get_submodule(p)
        q = rtn(lin.weight.detach().float(), bits, group_size)
        tensors.update(dense_tensors(p, q, lin.bias))
        records.append(DenseRecord(p, bits, lin.in_features, lin.out_features, lin.bias is not None))
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
    return records, tensors


def run_quantize(model_dir: str | Path, plan_path: str | Path, out: str | Path, *, calib: str | Path | None,
                 cfg: QuantizeConfig, samples: int = 32, seq_len: int = 256, dense_bits: int | None = None,
                 dense_attention: bool = False, trust_remote_code: bool = False, progress=None) -> QuantizeResult:
    t0 = time.time()
    model, info = load_model(model_dir, trust_remote_code=trust_remote_code)
    plan: PlanBits = read_plan_bits(plan_path)
    plan.check_model(info)
    layers = find_moe_layers(model)
    plan.check_experts([n for l in layers for n in l.expert_names])
    if dense_bits is not None:
        check_width(dense_bits, cfg.group_size)
        if dense_bits not in (4, 8):
            raise MopeqError("--quantize-dense takes 4 or 8 bits")
    calib_set = None
    if cfg.method == "gptq":
        if calib is None:
            raise MopeqError("GPTQ needs calibration data: pass --calib, or use --method rtn")
        calib_set = load_calibration(calib, load_tokenizer(model_dir), model.config, samples=samples, seq_len=seq_len)
    expert_params = {n for n, p in model.named_parameters() if any(p is q for l in layers for q, _ in l.hessian_params())}
    results = quantize_layers(model, layers, plan.bits, calib_set, cfg, progress)
    tensors = {f"{l.experts_path}.{n}": t for l, rs in zip(layers, results) for n, t in layer_tensors(rs).items()}
    dense_recs, dense = ([], {})
    if dense_bits is not None:
        dense_recs, dense = _quantize_dense(model, _dense_targets(model, layers, dense_attention), dense_bits,
                                            cfg.group_size)
    lrecs = [layer_record(l, rs) for l, rs in zip(layers, results)]
    dense_params = sum(d.in_features * d.out_features for d in dense_recs)
    sizes = size_report(lrecs, tensors, model, expert_params, sum(t.nbytes for t in dense.values()), dense_params)
    record = {
        "schema_version": SCHEMA_VERSION,
        "layout_version": LAYOUT_VERSION,
        "model": info.to_json(),
        "plan": {"path": str(Path(plan_path).resolve()), "sha256": plan.sha256, "method": plan.method,
                 "avg_bits": plan.avg_bits},
        "method": cfg.method,
        "group_size": cfg.group_size,
        "config": cfg.to_json(),
        "calibration": calib_set.info.to_json() if calib_set else None,
        "layers": to_json_layers(lrecs),
        "dense": [vars(d) for d in dense_recs],
        "experts": [r.summary() for rs in results for r in rs],
        "rtn_fallbacks": [r.name for rs in results for r in rs if r.method != cfg.method],
        "sizes": sizes,
    }
    with staged_dir(out) as stage:
        write_checkpoint(stage, record, tensors, dense)
    return QuantizeResult(Path(out), record, time.time() - t0)
