"""Stage "quantize": every routed expert at its planned width, decoder layer by decoder layer.

GPTQ needs each expert's own inputs. The calibration batches go through the decoder layers one at a
time (`models/sequential.py`), each layer after its experts are quantized, so a layer's inputs carry the
error the layers before it introduce. Expert e's ``w1`` is quantized with the Gram matrix of the tokens
routed to e; its ``w2`` with the Gram matrix of the intermediate activations computed through the
*quantized* ``w1``. All GPTQ experts of a layer run as one batched GPTQ (`gptq_batched`), in chunks that
fit `work_bytes`.

Learned rounding (`method="signround"`, signround.py) fits all experts of a layer together to the layer's
output. Its target is the float model's: a second stream of hidden states runs through the float layers beside
the quantized one, and `delta` (float layer output minus this model's with the layer's experts still float)
is what the experts learn to offset besides their own error.

With a `WeightSource` only one decoder layer holds weights at a time (sequential onloading): the stage's
memory is one layer in float32 plus the calibration activations, not the model (docs/SCALE.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from ..calibration import CalibrationSet
from ..devices import heap_reuse
from ..errors import MopeqError
from ..models.adapters import MoELayer, StopForward
from ..models.sequential import SequentialRunner
from .gptq import GPTQConfig, Gram, gptq_batched
from .packing import GROUP_SIZES
from .primitives import QuantizedMatrix, Width, check_width, matrix_widths, rtn
from .signround import SignRoundConfig, in_row_chunks, routed_sum, signround_experts, signround_layer

METHODS = ("gptq", "signround", "rtn")
# calibration samples (text windows of 256 tokens, or VQA samples) when the caller gives none: learned
# rounding fits each layer's output and overfits 32 windows (text-moe, 2 bits: x1.0636 at 32, x1.0482 at 128)
DEFAULT_SAMPLES = {"gptq": 32, "signround": 128, "rtn": 0}
# lm_head's float-logit target (QuantizeConfig.head_float_target) per model kind, chosen by measurement
HEAD_FLOAT_TARGET = {"text": True, "vlm": False}


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "gptq"  # "gptq" | "signround" (learned rounding, signround.py) | "rtn"
    group_size: int = 32
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    signround: SignRoundConfig = field(default_factory=SignRoundConfig)
    # scale each routed token by its routing weight in the Gram matrices (the expert's output is added
    # times that weight); measured on text-moe at 2 bits it did not help (x1.0980 vs x1.0900), so off
    routing_weighted: bool = False
    # calibration windows the dense weights' GPTQ sees (their input Gram matrices; None: all): the GPTQ
    # default, also under learned rounding's 128, where the extra captures were a third of the stage's time
    # on text-moe (measured in docs/RESULTS.md)
    dense_samples: int | None = 32
    # quantize the shared experts (and dense MLPs) before the routed experts' inputs are captured, with the
    # attention, instead of after the routed experts: learned rounding's float targets then carry their
    # error, which the routed experts learn to offset (GPTQ's result is the same either way: the shared
    # expert's inputs do not depend on the routed experts). Measured on text-moe: no gain (KL 0.0868 vs
    # 0.0865, docs/RESULTS.md "Dense weights' quantizers"), so off
    shared_first: bool = False
    # lm_head by GPTQ on the calibration set's final hidden states (after the last decoder layer and the
    # final norm) instead of round-to-nearest with the clipping search: on by measurement (text-moe 2.5-bit
    # build, two seeds: KL 0.0855 / 0.0862 vs 0.0865 / 0.0872 with RTN; docs/RESULTS.md "Dense weights'
    # quantizers"); without calibration data (--method rtn) lm_head stays round-to-nearest
    head_gptq: bool = True
    # the shared experts' and dense MLPs' quantizer: "gptq", or "signround" (learned rounding of the gated
    # MLP's gate/up/down together on its own output over the calibration tokens, signround_experts with one
    # expert; an MLP of another shape, or with biases, stays GPTQ). Measured on text-moe's shared experts at
    # 4 bits: no gain over GPTQ (KL 0.0868 vs 0.0865), so GPTQ
    mlp_method: str = "gptq"
    # with head_gptq and learned rounding's float stream (scope "layer", float_targets): lm_head's GPTQ
    # target is the float model's logits, W x_float, instead of W x on this model's own final hidden states:
    # GPTQ then runs around W* = W A G^-1 (A = sum x_float x^T, G = sum x x^T), the least-squares head that
    # maps this model's hidden states to the float model's logits, so lm_head also offsets the error of the
    # decoder stack. Measured on text-moe's 2.5-bit build, two seeds: perplexity x1.0135 / x1.0114 vs x1.0203 /
    # x1.0198, KL 0.0851 / 0.0858 vs 0.0855 / 0.0862 (docs/RESULTS.md "Seventh session" and "Eighth session").
    # On vlm-moe's 2.5-bit plan it raises the answer KL on three seeds (0.00028 / 0.00028 / 0.00030 vs
    # 0.00025 / 0.00022 / 0.00025), so None, the default, means HEAD_FLOAT_TARGET for the model's kind (on
    # for text, off for vision-language models; resolved by `for_kind` when the stage knows the model).
    # No effect under --method gptq or rtn (no float stream)
    head_float_target: bool | None = None
    # expert-balanced calibration: at each MoE layer, an expert the calibration set routes fewer than
    # `balance_tokens` tokens gets more from a second stream of `balance_samples` spare calibration samples
    # (CalibrationSet.spare_batches), carried through the quantized layers beside the calibration set: its own
    # candidate tokens, up to the shortfall, added as rows routed to it alone (so learned rounding's target there
    # is the float expert's own output). 0: off. Measured with the 2.5-bit plans (docs/RESULTS.md "Tenth session:
    # expert-balanced calibration"): vlm-moe answer KL 0.000232 vs 0.000264 over six seeds, mostly one seed's
    # outlier; text-moe a tie. Within noise, so off
    balance_tokens: int = 0
    balance_samples: int = 64

    def to_json(self) -> dict:
        return asdict(self)

    def for_kind(self, is_vlm: bool) -> "QuantizeConfig":
        """This config with the model-kind defaults filled in (head_float_target None -> HEAD_FLOAT_TARGET)."""
        if self.head_float_target is not None:
            return self
        return replace(self, head_float_target=HEAD_FLOAT_TARGET["vlm" if is_vlm else "text"])

    @property
    def uses_calibration(self) -> bool:
        """GPTQ and learned rounding both work on the calibration activations; RTN needs none (the dense
        weights are GPTQ-quantized under either calibrated method)."""
        return self.method in ("gptq", "signround")


@dataclass
class ExpertResult:
    name: str
    layer: int
    expert: int
    bits: Width  # a pair only from a per-matrix study (primitives.Width); the stage packs integers
    method: str  # what was actually used: "gptq", "signround" or "rtn" (fallback or by choice)
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

    def cpu(self) -> "ExpertResult":
        """The packed matrices on the CPU (where they are written from); the device copies can go."""
        self.w1, self.w2 = self.w1.cpu(), self.w2.cpu()
        return self


def results_summary(results: list[ExpertResult]) -> list[dict]:
    return [r.summary() for r in results]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@dataclass
class Routed:
    """The tokens of the calibration set that entered one MoE layer (padding dropped). An index of -1 is a slot
    that routes nowhere here (`balance_routed`'s rows carry one expert; learned rounding's chunks, experts outside
    the chunk)."""

    x: torch.Tensor  # [N, H] float32
    idx: torch.Tensor  # [N, k]
    w: torch.Tensor  # [N, k] float32

    def counts(self, num_experts: int) -> list[int]:
        """Routed tokens per expert (the -1 slots not counted)."""
        slots = self.idx[self.idx >= 0]
        return torch.bincount(slots, minlength=num_experts)[:num_experts].tolist()

    def of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's inputs [n, H] and the routing weights they were sent with [n]."""
        hit = self.idx == e
        routed = hit.any(-1)
        return self.x[routed], (self.w * hit).sum(-1)[routed]

    @classmethod
    def empty(cls, hidden: int, device) -> "Routed":
        return cls(torch.zeros(0, hidden, device=device), torch.zeros(0, 1, dtype=torch.long, device=device),
                   torch.zeros(0, 1, device=device))


def balance_routed(routed: Routed, extra: Routed, num_experts: int, target: int) -> tuple[Routed, int]:
    """`routed` plus, for every expert with fewer than `target` routed tokens, up to the shortfall of the tokens
    `extra` routes to it (the first ones, in the candidate stream's order), each as a row routed to that expert
    alone (its other slots -1, weight 0). Returns the set and the number of rows added."""
    counts, k = routed.counts(num_experts), routed.idx.shape[1]
    xs, idxs, ws = [routed.x], [routed.idx], [routed.w]
    added = 0
    for e in range(num_experts):
        short = target - counts[e]
        if short <= 0:
            continue
        hit = extra.idx == e
        rows = hit.any(-1).nonzero().flatten()[:short]
        if not rows.numel():
            continue
        idx = torch.full((rows.numel(), k), -1, dtype=routed.idx.dtype, device=routed.idx.device)
        idx[:, 0] = e
        w = torch.zeros(rows.numel(), k, dtype=routed.w.dtype, device=routed.w.device)
        w[:, 0] = (extra.w * hit).sum(-1)[rows].to(w.dtype)
        xs.append(extra.x[rows].to(routed.x.device))
        idxs.append(idx)
        ws.append(w)
        added += int(rows.numel())
    if not added:
        return routed, 0
    return Routed(torch.cat(xs), torch.cat(idxs), torch.cat(ws)), added


def kept_rows(mask, device):
    """Index of the non-padding rows of a flattened batch (every row without an attention mask)."""
    return mask.reshape(-1).bool().to(device) if mask is not None else slice(None)


def capture_routed(runner: SequentialRunner, i: int, decoder_layer, layer: MoELayer,
                   outputs: bool = False) -> Routed | tuple[Routed, torch.Tensor]:
    """Run decoder layer i up to its experts on every batch and keep what they receive. With `outputs` the
    layer runs to its end and its outputs [N, H] (the same tokens, padding dropped) come back too."""
    hidden, indices, weights, state = [], [], [], {}

    def hook(x, idx, w):
        keep = kept_rows(state["mask"], x.device)
        hidden.append(x.detach().reshape(-1, x.shape[-1])[keep].float())
        indices.append(idx.detach().reshape(x.shape[0], -1)[keep])
        weights.append(w.detach().reshape(x.shape[0], -1)[keep].float())
        if not outputs:
            raise StopForward  # nothing after the experts' input is needed

    handle = layer.register_routing_hook(hook)
    on_batch = lambda b: state.update(mask=runner.batches[b].get("attention_mask"))  # noqa: E731
    try:
        if outputs:
            outs = runner.outputs(i, decoder_layer, on_batch=on_batch)
        else:
            runner.run(i, decoder_layer, stop_ok=True, on_batch=on_batch)
    finally:
        handle.remove()
    routed = Routed(torch.cat(hidden), torch.cat(indices), torch.cat(weights))
    if not outputs:
        return routed
    return routed, flat_outputs(runner, outs)


def flat_outputs(runner: SequentialRunner, outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch layer outputs [b, s, H] -> [N, H] float32 with the padding dropped (capture_routed's order)."""
    rows = []
    for b, o in enumerate(outs):
        rows.append(o.reshape(-1, o.shape[-1])[kept_rows(runner.batches[b].get("attention_mask"), o.device)].float())
    return torch.cat(rows)


def _chunks(items: list[int], per_item_bytes: int, work_bytes: int) -> list[list[int]]:
    n = max(1, work_bytes // max(per_item_bytes, 1))
    return [items[j:j + n] for j in range(0, len(items), n)]


def _gram(x: torch.Tensor) -> torch.Tensor:
    g = Gram(x.shape[1], x.device)
    g.add(x)
    return (g.xtx / max(g.n, 1)).float()


def _gptq_many(mats: list[torch.Tensor], grams: list[torch.Tensor], bits: list[int], cfg: QuantizeConfig) -> list[QuantizedMatrix]:
    codes, scales, zeros = gptq_batched(torch.stack(mats), torch.stack(grams), torch.tensor(bits), cfg.group_size,
                                        cfg.gptq)
    return [QuantizedMatrix(b, cfg.group_size, c, s, z) for b, c, s, z in zip(bits, codes, scales, zeros)]


def quantize_layer(layer: MoELayer, routed: Routed, bits: list[Width], cfg: QuantizeConfig,
                   work_bytes: int = 1 << 30, progress: Callable[[], None] | None = None,
                   delta: torch.Tensor | None = None) -> list[ExpertResult]:
    """Every expert of one MoE layer: batched GPTQ for those with at least `min_tokens` routed tokens, RTN
    (with the clipping search) for the others and for `--method rtn`. An expert's routed inputs are taken
    out of the layer's only while its chunk is worked on (with top-k routing they are k times the layer's)."""
    counts = routed.counts(layer.num_experts)
    use_gptq = [cfg.method == "gptq" and counts[e] >= cfg.gptq.min_tokens for e in range(layer.num_experts)]
    use_sr = [cfg.method == "signround" and cfg.signround.scope == "expert" and counts[e] >= cfg.gptq.min_tokens
              for e in range(layer.num_experts)]
    h, i2 = layer.hidden_size, 2 * layer.intermediate_size
    # per expert in one batched GPTQ: float32 weights, Gram, their permuted copies, the Cholesky factors and
    # working copies: about 14 matrices of the larger of w1 (2I x H) and its Gram (H x H), measured
    per_bytes = 4 * 14 * max(i2 * h, h * h)
    weighted = lambda x, r: x * r[:, None] if cfg.routing_weighted else x  # noqa: E731
    results: dict[int, ExpertResult] = {}

    def finish(e, x, q1, q2, method):
        w1, w2 = layer.get_w1(e), layer.get_w2(e)
        out_err = _rel(x @ q1.dequantize().t(), x @ w1.t()) if x.shape[0] else None
        results[e] = ExpertResult(layer.expert_name(e), layer.layer, e, bits[e], method, int(x.shape[0]), q1, q2,
                                  _rel(q1.dequantize(), w1), _rel(q2.dequantize(), w2), out_err)
        if progress is not None:
            progress()

    for chunk in _chunks([e for e in range(layer.num_experts) if use_gptq[e]], per_bytes, work_bytes):
        inputs = [routed.of(e) for e in chunk]
        first = _gptq_many([layer.get_w1(e) for e in chunk], [_gram(weighted(x, r)) for x, r in inputs],
                           [matrix_widths(bits[e])[0] for e in chunk], cfg)
        grams2 = []
        for (x, r), q in zip(inputs, first):
            a = x @ q.dequantize().t()
            mid = layer.act(a[:, :layer.intermediate_size]) * a[:, layer.intermediate_size:]
            grams2.append(_gram(weighted(mid, r)))
        second = _gptq_many([layer.get_w2(e) for e in chunk], grams2, [matrix_widths(bits[e])[1] for e in chunk], cfg)
        for e, (x, _), q1, q2 in zip(chunk, inputs, first, second):
            finish(e, x, q1, q2, "gptq")
        del inputs, grams2
    for chunk in _chunks([e for e in range(layer.num_experts) if use_sr[e]], _signround_bytes(layer, cfg),
                         work_bytes):
        xs, rs = zip(*[routed.of(e) for e in chunk])
        done = signround_experts(torch.stack([layer.get_w1(e) for e in chunk]),
                                 torch.stack([layer.get_w2(e) for e in chunk]), list(xs), [bits[e] for e in chunk],
                                 cfg.group_size, layer.act, cfg.signround, list(rs))
        for e, x, (q1, q2, _, _) in zip(chunk, xs, done):
            finish(e, x, q1, q2, "signround")
        del xs, rs, done
    if cfg.method == "signround" and cfg.signround.scope == "layer" and routed.x.shape[0]:
        _signround_layer(layer, routed, bits, cfg, work_bytes, delta, finish)
    for e in range(layer.num_experts):
        if e not in results:
            x = routed.of(e)[0]
            b1, b2 = matrix_widths(bits[e])
            finish(e, x, rtn(layer.get_w1(e), b1, cfg.group_size), rtn(layer.get_w2(e), b2, cfg.group_size), "rtn")
    return [results[e] for e in range(layer.num_experts)]


def _signround_bytes(layer: MoELayer, cfg: QuantizeConfig) -> int:
    """Working memory of one expert in a learned-rounding chunk (either scope): float32 weights, rounding
    offsets, their gradients and about 9 autograd temporaries of both matrices (12 copies of w1 and w2),
    plus its share of a step's activations (about 8 of w1's and w2's outputs per minibatch token)."""
    h, inter = layer.hidden_size, layer.intermediate_size
    return 4 * 12 * (3 * inter * h) + 4 * 8 * cfg.signround.batch_tokens * (2 * inter + h)


def _signround_layer(layer: MoELayer, routed: Routed, bits: list[Width], cfg: QuantizeConfig, work_bytes: int,
                     delta: torch.Tensor | None, finish) -> None:
    """Learned rounding on the layer's output, in chunks of experts that fit `work_bytes`. Chunks go one after
    the other: the change the quantized experts of the chunks before made to the layer's output is added to
    the target of the next (delta -= their change), so later chunks also offset earlier ones' error."""
    e_all = layer.num_experts
    h = layer.hidden_size
    chunks = _chunks(list(range(e_all)), _signround_bytes(layer, cfg), work_bytes)
    x, idx, rw = routed.x, routed.idx, routed.w
    for chunk in chunks:
        lut = torch.full((e_all + 1,), -1, dtype=torch.long, device=idx.device)
        lut[torch.tensor(chunk, device=idx.device)] = torch.arange(len(chunk), device=idx.device)
        local = lut[idx]
        sel = (local >= 0).any(-1)
        w1 = torch.stack([layer.get_w1(e) for e in chunk])
        w2 = torch.stack([layer.get_w2(e) for e in chunk])
        d = None if delta is None else delta[sel]
        if d is None and len(chunks) > 1:
            d = torch.zeros(int(sel.sum()), h, device=x.device)
        mats, _ = signround_layer(w1, w2, x[sel], local[sel], rw[sel], d, [bits[e] for e in chunk], cfg.group_size,
                                  layer.act, cfg.signround)
        for e, (q1, q2) in zip(chunk, mats):
            finish(e, routed.of(e)[0], q1, q2, "signround")
        if len(chunks) > 1:  # the next chunks' target: what this chunk's quantized experts changed
            q1 = torch.stack([a.dequantize() for a, _ in mats]).to(w1.device)
            q2 = torch.stack([b.dequantize() for _, b in mats]).to(w1.device)
            xs, ls, rs = x[sel], local[sel], rw[sel]
            with torch.no_grad():
                change = in_row_chunks(xs.shape[0], xs.device,
                                    lambda r: routed_sum(xs[r], ls[r], rs[r], q1, q2, layer.act)
                                    - routed_sum(xs[r], ls[r], rs[r], w1.float(), w2.float(), layer.act))
            if delta is None:
                delta = torch.zeros_like(x)
            delta = delta.clone()
            delta[sel] -= change
        del w1, w2, mats


def check_config(bits: dict[str, Width], calib: CalibrationSet | None, cfg: QuantizeConfig) -> None:
    if cfg.method not in METHODS:
        raise MopeqError(f"unknown quantization method '{cfg.method}'; use one of {', '.join(METHODS)}")
    if cfg.group_size not in GROUP_SIZES:
        raise MopeqError(f"--group-size {cfg.group_size} is not offered; the quantizer uses one of "
                         f"{', '.join(map(str, GROUP_SIZES))} (docs/FORMAT.md)")
    for b in {w for v in bits.values() for w in matrix_widths(v)}:
        check_width(b, cfg.group_size)
    if cfg.mlp_method not in ("gptq", "signround"):
        raise MopeqError(f"unknown shared-expert / dense-MLP quantizer '{cfg.mlp_method}'; use gptq or signround")
    sr = cfg.signround
    if cfg.method == "signround" and (sr.iters < 0 or sr.batch_tokens < 1 or sr.scope not in ("layer", "expert")):
        raise MopeqError(f"signround needs --iters >= 0, batch_tokens >= 1 and scope layer or expert (got "
                         f"{sr.iters}, {sr.batch_tokens}, {sr.scope!r})")
    if cfg.uses_calibration and calib is None:
        raise MopeqError(f"--method {cfg.method} needs calibration data (--calib), or use --method rtn")
    if cfg.balance_tokens < 0 or (cfg.balance_tokens and cfg.balance_samples < 1):
        raise MopeqError(f"expert-balanced calibration needs balance_tokens >= 0 and balance_samples >= 1 (got "
                         f"{cfg.balance_tokens}, {cfg.balance_samples})")


LayerDone = Callable[[int, torch.nn.Module], None]  # (decoder layer index, the loaded layer) after its turn
ExpertsDone = Callable[[MoELayer, list[ExpertResult]], None]


def quantize_sequential(runner: SequentialRunner, layers: list[MoELayer], bits: dict[str, Width], cfg: QuantizeConfig,
                        progress=None, work_bytes: int = 1 << 30, after_layer: LayerDone | None = None,
                        on_experts: ExpertsDone | None = None, before_layer: LayerDone | None = None,
                        after_experts: LayerDone | None = None, final_pass: bool = False,
                        candidates: SequentialRunner | None = None) -> list[list[ExpertResult]]:
    """Walk the decoder layers: capture what each MoE layer's experts receive, quantize them, write their
    dequantized weights back, and run the layer to produce the next one's inputs. `after_layer` sees each
    layer while its weights are loaded. Dense-layer quantization: `before_layer` sees each layer before its
    experts' inputs are captured (attention, so the experts calibrate on the quantized attention's output),
    `after_experts` after its experts are written back and before it produces the next layer's inputs
    (shared experts, dense MLPs). With `on_experts` each layer's
    results go there as soon as they exist (the stage packs and writes them) and are not kept. With
    `final_pass` the last layer also runs, so `runner.hidden` ends as the decoder stack's output. With
    `candidates` (a runner over spare calibration samples, given when `cfg.balance_tokens` asks), each MoE layer's
    under-routed experts get candidate tokens too (`balance_routed`); the candidates advance through every
    quantized layer as the calibration set does."""
    by_index = {}
    for layer in layers:
        prefix = layer.block_path[len(runner.stack_path) + 1:].split(".")[0]
        by_index[int(prefix)] = layer
    results: list[list[ExpertResult]] = []
    layer_scope = cfg.method == "signround" and cfg.signround.scope == "layer"
    # learned rounding on float targets: a second stream of hidden states through the float layers
    float_hidden = list(runner.hidden) if layer_scope and cfg.signround.float_targets and runner.batches else None
    for i in range(len(runner.stack)):
        with runner.loaded(i) as decoder_layer:
            float_out = runner.outputs(i, decoder_layer, float_hidden) if float_hidden is not None else None
            if before_layer is not None:
                before_layer(i, decoder_layer)
            moe = by_index.get(i)
            if moe is not None:
                delta = None
                if not cfg.uses_calibration:
                    routed = Routed.empty(moe.hidden_size, runner.device)
                elif layer_scope and float_out is not None:
                    routed, out_q = capture_routed(runner, i, decoder_layer, moe, outputs=True)
                    delta = flat_outputs(runner, float_out) - out_q
                    del out_q
                else:
                    routed = capture_routed(runner, i, decoder_layer, moe)
                if candidates is not None:
                    extra = capture_routed(candidates, i, decoder_layer, moe)
                    routed, added = balance_routed(routed, extra, moe.num_experts, cfg.balance_tokens)
                    if delta is not None and added:  # their target: the float experts' own output
                        delta = torch.cat([delta, delta.new_zeros(added, delta.shape[1])])
                    del extra
                with heap_reuse():
                    done = quantize_layer(moe, routed, [bits[n] for n in moe.expert_names], cfg, work_bytes,
                                          progress, delta)
                del delta
                for r in done:  # after the whole layer: its experts saw the same (unquantized-layer) inputs
                    moe.set_weights(r.expert, r.w1.dequantize(), r.w2.dequantize())
                done = [r.cpu() for r in done]
                if on_experts is not None:
                    on_experts(moe, done)
                else:
                    results.append(done)
                del routed, done
            if after_experts is not None:
                after_experts(i, decoder_layer)
            if cfg.uses_calibration and (i + 1 < len(runner.stack) or final_pass):
                runner.run(i, decoder_layer)
                if candidates is not None and i + 1 < len(runner.stack):
                    candidates.run(i, decoder_layer)
                if float_out is not None and (i + 1 < len(runner.stack) or cfg.head_float_target):
                    float_hidden = runner.chain(i, float_out)
            del float_out
            if after_layer is not None:
                after_layer(i, decoder_layer)
    if final_pass and cfg.head_float_target:
        runner.float_hidden = float_hidden  # the float stack's output, lm_head's float target
    return results


def quantize_layers(model, layers: list[MoELayer], bits: dict[str, Width], calib: CalibrationSet | None,
                    cfg: QuantizeConfig, progress=None) -> list[list[ExpertResult]]:
    """Quantize every routed expert of a model already in memory (its expert weights are replaced by their
    dequantized values as each layer completes, so later layers calibrate on quantized earlier layers). A
    width may be a pair (w1's, w2's): per-matrix widths, for studies only (primitives.Width)."""
    check_config(bits, calib, cfg)
    device = next(model.parameters()).device
    runner = SequentialRunner(model, calib.batches if cfg.uses_calibration else [], device)
    spare = calib.spare_batches(cfg.balance_samples) if cfg.balance_tokens and cfg.uses_calibration else []
    candidates = SequentialRunner(model, spare, device) if spare else None
    return quantize_sequential(runner, layers, bits, cfg, progress, candidates=candidates)
