"""The export verbs: `export_quantized(QDIR, target, ODIR)` and `export_float_reference(MODEL, ODIR)`.

Both write the folder of docs/EXPORT.md through a staging folder (nothing half-written survives an error)
and return the record that is also written as ODIR/export.json.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Callable

import onnx_ir as ir
import torch
from torch import nn

from mopeq_export.fsutil import check_out, read_json, staged_dir, write_json
from mopeq_export.quantization.packing import LAYOUT_VERSION
from mopeq_export.quantization.reference import PackedEmbedding, PackedLinear
from mopeq_export.targets import Target, get_target

from . import decoder, finalize, onnx_op, patches, torch_op, vlm

EXPORT_SCHEMA_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}
Progress = Callable[[str], None]


def _io(values) -> list[dict]:
    """Graph inputs/outputs as JSON: symbolic dimensions are names, fixed ones integers."""
    out = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        out.append({"name": v.name, "dtype": v.dtype.name.lower(), "shape": dims})
    return out


def _save(program, path: Path, target: Target, vision: bool = False) -> dict:
    model = program.model
    if vision and target.activation_dtype == "float32":
        finalize.store_float16(model.graph)  # checkpoint weights stay float16 in the file
    finalize.finalize(model, path, target.ir_version, target.opset, target.nbits_accuracy_level)
    uses_op = any(n.domain == onnx_op.DOMAIN for n in model.graph)
    return {"file": path.name, "inputs": _io(model.graph.inputs), "outputs": _io(model.graph.outputs),
            "custom_ops": [f"{onnx_op.DOMAIN}.{onnx_op.OP_TYPE}"] if uses_op else []}


def dequantize_dense(model: nn.Module, dtype: torch.dtype, nbits_widths: tuple[int, ...] = ()) -> int:
    """Dense PackedLinears at a width the target's MatMulNBits takes are marked for `mopeq::matmul_nbits`
    (`dense_nbits`); every other PackedLinear (another width, from `--quantize-dense`, or a ModuleList
    expert's view) becomes an nn.Linear holding the same dequantized weights. Returns how many were."""
    dense = {id(m) for m in model.modules() if isinstance(m, PackedLinear) and getattr(m, "dense", False)}
    swaps = []
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        if id(m) in dense and m.bits in nbits_widths:
            m.dense_nbits = True
        else:
            swaps.append((name, m))
    for name, m in swaps:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(m.weight.to(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias.to(dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
    return len(swaps)


def _export_all(model: nn.Module, is_vlm: bool, target: Target, stage: Path, translations, say: Progress) -> dict:
    dtype = DTYPES[target.activation_dtype]
    graphs = {}
    shape = decoder.DecoderShape.of(model, is_vlm, dtype)
    say("decoder")
    with patches.real_rope(model):
        program = decoder.export_decoder(model, is_vlm, dtype, target.opset, shape, translations)
    graphs["decoder"] = _save(program, stage / "decoder.onnx", target)
    if is_vlm:
        say("embed")
        graphs["embed"] = _save(vlm.export_embed(model, target.opset), stage / "embed.onnx", target)
        say("vision")
        graphs["vision"] = _save(vlm.export_vision(model, dtype, target.opset), stage / "vision.onnx", target,
                                 vision=True)
    record = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "target": target.to_json(),
        "activation_dtype": target.activation_dtype,
        "opset": target.opset,
        "ir_version": target.ir_version,
        "custom_op": {"domain": onnx_op.DOMAIN, "op_type": onnx_op.OP_TYPE, "version": onnx_op.OP_VERSION,
                      "layout_version": LAYOUT_VERSION, "fallback": "model-local ONNX function"},
        "model": {**shape.to_json(), "is_vlm": is_vlm,
                  "bos_token_id": decoder.text_config(model).bos_token_id,
                  "eos_token_id": decoder.text_config(model).eos_token_id},
        "graphs": graphs,
    }
    if is_vlm:
        record["vision"] = vlm.vision_info(model)
    return record


def export_quantized(qdir: str | Path, target: str | Target, out: str | Path, model_dir: str | Path | None = None,
                     say: Progress = lambda s: None, trust_remote_code: bool = False, force: bool = False,
                     nbits_accuracy_level: int | None = None) -> dict:
    """QDIR (from `quantize`) -> ODIR with the custom-op graph(s) for `target`.

    nbits_accuracy_level overrides the target's MatMulNBits accuracy level (0: float activations, as the
    export-parity tests against PyTorch use).

    The model is the skeleton with the packed experts and only its other weights loaded, in the target's
    dtype (`load_quantized`): no float copy of the experts is ever made."""
    from mopeq_export.quantization.loader import load_quantized

    from mopeq_export.devices import Meter
    from mopeq_export.models.onload import skeleton
    from mopeq_export.quantization.checkpoint import read_checkpoint
    from mopeq_export.scale import ModelShape, check_fits, export_bytes

    target = get_target(target) if isinstance(target, str) else target
    if nbits_accuracy_level is not None:
        target = dataclasses.replace(target, nbits_accuracy_level=nbits_accuracy_level)
    dtype = DTYPES[target.activation_dtype]
    inputs = (qdir, model_dir)
    check_out(out, "export", force=force, inputs=inputs)
    ckpt = read_checkpoint(qdir)  # verified (hashes) before anything is loaded
    qrecord = ckpt.record
    is_vlm = bool(qrecord["model"].get("is_vlm"))
    shape = ModelShape.of(skeleton(model_dir or ckpt.model.path, trust_remote_code=trust_remote_code))
    need = export_bytes(shape, torch.empty((), dtype=dtype).element_size(), qrecord["sizes"]["effective_bits"])
    check_fits(need, torch.device("cpu"), "the export", "export on a machine with more memory")
    meter = Meter(torch.device("cpu"), dtype, estimate_bytes=need)
    say("loading")
    model = load_quantized(ckpt, model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    del ckpt  # its arrays now live in the model's packed buffers
    if is_vlm:
        vlm.check_supported(model)
    dense = dequantize_dense(model, dtype, target.nbits_widths)
    with staged_dir(out, "export", force=force, inputs=inputs) as stage, torch_op.exporting(model, dtype) as n_layers:
        record = _export_all(model, is_vlm, target, stage, onnx_op.TRANSLATIONS, say)
        record["quantized"] = {"path": str(Path(qdir).resolve()), "model": qrecord["model"],
                               "method": qrecord.get("method"), "group_size": qrecord.get("group_size"),
                               "moe_layers": n_layers, "dense_dequantized": dense,
                               "dense": dense_graph_record(model, qrecord)}
        record["resources"] = meter.done().to_json()
        write_json(stage / "export.json", record)
    return record


def dense_graph_record(model: nn.Module, qrecord: dict) -> dict:
    """How the dense weights went into the graph: per class (the plan's widths), and the count of matrices
    per ONNX form (MatMulNBits, the uint8 embedding gather, dequantized float)."""
    forms = {"matmul_nbits": 0, "embedding_uint8": 0, "float": 0}
    for m in model.modules():
        if isinstance(m, PackedLinear) and getattr(m, "dense", False):
            forms["matmul_nbits" if getattr(m, "dense_nbits", False) else "float"] += 1
        elif isinstance(m, PackedEmbedding):
            forms["embedding_uint8"] += 1
    return {"widths": qrecord.get("dense_widths") or {}, "forms": forms}


def export_float_reference(model_dir: str | Path, out: str | Path, target: str | Target = "cpu",
                           say: Progress = lambda s: None) -> dict:
    """The source model with stock ONNX ops at the target's dtype, experts unquantized (the benchmark baseline).

    Fused experts use transformers' `batched_mm` implementation: the default `grouped_mm` stops the export
    at a transformers custom op (docs/FACTS.md)."""
    from mopeq_export.models.loading import load_model

    target = get_target(target) if isinstance(target, str) else target
    say("loading")
    model, info = load_model(model_dir, dtype=DTYPES[target.activation_dtype])
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("batched_mm")
    with staged_dir(out, "export", inputs=(model_dir,)) as stage:
        record = _export_all(model, info.is_vlm, target, stage, None, say)
        record["float_reference"] = {"model": info.to_json()}
        write_json(stage / "export.json", record)
    return record
