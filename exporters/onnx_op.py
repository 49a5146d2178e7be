"""ONNX translation of `mopeq::moe_experts`: one `mopeq.MoEExperts` node per MoE layer (docs/OPS.md).

Handed to `torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATIONS)`. The exporter
traces the function below with onnxscript; the packed tensors arrive as graph values that the exporter
turns into initializers (uint32 codes, float16 scales, uint8 zeros), and the four attributes are
plain Python values that become node attributes.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript.values import Op, Opset

from mopeq_export.quantization.packing import LAYER_TENSOR_NAMES, LAYOUT_VERSION

from . import torch_op  # noqa: F401  (registers torch.ops.mopeq.moe_experts)

DOMAIN = "mopeq"
OP_TYPE = "MoEExperts"
OP_VERSION = 1



def _schema() -> onnx.defs.OpSchema:
    """The OPS.md contract as an ONNX schema: onnxscript needs one to emit the node, and it lets the
    ONNX checker and shape inference see the op (output has hidden's shape and type)."""
    P = onnx.defs.OpSchema.FormalParameter
    inputs = [P("hidden", "T", "[T, H] token activations"), P("indices", "tensor(int64)", "[T, k] routed experts"),
              P("weights", "T", "[T, k] routing weights")]
    for name in LAYER_TENSOR_NAMES:
        kind = name.split(".")[1]
        dtype = {"scales": "tensor(float16)", "zeros": "tensor(uint8)"}.get(kind, "tensor(uint32)")
        shape = "[E_b, rows/16, NB*b, 16]" if kind.startswith("q") else "[E, rows/16, G, 16]"
        inputs.append(P(name, dtype, f"packed expert tensor {shape} (16-row tiles), docs/FORMAT.md section 4"))
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION,
        doc="Routed experts of one MoE layer at per-expert widths (docs/OPS.md).",
        inputs=inputs, outputs=[P("out", "T", "[T, H]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activation type")],
        attributes=[A("expert_bits", AT.INTS, "width of each expert"), A("group_size", AT.INT, "group size"),
                    A("activation", AT.STRING, "silu or gelu (tanh)"),
                    A("layout_version", AT.INT, f"must be {LAYOUT_VERSION}")],
    )


MS_DOMAIN = "com.microsoft"


def _nbits_schema() -> onnx.defs.OpSchema:
    """The inputs and attributes of ONNX Runtime's contrib op com.microsoft.MatMulNBits that we emit (its
    schema lives in ONNX Runtime, not in onnx; onnxscript needs one to build the node)."""
    P, A, AT = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        "MatMulNBits", MS_DOMAIN, 1, doc="ONNX Runtime contrib op: MatMul with a block-quantized B.",
        inputs=[P("A", "T1", ""), P("B", "tensor(uint8)", ""), P("scales", "T1", ""),
                P("zero_points", "tensor(uint8)", "")],
        outputs=[P("Y", "T1", "")], type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[A("K", AT.INT, ""), A("N", AT.INT, ""), A("bits", AT.INT, ""), A("block_size", AT.INT, "")])


def register_schema() -> None:
    """Idempotent: onnx keeps one global registry per process."""
    if not onnx.defs.has(OP_TYPE, OP_VERSION, DOMAIN):
        onnx.defs.register_schema(_schema())
    if not onnx.defs.has("MatMulNBits", 1, MS_DOMAIN):
        onnx.defs.register_schema(_nbits_schema())


register_schema()
_MOE_EXPERTS = Op(Opset(DOMAIN, OP_VERSION), OP_TYPE)
_MATMUL_NBITS = Op(Opset(MS_DOMAIN, 1), "MatMulNBits")


def moe_experts_onnx(hidden, indices, weights, w1_q2, w1_q3, w1_q4, w1_q8, w1_scales, w1_zeros,
                     w2_q2, w2_q3, w2_q4, w2_q8, w2_scales, w2_zeros,
                     expert_bits, group_size, activation, layout_version):
    return _MOE_EXPERTS(
        hidden, indices, weights, w1_q2, w1_q3, w1_q4, w1_q8, w1_scales, w1_zeros,
        w2_q2, w2_q3, w2_q4, w2_q8, w2_scales, w2_zeros,
        expert_bits=list(expert_bits),      # width of each expert; defines the slot table (FORMAT.md §4)
        group_size=int(group_size),         # quantization group along K
        activation=str(activation),         # silu | gelu (tanh), applied to the gate half
        layout_version=int(layout_version),  # packed layout; readers refuse unknown versions
    )


def matmul_nbits_onnx(x, b, scales, zero_points, k, n, bits, block_size):
    return _MATMUL_NBITS(x, b, scales, zero_points, K=int(k), N=int(n), bits=int(bits), block_size=int(block_size))


TRANSLATIONS = {torch.ops.mopeq.moe_experts.default: moe_experts_onnx,
                torch.ops.mopeq.matmul_nbits.default: matmul_nbits_onnx}
