"""Stage "quantize": every routed expert at its planned width, layer by layer in model order.

GPTQ needs each expert's own inputs. For each MoE layer the calibration set is run up to that layer
(later layers are skipped), with the earlier layers already quantized, so the inputs include the error
those layers introduce. Expert e's ``w1`` is quantized with the Gram matrix of the tokens routed to e;
its ``w2`` with the Gram matrix of the intermediate activations computed through the *quantized* ``w1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..calibration import CalibrationSet, model_inputs
from ..errors import MopeqError
from ..models.adapters import MoELayer, StopForward, forward_until_stopped
from .gptq import GPTQConfig, Gram, gptq
from .primitives import QuantizedMatrix, check_width, rtn


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "gptq"  # "gptq" | "rtn"
    group_size: int = 32
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    # scale each routed token by its routing weight in the Gram matrices (the expert's output is added
    # times that weight); measured on text-moe at 2 bits it did not help (x1.0980 vs x1.0900), so off
    routing_weighted: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ExpertResult:
    name: str
    layer: int
    expert: int
    bits: int
    method: str  # what was actually used: "gptq" or "rtn" (fallback or by choice)
    tokens: int
    w1: QuantizedMatrix
    w2: QuantizedMatrix
    w1_rel_error: float  # ||W - Q||_F / ||W||_F
    w2_rel_error: float
    out_rel_error: float | None  # ||(W1 - Q1) X||_F / ||W1 X||_F on the routed tokens (None without tokens)

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "layer", "expert", "bits", "method", "tokens",
                                           "w1_rel_error", "w2_rel_error", "out_rel_error")}
        return d


def capture_layer_inputs(model, layer: MoELayer, calib: CalibrationSet):
    """Hidden states [N, H] entering the layer's experts, their top-k indices and weights [N, k] (no padding)."""
    hidden, indices, weights, state = [], [], [], {}

    def hook(x, idx, w):
        keep = state["mask"].reshape(-1).bool() if state["mask"] is not None else slice(None)
        hidden.append(x.detach().reshape(-1, x.shape[-1])[keep].float())
        indices.append(idx.detach().reshape(x.shape[0], -1)[keep])
        weights.append(w.detach().reshape(x.shape[0], -1)[keep].float())
        raise StopForward  # nothing after the observed layer needs computing

    handle = layer.register_routing_hook(hook)
    try:
        with torch.no_grad():
            for batch in calib.batches:
                state["mask"] = batch.get("attention_mask")
                forward_until_stopped(model, model_inputs(batch))
    finally:
        handle.remove()
    return torch.cat(hidden), torch.cat(indices), torch.cat(weights)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def quantize_expert(layer: MoELayer, e: int, bits: int, x: torch.Tensor, r: torch.Tensor,
                    cfg: QuantizeConfig) -> ExpertResult:
    """Quantize expert e given the tokens routed to it (x: [n, H], possibly empty) and their routing weights r [n]."""
    w1, w2 = layer.get_w1(e), layer.get_w2(e)
    use_gptq = cfg.method == "gptq" and x.shape[0] >= cfg.gptq.min_tokens
    if use_gptq:
        rw = r[:, None] if cfg.routing_weighted else 1.0
        g1 = Gram(w1.shape[1])
        g1.add(x * rw)
        q1 = gptq(w1, g1, bits, cfg.group_size, cfg.gptq)
        a = x @ q1.dequantize().t()
        i = layer.intermediate_size
        hmid = layer.act(a[:, :i]) * a[:, i:]
        g2 = Gram(w2.shape[1])
        g2.add(hmid * rw)
        q2 = gptq(w2, g2, bits, cfg.group_size, cfg.gptq)
    else:
        q1, q2 = rtn(w1, bits, cfg.group_size), rtn(w2, bits, cfg.group_size)
    out_err = _rel(x @ q1.dequantize().t(), x @ w1.t()) if x.shape[0] else None
    return ExpertResult(layer.expert_name(e), layer.layer, e, bits, "gptq" if use_gptq else "rtn", int(x.shape[0]),
                        q1, q2, _rel(q1.dequantize(), w1), _rel(q2.dequantize(), w2), out_err)


def quantize_layers(model, layers: list[MoELayer], bits: dict[str, int], calib: CalibrationSet | None,
                    cfg: QuantizeConfig, progress=None) -> list[list[ExpertResult]]:
    """Quantize every routed expert; the model's expert weights are replaced by their dequantized values
    as each layer completes (so later layers calibrate on quantized earlier layers)."""
    if cfg.method not in ("gptq", "rtn"):
        raise MopeqError(f"unknown quantization method '{cfg.method}'; use gptq or rtn")
    for b in set(bits.values()):
        check_width(b, cfg.group_size)
    if cfg.method == "gptq" and calib is None:
        raise MopeqError("GPTQ needs calibration data (--calib), or use --method rtn")
    results = []
    for layer in layers:
        if cfg.method == "gptq":
            x, idx, w = capture_layer_inputs(model, layer, calib)
        else:
            x, idx, w = torch.zeros(0, layer.hidden_size), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1)
        done = []
        for e in range(layer.num_experts):
            hit = idx == e
            routed = hit.any(-1)
            r = (w * hit).sum(-1)[routed]
            done.append(quantize_expert(layer, e, bits[layer.expert_name(e)], x[routed], r, cfg))
            if progress is not None:
                progress()
        for r in done:  # after the whole layer: its experts saw the same (unquantized-layer) inputs
            layer.set_weights(r.expert, r.w1.dequantize(), r.w2.dequantize())
        results.append(done)
    return results
