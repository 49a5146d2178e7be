"""`mopeq-export quantize`: plan + model (+ calibration) -> QDIR, all or nothing, one decoder layer in memory.

Everything that can be checked without the model is checked first (plan, calibration, widths, the output
folder's disk), then the model is built as a skeleton and walked layer by layer (`pipeline.py`): the peak
memory is about one decoder layer in float32 plus the calibration activations and the packed result
(docs/SCALE.md), whatever the model's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import load_calibration
from ..devices import Meter, gib, resolve_device
from ..errors import MopeqError
from ..fsutil import check_out, require_free_space, staged_dir
from ..models.adapters import find_moe_layers
from ..models.loading import check_weights, load_tokenizer, model_info
from ..models.onload import WeightSource, skeleton
from ..models.sequential import SequentialRunner
from ..scale import ModelShape, check_fits, quantize_bytes
from .checkpoint import (SCHEMA_VERSION, DenseRecord, dense_tensors, layer_record, layer_tensors, size_report,
                         to_json_layers, write_layer, write_record)
from .packing import LAYOUT_VERSION
from .pipeline import QuantizeConfig, check_config, quantize_sequential, results_summary
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
        bias = None if lin.bias is None else lin.bias.detach().cpu()
        cpu = type(q)(q.bits, q.group_size, q.codes.cpu(), q.scales.cpu(), q.zeros.cpu())
        tensors.update(dense_tensors(p, cpu, bias))
        records.append(DenseRecord(p, bits, lin.in_features, lin.out_features, lin.bias is not None))
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
    return records, tensors


def expected_bytes(plan: PlanBits, layers, group_size: int, dense_params: int = 0, dense_bits: int = 8) -> int:
    """Bytes QDIR will hold: each expert's codes at its width plus float16 scales and uint8 zeros per group."""
    per_expert = {l.expert_name(e): l.expert_params for l in layers for e in range(l.num_experts)}
    total = sum(per_expert[n] * (plan.bits[n] + 24 / group_size) / 8 for n in per_expert if n in plan.bits)
    return int(total + dense_params * (dense_bits + 24 / group_size) / 8)


def run_quantize(model_dir: str | Path, plan_path: str | Path, out: str | Path, *, calib: str | Path | None,
                 cfg: QuantizeConfig, samples: int = 32, seq_len: int = 256, dense_bits: int | None = None,
                 dense_attention: bool = False, trust_remote_code: bool = False, progress=None,
                 device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
                 work_bytes: int | None = None, say=lambda s: None, force: bool = False) -> QuantizeResult:
    t0 = time.time()
    inputs = (model_dir, plan_path, calib)
    check_out(out, "quantize", force=force, inputs=inputs)
    # -- checks that need no model ---------------------------------------------------------------------
    plan: PlanBits = read_plan_bits(plan_path)
    info = model_info(model_dir)
    plan.check_model(info)
    check_config(plan.bits, calib if cfg.method == "gptq" else None, cfg)
    if dense_bits is not None:
        check_width(dense_bits, cfg.group_size)
        if dense_bits not in (4, 8):
            raise MopeqError("--quantize-dense takes 4 or 8 bits")
    if cfg.method == "gptq" and not Path(calib).exists():
        raise MopeqError(f"calibration data not found: {calib}")
    dev = resolve_device(device)
    check_weights(model_dir)
    model = skeleton(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    layers = find_moe_layers(model)
    plan.check_experts([n for l in layers for n in l.expert_names])
    dense_paths = _dense_targets(model, layers, dense_attention) if dense_bits is not None else []
    dense_params = sum(model.get_submodule(p).weight.numel() for p in dense_paths)
    require_free_space(Path(out).resolve().parent, expected_bytes(plan, layers, cfg.group_size, dense_params,
                                                                 dense_bits or 8), "the quantized checkpoint")
    calib_set = None
    if cfg.method == "gptq":
        calib_set = load_calibration(calib, load_tokenizer(model_dir, trust_remote_code), model.config,
                                     samples=samples, seq_len=seq_len)
    work_bytes = work_bytes or default_work_bytes(dev)
    tokens = calib_set.num_tokens if calib_set else 0
    avg = sum(plan.bits.values()) / len(plan.bits)
    need = quantize_bytes(ModelShape.of(model), tokens, avg, work_bytes)
    check_fits(need, dev, "quantize", "use --device cuda or fewer --samples")
    say(f"quantize: one decoder layer at a time on {dev}, about {gib(need)} at peak (estimate)")
    meter = Meter(dev, dtype, estimate_bytes=need)
    expert_params = {n for n, p in model.named_parameters() if any(p is q for l in layers for q, _ in l.hessian_params())}
    total_params = sum(p.numel() for p in model.parameters())
    expert_count = sum(p.numel() for n, p in model.named_parameters() if n in expert_params)

    dense_recs, dense = [], {}
    lrecs, summaries, expert_bytes = [], [], [0]

    def after_layer(i, decoder_layer):
        prefix = f"{runner.stack_path}.{i}."
        mine = [p for p in dense_paths if p.startswith(prefix)]
        if mine:
            recs, tensors = _quantize_dense(model, mine, dense_bits, cfg.group_size)
            dense_recs.extend(recs)
            dense.update(tensors)

    def on_experts(layer, results):  # packed and written at once: one layer's codes in memory at a time
        tensors = layer_tensors(results)
        write_layer(stage, layer.experts_path, tensors)
        expert_bytes[0] += sum(t.nbytes for t in tensors.values())
        lrecs.append(layer_record(layer, results))
        summaries.extend(results_summary(results))

    source = WeightSource(model_dir, model)
    try:
        with staged_dir(out, "quantize", force=force, inputs=inputs) as stage:
            runner = SequentialRunner(model, calib_set.batches if calib_set else [], dev, source)
            quantize_sequential(runner, layers, plan.bits, cfg, progress, work_bytes, after_layer, on_experts)
            dense_count = sum(d.in_features * d.out_features for d in dense_recs)
            sizes = size_report(lrecs, expert_bytes[0], total_params, expert_count,
                                sum(t.nbytes for t in dense.values()), dense_count)
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
                "experts": summaries,
                "rtn_fallbacks": [e["name"] for e in summaries if e["method"] != cfg.method],
                "sizes": sizes,
                "resources": meter.done().to_json(),
            }
            write_record(stage, record, dense)
    finally:
        source.close()
    return QuantizeResult(Path(out), record, time.time() - t0)


def default_work_bytes(device: torch.device) -> int:
    """Working memory for one batched GPTQ chunk: a quarter of the free GPU memory, 256 MiB on the CPU (where
    batching saves little: the CPU is busy either way, and host memory is the budget)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] // 4)
    return 256 << 20
