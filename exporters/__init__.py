"""ONNX export of quantized MoE models (imported as `mopeq_exporters`); see docs/EXPORT.md.

    torch_op.py       mopeq::moe_experts, the PyTorch custom op that export keeps whole
    onnx_op.py        its translation to one mopeq.MoEExperts node (and the op schema)
    function_body.py  the portable fallback: model-local ONNX function of standard ops
    decoder.py        the language model with flat KV-cache I/O (prefill + decode in one graph)
    vlm.py            the VLM's vision and embedding graphs
    finalize.py       readable names, the function, IR version, external data
    api.py            export_quantized / export_float_reference
    record.py         ExportedModel, read_export: the stage's record (ODIR/export.json)
"""

from .api import export_float_reference, export_quantized
from .record import ExportedModel, read_export

__all__ = ["export_quantized", "export_float_reference", "ExportedModel", "read_export"]
