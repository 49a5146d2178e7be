"""Turn an ONNXProgram into the file we ship: readable names, the fallback function, target IR, external data.

- Node names become paths from the exporter's scope metadata: `/model/layers.3/mlp/experts/MoEExperts`.
- Initializer names lose the export wrapper's prefix (`model.`), so they read like the checkpoint.
- The model-local function `mopeq.MoEExperts` (function_body.py) is added when the graph uses the op.
- The IR version is set to the target's (the exporter writes the newest onnx knows).
- Weights go to `<file>.data` next to the graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .function_body import build_function
from .onnx_op import DOMAIN, OP_TYPE, OP_VERSION

WRAPPER_PREFIX = "model."  # the attribute under which the export wrappers hold the model


def _scope_path(node: ir.Node) -> list[str]:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return []
    parts = [s for s in eval(scopes, {}) if s]  # a repr'd list of str, written by torch.onnx
    # each entry is the full dotted module path; the last one is the fx node's own name
    module = parts[-2] if len(parts) >= 2 else ""
    if module.startswith(WRAPPER_PREFIX):
        module = module[len(WRAPPER_PREFIX):]
    # scopes the exporter invents for nodes outside any module ("_empty_nn_module_stack...") are dropped
    return [p for p in module.split(".") if p and not p.startswith("_")] if module else []


def _path_name(parts: list[str]) -> str:
    """model.layers.3.mlp.experts -> /model/layers.3/mlp/experts (a numbered layer stays one segment)."""
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}.{p}"
        else:
            out.append(p)
    return "/" + "/".join(out) if out else ""


def rename_nodes(graph: ir.Graph) -> None:
    seen: Counter[str] = Counter()
    for node in graph:
        base = f"{_path_name(_scope_path(node))}/{node.op_type}"
        seen[base] += 1
        node.name = base if seen[base] == 1 else f"{base}_{seen[base] - 1}"
        # stack traces and fx reprs name local paths and bloat the file; the node name carries the path
        node.metadata_props.clear()


def rename_initializers(graph: ir.Graph) -> None:
    for name in list(graph.initializers):
        if name.startswith(WRAPPER_PREFIX):
            value = graph.initializers.pop(name)
            value.name = name[len(WRAPPER_PREFIX):]
            graph.initializers[value.name] = value


def store_float16(graph: ir.Graph) -> int:
    """Store float32 initializers as float16 followed by a Cast back to float32 (folded at session load).

    Used for the vision graph on float32 targets: the file keeps the checkpoint's float16 weights."""
    count = 0
    for name, value in list(graph.initializers.items()):
        if value.dtype != ir.DataType.FLOAT or value.const_value is None:
            continue
        half = ir.Value(name=f"{name}.fp16", shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT16),
                        const_value=ir.tensor(value.const_value.numpy().astype(np.float16), name=f"{name}.fp16"))
        graph.register_initializer(half)
        cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=f"/weights/{name}/Cast")
        uses = list(value.uses())
        for user, index in uses:
            user.replace_input_with(index, cast.outputs[0])
        graph.insert_before(graph.node(0), cast) if len(graph) else graph.append(cast)
        graph.initializers.pop(name)
        count += 1
    return count


def add_fallback_function(model: ir.Model, opset: int) -> bool:
    """Attach the portable body of mopeq.MoEExperts if the graph calls it; returns whether it did."""
    if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph):
        return False
    func = ir.serde.deserialize_function(build_function(opset))
    model.functions[func.identifier()] = func
    model.opset_imports[DOMAIN] = OP_VERSION
    return True


def set_nbits_accuracy(graph: ir.Graph, level: int) -> None:
    """MatMulNBits' accuracy_level (targets.Target.nbits_accuracy_level): 0 leaves ORT's default."""
    if level:
        for node in graph:
            if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)


def strip_provenance(model: ir.Model) -> None:
    """Exporter stack traces and doc strings name files of the build machine: the shipped file has none."""
    for g in [model.graph, *model.functions.values()]:
        for node in g:
            node.metadata_props.clear()
            node.doc_string = None
        g.doc_string = None
    model.doc_string = None
    model.metadata_props.clear()


def finalize(model: ir.Model, path: Path, ir_version: int, opset: int, nbits_accuracy_level: int = 0) -> None:
    rename_nodes(model.graph)
    rename_initializers(model.graph)
    add_fallback_function(model, opset)
    if any(n.domain == "com.microsoft" for n in model.graph):  # MatMulNBits of quantized dense layers
        model.opset_imports.setdefault("com.microsoft", 1)
    set_nbits_accuracy(model.graph, nbits_accuracy_level)
    strip_provenance(model)
    model.ir_version = ir_version
    model.producer_name = "mopeq-export"
    ir.save(model, path, external_data=f"{path.name}.data")
    drop_value_info(path)


def drop_value_info(path: Path) -> None:
    """Remove the intermediate values' shape annotations (graph.value_info): optional in ONNX, re-inferred by
    every runtime at load, and about a third of text-moe's decoder.onnx (86 KB). The weights' external data
    references are kept as they are (the data file is not read)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if len(proto.graph.value_info):
        del proto.graph.value_info[:]
        path.write_bytes(proto.SerializeToString())
