"""`mopeq::moe_experts`: the op of docs/OPS.md as a PyTorch custom op, so `torch.export` keeps it whole.

Left alone, `torch.export` would trace `moe_experts_torch` into data-dependent Python (`unique`, `nonzero`,
a loop over the experts that this batch happens to route to) and bake the example routing into the graph.
Wrapped as an opaque custom op with a fake implementation, the exported program holds one call per MoE
layer, which the ONNX translation (`onnx_op.py`) turns into one `mopeq.MoEExperts` node.

`exporting(model)` swaps every `PackedLayer.forward` for a call of this op for the duration of an export.
A ModuleList MoE block (remote-code DeepSeek-VL2 / MolmoE style) routes and loops over its experts in its
own forward, which cannot be traced; during the export the block computes instead

    x -> gate -> (indices, weights) -> mopeq::moe_experts(x, ...) [+ shared experts (x), sigmoid-gated
         when the block has a shared_expert_gate]

from the whole packed layer the loader attached to it; the export tests compare that with the block's own
forward over its packed experts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from mopeq_export.models.adapters import routing_from_gate
from mopeq_export.quantization.loader import PACKED_ATTR
from mopeq_export.quantization.packing import LAYER_TENSOR_NAMES, LAYOUT_VERSION
from mopeq_export.quantization.reference import PackedLayer, PackedLinear, moe_experts_torch, unpack_codes

OP_NAME = "mopeq::moe_experts"
NBITS_OP_NAME = "mopeq::matmul_nbits"
NBITS_WIDTHS = (4, 8)  # what com.microsoft.MatMulNBits takes here (8: ORT >= 1.22 on the CPU, see targets.py)

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


@torch.library.custom_op(NBITS_OP_NAME, mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """x [..., K] @ W^T with W in com.microsoft.MatMulNBits' layout (`nbits_tensors`); eager: dequantize."""
    codes = _nibbles(b.reshape(n, -1), bits)[:, :k].float()
    nb = b.shape[1]
    zeros = _nibbles(zero_points.reshape(n, -1), bits)[:, :nb].float()
    w = (codes - zeros.repeat_interleave(block_size, 1)[:, :k]) * scales.float().reshape(n, nb).repeat_interleave(
        block_size, 1)[:, :k]
    return (x.float() @ w.t()).to(x.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


def _nibbles(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, bytes] -> codes [rows, bytes * 8/bits], low bits first (MatMulNBits' packing)."""
    if bits == 8:
        return packed.to(torch.int64)
    p = packed.to(torch.int64)
    return torch.stack([p & 15, p >> 4], -1).flatten(-2)


def nbits_tensors(lin: PackedLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed dense matrix (FORMAT.md §3, group size g) as MatMulNBits inputs with block_size = g:
    B uint8 [N, blocks, g*bits/8], scales [N*blocks] in the activation dtype, zero points uint8 packed like
    B ([N * ceil(blocks*bits/8)]). Same codes, scales and zeros: the same weights to the last bit."""
    k, g, bits = lin.in_features, lin.group_size, lin.bits
    nb = -(-k // g)
    codes = unpack_codes(lin.words, bits, k)
    codes = nn.functional.pad(codes, (0, nb * g - k)).to(torch.uint8)  # padding codes: 0 (their inputs are absent)
    zeros = lin.zeros.to(torch.uint8)
    if bits == 4:
        pack = lambda c: c[..., 0::2] | (c[..., 1::2] << 4)  # noqa: E731
        b = pack(codes).reshape(-1, nb, g // 2)
        z = pack(nn.functional.pad(zeros, (0, nb % 2))).reshape(-1)
    else:
        b, z = codes.reshape(-1, nb, g), zeros.reshape(-1)
    return b.contiguous(), lin.scales.to(dtype).reshape(-1).contiguous(), z.contiguous()


def _linear_via_op(lin: PackedLinear, x):
    y = torch.ops.mopeq.matmul_nbits(x, lin.nbits_b, lin.nbits_scales, lin.nbits_zero_points, lin.in_features,
                                     lin.out_features, lin.bits, lin.group_size)
    return y if lin.bias is None else y + lin.bias.to(y.dtype)


def _forward_via_op(layer: PackedLayer, hidden, indices, weights):
    # the op takes weights in the activation type (OPS.md); some routers (DeepSeek-V2's) compute in float32
    return torch.ops.mopeq.moe_experts(hidden, indices.long(), weights.to(hidden.dtype), *layer.tensors().values(),
                                       layer.expert_bits, layer.group_size, layer.activation, LAYOUT_VERSION)


def _block_via_op(layer, hidden_states):
    """A ModuleList MoE block's output from its packed layer (see the module docstring)."""
    block, packed = layer.block, getattr(layer.block, PACKED_ATTR)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    idx, w = routing_from_gate(layer, layer.block.gate(x), x.shape[0])
    y = _forward_via_op(packed, x, idx, w)
    if layer.shared_expert_path:
        shared = getattr(block, layer.shared_expert_path.rsplit(".", 1)[1])(x)
        if isinstance(getattr(block, "shared_expert_gate", None), nn.Module):
            shared = torch.sigmoid(block.shared_expert_gate(x)) * shared
        y = y + shared
    return y.reshape(shape)


@contextlib.contextmanager
def exporting(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[int]:
    """Within the block every MoE layer of `model` calls `mopeq::moe_experts` and every dense PackedLinear
    (`dense_nbits`) `mopeq::matmul_nbits`; yields how many MoE layers there are."""
    swapped = []
    for m in list(model.modules()):
        if isinstance(m, PackedLinear) and getattr(m, "dense_nbits", False):
            for name, t in zip(("nbits_b", "nbits_scales", "nbits_zero_points"), nbits_tensors(m, dtype)):
                m.register_buffer(name, t, persistent=False)
            m.forward = _linear_via_op.__get__(m)
            swapped.append(m)
            continue
        if not isinstance(m, PackedLayer):
            continue
        layer = m.__dict__.get("moe_layer")
        if layer is None:  # fused experts: the packed layer replaced the experts module
            m.forward = _forward_via_op.__get__(m)  # instance attribute shadows the class forward
            swapped.append(m)
        else:  # a ModuleList block: the whole block is recomputed around the op
            layer.block.forward = lambda h, layer=layer: _block_via_op(layer, h)
            swapped.append(layer.block)
    try:
        yield sum(not isinstance(m, PackedLinear) for m in swapped)
    finally:
        for m in swapped:
            del m.forward
            if isinstance(m, PackedLinear):
                for name in ("nbits_b", "nbits_scales", "nbits_zero_points"):
                    delattr(m, name)

