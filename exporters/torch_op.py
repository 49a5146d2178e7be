"""`mopeq::moe_experts`: the op of docs/OPS.md as a PyTorch custom op, so `torch.export` keeps it whole.

Left alone, `torch.export` would trace `moe_experts_torch` into data-dependent Python (`unique`, `nonzero`,
a loop over the experts that this batch happens to route to) and bake the example routing into the graph.
Wrapped as an opaque custom op with a fake implementation, the exported program holds one call per MoE
layer, which the ONNX translation (`onnx_op.py`) turns into one `mopeq.MoEExperts` node.

`exporting(model)` swaps every `PackedLayer.forward` for a call of this op for the duration of an export.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from mopeq_export.quantize.packing import LAYER_TENSOR_NAMES, LAYOUT_VERSION
from mopeq_export.quantize.reference import PackedLayer, moe_experts_torch

OP_NAME = "mopeq::moe_experts"

# One tensor argument per packed tensor, in op input order: w1_q2, ..., w2_zeros.
_ARG_NAMES = [n.replace(".", "_") for n in LAYER_TENSOR_NAMES]


@torch.library.custom_op(OP_NAME, mutates_args=())
def moe_experts(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                w1_q2: torch.Tensor, w1_q3: torch.Tensor, w1_q4: torch.Tensor, w1_q8: torch.Tensor,
                w1_scales: torch.Tensor, w1_zeros: torch.Tensor,
                w2_q2: torch.Tensor, w2_q3: torch.Tensor, w2_q4: torch.Tensor, w2_q8: torch.Tensor,
                w2_scales: torch.Tensor, w2_zeros: torch.Tensor,
                expert_bits: list[int], group_size: int, activation: str, layout_version: int) -> torch.Tensor:
    """Eager implementation: the PyTorch reference, so an exported program still runs in torch."""
    packed = (w1_q2, w1_q3, w1_q4, w1_q8, w1_scales, w1_zeros, w2_q2, w2_q3, w2_q4, w2_q8, w2_scales, w2_zeros)
    return moe_experts_torch(hidden, indices, weights, dict(zip(LAYER_TENSOR_NAMES, packed)), list(expert_bits),
                             group_size, activation)


@moe_experts.register_fake
def _(hidden, indices, weights, *packed_and_attrs):
    return torch.empty_like(hidden)


def _forward_via_op(layer: PackedLayer, hidden, indices, weights):
    return torch.ops.mopeq.moe_experts(hidden, indices, weights, *layer.tensors().values(), layer.expert_bits,
                                       layer.group_size, layer.activation, LAYOUT_VERSION)


@contextlib.contextmanager
def exporting(model: nn.Module) -> Iterator[int]:
    """Within the block every PackedLayer of `model` calls `mopeq::moe_experts`; yields how many there are."""
    layers = [m for m in model.modules() if isinstance(m, PackedLayer)]
    for m in layers:
        # instance attribute shadows the class forward; removed again below
        m.forward = _forward_via_op.__get__(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward
