"""`load_quantized(QDIR)`: the source model with its routed experts computing from the packed weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MopeqError
from ..models.adapters import MoELayer, decoder_layer_paths, find_moe_layers
from ..models.loading import check_weights, model_info
from ..models.onload import WeightSource, load_full, skeleton
from .checkpoint import QuantizedCheckpoint, read_checkpoint
from .packing import expert_matrix, num_blocks
from .reference import PackedEmbedding, PackedLayer, PackedLinear


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


PACKED_ATTR = "mopeq_packed"  # a ModuleList block's whole packed layer (the export computes the block from it)


def _install_modulelist(layer: MoELayer, tensors: dict[str, np.ndarray], bits: list[int], g: int,
                        activation: str) -> None:
    """ModuleList experts keep their MLP modules (the block's own forward runs them); each projection becomes
    a PackedLinear of rows of its expert's matrix, which the block also holds whole as `mopeq_packed`.

    The layer's tensors are stored in tiles of 16 rows (FORMAT.md §4) and the gate/up split at row I need not
    fall on a tile, so each expert's matrices are untiled into a row-major copy ([rows, NB*b] words, [rows, G]
    scales and zeros) whose row slices the PackedLinears view: the packed codes are held twice (still a fraction
    of the float weights), and nothing is dequantized until a forward."""
    packed = PackedLayer({n: _t(v) for n, v in tensors.items()}, list(bits), g, activation)
    packed.__dict__["moe_layer"] = layer  # plain attribute (not a submodule): the block it computes
    layer.block.add_module(PACKED_ATTR, packed)
    h, i = layer.hidden_size, layer.intermediate_size
    for e, b in enumerate(bits):
        m = layer.experts[e]
        w1, w1s, w1z = (_t(a) for a in expert_matrix(tensors, "w1", e, bits))  # untiled copies, row-major
        m.gate_proj = PackedLinear(w1[:i], w1s[:i], w1z[:i], b, h, g)
        m.up_proj = PackedLinear(w1[i:], w1s[i:], w1z[i:], b, h, g)
        m.down_proj = PackedLinear(*(_t(a) for a in expert_matrix(tensors, "w2", e, bits)), b, i, g)


def install_packed(model: nn.Module, ckpt: QuantizedCheckpoint) -> nn.Module:
    """Swap the model's routed experts (and packed dense layers) for the checkpoint's packed weights."""
    layers = {l.experts_path: l for l in find_moe_layers(model)}
    for rec in ckpt.layers:
        layer = layers.get(rec.experts_path)
        if layer is None or layer.num_experts != rec.num_experts:
            raise MopeqError(f"{ckpt.path}: layer {rec.experts_path} does not match the model; was it quantized from another model?")
        tensors = ckpt.layer_tensors(rec)
        if layer.layout == "fused":
            packed = PackedLayer({n: _t(v) for n, v in tensors.items()}, list(rec.expert_bits), ckpt.group_size,
                                 rec.activation)
            _set_module(model, rec.experts_path, packed)
        else:
            _install_modulelist(layer, tensors, list(rec.expert_bits), ckpt.group_size, rec.activation)
    for d in ckpt.dense:
        t = ckpt.dense_tensors
        bias = _t(t[f"{d.path}.bias"]) if d.has_bias else None
        words = _t(t[f"{d.path}.words"])
        if words.shape[-1] != num_blocks(d.in_features) * d.bits:
            raise MopeqError(f"{ckpt.path}: packed {d.path} has the wrong shape; re-run quantize")
        scales, zeros = _t(t[f"{d.path}.scales"]), _t(t[f"{d.path}.zeros"])
        if d.kind == "embedding":
            dtype = model.get_submodule(d.path).weight.dtype
            _set_module(model, d.path, PackedEmbedding(words, scales, zeros, d.bits, d.in_features,
                                                       d.group_size or ckpt.group_size, dtype))
        else:
            lin = PackedLinear(words, scales, zeros, d.bits, d.in_features, d.group_size or ckpt.group_size, bias)
            lin.dense = True  # a dense layer (not an expert's view): the export may keep it packed
            _set_module(model, d.path, lin)
    return model


def load_quantized(qdir: str | Path | QuantizedCheckpoint, model_dir: str | Path | None = None, *,
                   dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
                   device: torch.device | str = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """A transformers model whose experts compute from QDIR's packed weights (reference dequantization).

    `model_dir` defaults to the source checkpoint recorded in QDIR; its weights must hash the same. The
    model is built as a skeleton, the packed layers go in, and only the weights that are not routed experts
    (nor packed dense layers) are read from the checkpoint: no float copy of the experts ever exists.
    """
    ckpt = qdir if isinstance(qdir, QuantizedCheckpoint) else read_checkpoint(qdir)
    qdir = ckpt.path
    src = Path(model_dir or ckpt.model.path)
    info = model_info(src)
    if info.weights_sha256 != ckpt.model.weights_sha256:
        raise MopeqError(f"{src} is not the checkpoint {qdir} was quantized from (weights hash differs); "
                         "pass the original with --model")
    check_weights(src)
    model = skeleton(src, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    source = WeightSource(src, model)  # key mapping made while the experts are still the checkpoint's modules
    chunks = [p + "." for p in decoder_layer_paths(model)]
    install_packed(model, ckpt)
    wanted = {n for n, p in model.named_parameters() if p.device.type == "meta"}
    try:
        load_full(src, model, source, torch.device(device), chunks=chunks, select=wanted.__contains__)
    finally:
        source.close()
    return model
