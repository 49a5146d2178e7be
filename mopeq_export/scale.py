"""Peak memory of each stage as a formula of the model's shape and the settings (docs/SCALE.md).

Each stage computes its estimate from the model skeleton (shapes only, no weights) before loading
anything, says it, and refuses to start when the device cannot hold it, with what to change. The
benchmark `scripts/bench_realsize.py` prints estimate and measurement side by side.

Symbols: P parameters in all, P_e routed-expert parameters, b bytes per compute element (4 float32,
2 bfloat16), L decoder layers, H hidden size, E experts per MoE layer, I expert intermediate size,
k experts per token, V vocabulary, T tokens per calibration batch (batch size x sequence length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .devices import available_bytes, gib
from .errors import MopeqError
from .models.adapters import decoder_stack, find_moe_layers

_TORCH_BASE = 600 << 20  # the interpreter, torch and transformers themselves (measured: 0.55-0.65 GiB RSS)


@dataclass(frozen=True)
class ModelShape:
    params: int
    expert_params: int
    layers: int
    hidden: int
    experts: int
    intermediate: int
    top_k: int
    vocab: int
    largest_layer_params: int  # the biggest decoder layer (experts included)
    outside_params: int = 0  # outside the decoder layers and the output head (embeddings, vision tower, ...)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        layers = find_moe_layers(model)
        _, stack = decoder_stack(model)
        expert = sum(l.num_experts * l.expert_params for l in layers)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(head.weight.shape[0]) if head is not None else 0
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        top_k = int(getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "top_k", 0) or 2)
        first = layers[0]
        inside = {id(p) for p in stack.parameters()} | ({id(p) for p in head.parameters()} if head is not None else set())
        return cls(sum(p.numel() for p in model.parameters()), expert, len(stack), first.hidden_size,
                   first.num_experts, first.intermediate_size, top_k, vocab,
                   max(sum(p.numel() for p in layer.parameters()) for layer in stack),
                   sum(p.numel() for p in model.parameters() if id(p) not in inside))

    def to_json(self) -> dict:
        return asdict(self)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def analyze_bytes(s: ModelShape, dtype: torch.dtype, batch_tokens: int, curvature: str) -> int:
    """weights P*b + saved activations of one probe's forward + one expert parameter's gradient with its
    float32 reduction chunk + the labelled logits (float32, and float64 p, u and A u) + for the exact
    Hessian the first gradients kept with their graph and the probe vector (about 3 P_e b more)."""
    b = _bytes(dtype)
    per_layer = batch_tokens * (12 * s.hidden + s.top_k * (s.hidden + 4 * s.intermediate)) * b
    grad = s.experts * 2 * s.intermediate * s.hidden * b + (256 << 20)
    logits = batch_tokens * s.vocab * (4 + 3 * 8)
    extra = 3 * s.expert_params * b if curvature == "hessian" else 0
    return s.params * b + s.layers * per_layer + grad + logits + extra


def quantize_bytes(s: ModelShape, samples_tokens: int, avg_bits: float, work_bytes: int,
                   learned: bool = False) -> int:
    """one decoder layer in float32 (and one parameter's checkpoint copies while converting) + the modules
    outside the decoder layers in float32 while layer 0's inputs are captured (a VLM's vision tower) + the
    calibration hidden states of every batch (float32, twice while a layer runs) + one MoE layer's routed
    inputs + the GPTQ (or learned rounding) working set + one layer's codes (uint8, then packed) until its
    file is written. Learned rounding on float targets (`learned`) adds the float stream of hidden states
    (twice while a layer runs) and the layer's outputs, delta and target [tokens, hidden] (float32)."""
    layer = s.largest_layer_params * 4 + 2 * s.experts * 2 * s.intermediate * s.hidden * 2
    hidden = 2 * samples_tokens * s.hidden * 4
    routed = samples_tokens * (s.hidden * 4 + s.top_k * 12)
    codes = s.experts * 3 * s.hidden * s.intermediate * (1 + (avg_bits + 0.75) / 8)
    streams = (2 + 3) * samples_tokens * s.hidden * 4 if learned else 0
    return int(layer + s.outside_params * 4 + hidden + routed + work_bytes + codes + streams)


def export_bytes(s: ModelShape, activation_bytes: int, avg_bits: float) -> int:
    """the non-expert weights in the target's dtype (twice: the module and the ONNX initializers while the
    file is written) + the packed experts (once read, once in the graph)."""
    other = (s.params - s.expert_params) * activation_bytes
    packed = s.expert_params * (avg_bits + 0.75) / 8
    return int(2 * other + 2 * packed)


def check_fits(need: int, device: torch.device, what: str, fixes: str) -> None:
    """Refuse a run that cannot fit (host runs count the interpreter's own footprint)."""
    need += _TORCH_BASE if device.type == "cpu" else 0
    have = available_bytes(device)
    if need > have:
        raise MopeqError(f"{what} needs about {gib(need)} on {device} but {gib(have)} is available; {fixes}")
