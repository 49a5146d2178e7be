"""Stage "analyze": per-expert sensitivity statistics that the bit allocator ("plan") consumes.

For every routed expert e (its w1 and w2 seen as one parameter block):

- ``hessian_trace``: a Hutchinson (Rademacher-probe) estimate of Tr(H_e), the curvature of the task
  loss (mean next-token cross-entropy over the tokens that carry a label; for VQA only the answer
  tokens do) in the expert's weights. Two curvatures (``EstimatorConfig.curvature``):

  * ``gauss-newton`` (default): the Gauss-Newton part of the Hessian, G = J^T H_z J with J the
    Jacobian of the labelled logits z and H_z = (diag(p) - p p^T) / N the cross-entropy Hessian in
    the logits (for softmax cross-entropy this is also the Fisher information). With the factor
    A = diag(sqrt p) - p sqrt(p)^T (A A^T = diag(p) - p p^T) and a Rademacher u in logit space,
    Tr(G_e) = E_u ||g_e||^2 where g = J^T A u / sqrt(N) is ONE vector-Jacobian product (a backward
    pass) for every expert at once. A gradient splits exactly by parameter block, so there is no
    cross-expert noise, and a squared norm is never negative: an expert's estimate is > 0 once one
    of its tokens reaches a labelled prediction.
  * ``hessian``: the exact Hessian, Tr(H_e) = E_v[v_e^T (H v)_e] for Rademacher v over all expert
    weights; ONE Hessian-vector product (double backward) per probe serves every expert, the
    off-diagonal blocks adding zero-mean noise. This is the paper's estimator; on trained models it
    is far noisier per probe, and an expert's true Hessian trace can be negative (docs/DECISIONS.md).

  Probes cycle through the calibration batches; the per-batch means are combined with the batches'
  shares of labelled tokens (``StratifiedMean``), and the standard error is that of the probes for
  this calibration set (what a different seed changes).
- routing statistics (sums and counts, one no-grad pass): ``tokens`` = (token, slot) assignments,
  ``routing_weight`` = sum of the router weights it received, ``layer_tokens`` = tokens its layer saw.
- ``quant_error``: squared Frobenius RTN error at each candidate width (group size recorded).
- ``weight_norm_trace``: the data-free signal of the MoPEQ authors' code, Tr of the Hessian of
  ||W_e||_F, computed in its closed form (n-1)/||W_e||.

An expert that received no calibration token has an exactly zero loss Hessian (its weights do not
enter the loss). Before giving up on it, ``cover_experts`` scans the calibration samples that were not
chosen for windows that do route to it and adds them; an expert still unreached is flagged
``no_tokens`` instead of being passed off as a measured 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .calibration import CalibrationInfo, CalibrationSet, labelled_predictions, model_inputs, to_device
from .errors import MopeqError
from .models.adapters import MoELayer, StopForward, find_moe_layers, forward_until_stopped
from .models.loading import ModelInfo
from .quantization.primitives import check_width, rtn

SCHEMA_VERSION = 2  # 2: curvature choice (Gauss-Newton default), coverage samples
CURVATURES = ("gauss-newton", "hessian")
# calibration the stage reads when the user does not say: kind -> (samples, samples per probe)
DATA_DEFAULTS = {"text": (64, 8), "vqa": (256, 32)}
TEXT_SEQ_LEN = 128
ProbeCallback = Callable[[int, float], None]  # (probes done, worst relative stderr so far)


# -- records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EstimatorConfig:
    """Settings of the Hutchinson estimator and of the per-width quantization errors."""

    seed: int = 0
    curvature: str = "gauss-newton"  # one of CURVATURES
    max_probes: int = 32
    min_probes: int = 8
    rel_tol: float = 0.15  # stop once every expert's stderr / |trace| is below this
    batch_size: int = 8  # calibration samples per probe
    cover: bool = True  # add spare calibration samples for experts the chosen ones never reach
    group_size: int = 32
    bits: tuple[int, ...] = (2, 3, 4)
    version: int = 2

    def __post_init__(self):
        if self.max_probes < 1 or not 1 <= self.min_probes:
            raise MopeqError("--probes must be >= 1")
        if not self.rel_tol > 0:
            raise MopeqError("--rel-tol must be > 0")
        if self.curvature not in CURVATURES:
            raise MopeqError(f"unknown --curvature {self.curvature!r}; choose one of {', '.join(CURVATURES)}")
        for b in self.bits:
            check_width(b, self.group_size)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "EstimatorConfig":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["bits"] = tuple(kw.get("bits", cls.bits))
        return cls(**kw)


@dataclass(frozen=True)
class ExpertSensitivity:
    name: str
    layer: int
    expert: int
    params: int
    hessian_trace: float
    hessian_trace_stderr: float | None  # None: unknown (a single probe gives no spread)
    tokens: int  # (token, slot) assignments over the calibration set
    layer_tokens: int  # tokens the expert's layer saw (padding excluded)
    frequency: float  # tokens / layer_tokens (sums to top-k over a layer)
    routing_weight: float  # sum of router weights over its assignments
    no_tokens: bool  # True: never routed, trace is an exact 0, not a measurement
    quant_error: dict[int, float]  # bits -> ||W - Q_b(W)||_F^2 (w1 and w2 together)
    weight_norm_trace: float  # data-free signal: Tr Hessian of ||W||_F

    def to_json(self) -> dict:
        d = asdict(self)
        d["quant_error"] = {str(b): e for b, e in self.quant_error.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ExpertSensitivity":
        kw = {k: d[k] for k in cls.__dataclass_fields__}
        kw["quant_error"] = {int(b): float(e) for b, e in d["quant_error"].items()}
        return cls(**kw)


@dataclass(frozen=True)
class SensitivityReport:
    model: ModelInfo
    calibration: CalibrationInfo
    estimator: EstimatorConfig
    probes: int
    converged: bool  # every expert met rel_tol before max_probes
    seconds: float
    experts: tuple[ExpertSensitivity, ...]
    resources: dict | None = None  # devices.Resources of the run that made it
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "kind": "mopeq.sensitivity",
                "model": self.model.to_json(), "calibration": self.calibration.to_json(),
                "estimator": self.estimator.to_json(), "probes": self.probes, "converged": self.converged,
                "seconds": self.seconds, "resources": self.resources, "experts": [e.to_json() for e in self.experts]}

    @classmethod
    def from_json(cls, d: dict, source: str = "sensitivity file") -> "SensitivityReport":
        if not isinstance(d, dict) or d.get("kind") != "mopeq.sensitivity":
            raise MopeqError(f"{source} is not a sensitivity record (no kind=mopeq.sensitivity); run `mopeq-export analyze`")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise MopeqError(f"{source} has schema version {d.get('schema_version')}, this tool reads "
                             f"{SCHEMA_VERSION}; rerun `mopeq-export analyze`")
        try:
            experts = tuple(ExpertSensitivity.from_json(e) for e in d["experts"])
            report = cls(ModelInfo.from_json(d["model"]), CalibrationInfo.from_json(d["calibration"]),
                         EstimatorConfig.from_json(d["estimator"]), int(d["probes"]), bool(d["converged"]),
                         float(d["seconds"]), experts, d.get("resources"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MopeqError(f"{source} is malformed ({type(e).__name__}: {e}); rerun `mopeq-export analyze`") from None
        if not experts:
            raise MopeqError(f"{source} lists no experts; rerun `mopeq-export analyze`")
        return report


# -- per-expert reduction of parameter-shaped tensors ---------------------------------------------
_CHUNK_ELEMENTS = 1 << 22  # a reduction's float32/float64 transients stay under about 64 MB


Reduction = Callable[[int, int, torch.Tensor], torch.Tensor]  # (param index, first expert, float32 chunk)


def _expert_sums(t: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum of fn(start, t[start:stop]) per leading index, in float64, a few experts at a time (bounded
    float32 transients)."""
    per = max(1, _CHUNK_ELEMENTS // max(t[0].numel(), 1))
    return torch.cat([fn(i, t[i:i + per].float()).double().flatten(1).sum(1) for i in range(0, t.shape[0], per)])


@dataclass(frozen=True)
class ExpertSlots:
    """Where each routed expert lives among the Hessian parameters, and its flat index."""

    params: tuple[nn.Parameter, ...]
    slots: tuple[int, ...]  # fused param: first index of its E experts; ModuleList param: the expert's index
    fused: tuple[bool, ...]
    count: int

    def reduce(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-expert sums [count] (float64) of parameter-shaped tensors."""
        dev = tensors[0].device if tensors else "cpu"
        out = torch.zeros(self.count, dtype=torch.float64, device=dev)
        for t, slot, fused in zip(tensors, self.slots, self.fused):
            if fused:
                out[slot:slot + t.shape[0]] += _expert_sums(t, lambda _i, x: x)
            else:
                out[slot] += t.double().sum()
        return out

    @contextlib.contextmanager
    def reducing(self, fn: Reduction) -> Iterator[torch.Tensor]:
        """Within the block, every gradient a backward pass accumulates into an expert parameter is reduced
        at once to per-expert sums of fn(param index, first expert, grad chunk), added to the yielded
        [count] float64 tensor, and freed: no full-size gradient of the model exists, one parameter's at a
        time (a ModuleList expert's chunk is its whole gradient, first expert 0)."""
        from .devices import trim_host_heap

        acc = torch.zeros(self.count, dtype=torch.float64, device=self.params[0].device)
        on_cpu = acc.device.type == "cpu"
        handles = []
        for k, (p, slot, fused) in enumerate(zip(self.params, self.slots, self.fused)):
            def hook(param, k=k, slot=slot, fused=fused):
                g = param.grad
                param.grad = None
                if fused:
                    acc[slot:slot + g.shape[0]] += _expert_sums(g, lambda i, x: fn(k, i, x))
                    del g
                    if on_cpu:
                        trim_host_heap()  # a fused parameter's gradient was a layer's worth of memory
                else:
                    acc[slot] += fn(k, 0, g.float()).double().sum()
            handles.append(p.register_post_accumulate_grad_hook(hook))
        try:
            yield acc
        finally:
            for h in handles:
                h.remove()


def expert_slots(layers: Sequence[MoELayer]) -> ExpertSlots:
    params, slots, fused, offset = [], [], [], 0
    for layer in layers:
        for p, e in layer.hessian_params():
            params.append(p)
            slots.append(offset if e is None else offset + e)
            fused.append(e is None)
        offset += layer.num_experts
    return ExpertSlots(tuple(params), tuple(slots), tuple(fused), offset)


# -- Hutchinson -----------------------------------------------------------------------------------
def rademacher(like: Iterable[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """+-1 tensors shaped like `like`, drawn from a CPU generator (the same probes on every device)."""
    return [(torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1).to(p.device) for p in like]


def hutchinson_probe(loss: torch.Tensor, slots: ExpertSlots, gen: torch.Generator) -> torch.Tensor:
    """Per-expert sums of v * (H v) for one Rademacher v over all expert weights: exactly one
    Hessian-vector product (the double backward), reduced per parameter as its gradient arrives."""
    params = slots.params
    v = rademacher(params, gen)
    # allow_unused: a ModuleList expert that got no token is not in the graph (its Hessian block is 0)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(g, vi, p) for g, vi, p in zip(grads, v, params) if g is not None and g.requires_grad]
    if not used:
        return torch.zeros(slots.count, dtype=torch.float64, device=params[0].device)
    dot = sum((g * vi).sum() for g, vi, _ in used)
    del grads, used[:]
    mine = lambda k, i, x: v[k][i:i + x.shape[0]].float() * x if slots.fused[k] else v[k].float() * x  # noqa: E731
    with slots.reducing(mine) as acc:
        torch.autograd.backward(dot)
    return acc


def softmax_hessian_factor(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A u per row, A = diag(sqrt p) - p sqrt(p)^T, so that A A^T = diag(p) - p p^T (rows of p sum to 1)."""
    sp = p.sqrt()
    return sp * u - p * (sp * u).sum(-1, keepdim=True)


def gauss_newton_probe(logits: torch.Tensor, slots: ExpertSlots, gen: torch.Generator) -> torch.Tensor:
    """Per-expert sums of g * g, g = J^T A u / sqrt(N) for one Rademacher u over the N labelled logit rows.

    E_u of a block's sum of g * g is Tr(J_e^T H_z J_e), the Gauss-Newton trace of the mean
    cross-entropy in that block: one vector-Jacobian product (a backward pass) for every expert, each
    parameter's gradient squared and summed per expert as soon as it exists (`ExpertSlots.reducing`).
    """
    p = logits.detach().double().softmax(-1)
    u = rademacher([p], gen)[0]
    w = (softmax_hessian_factor(p, u) / math.sqrt(logits.shape[0])).to(logits.dtype)
    del p, u
    with slots.reducing(lambda _k, _i, x: x * x) as acc:
        torch.autograd.backward(logits, grad_tensors=w)
    return acc


class StratifiedMean:
    """Per-expert means and standard errors of probe estimates over calibration batches (strata).

    Batch b holds the share w_b of the labelled tokens, so the whole set's trace is sum_b w_b T_b with
    T_b the trace for batch b's mean loss. Each T_b is estimated by the mean of that batch's probes;
    a batch not yet probed is left out and the weights renormalized. The standard error is the
    stratified one, sqrt(sum_b w_b^2 var_b / n_b): the calibration set is fixed and only the probes
    are random (what a different seed changes). Until every probed batch has two probes it falls back
    to the spread of the weighted single-probe estimates (w_b * B * x, B batches), which also counts the
    differences between batches and so is larger.
    """

    def __init__(self, weights: Sequence[float], n: int):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.w = self.w / self.w.sum()
        b = len(weights)
        self.n = torch.zeros(b, dtype=torch.long)
        self.sum, self.sumsq = torch.zeros(b, n, dtype=torch.float64), torch.zeros(b, n, dtype=torch.float64)
        self.pooled_sum, self.pooled_sumsq = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    def add(self, batch: int, x: torch.Tensor) -> None:
        x = x.double()
        self.n[batch] += 1
        self.sum[batch] += x
        self.sumsq[batch] += x * x
        y = x * self.w[batch] * len(self.w)
        self.pooled_sum += y
        self.pooled_sumsq += y * y

    @property
    def count(self) -> int:
        return int(self.n.sum())

    @property
    def all_seen(self) -> bool:
        return bool((self.n > 0).all())

    @property
    def mean(self) -> torch.Tensor:
        seen = self.n > 0
        if not bool(seen.any()):
            return torch.zeros(self.sum.shape[1], dtype=torch.float64)
        w = self.w[seen] / self.w[seen].sum()
        return (w[:, None] * self.sum[seen] / self.n[seen, None]).sum(0)

    @property
    def stderr(self) -> torch.Tensor:
        seen = self.n > 0
        k = self.count
        if k < 2:
            return torch.full_like(self.pooled_sum, math.inf)
        if bool((self.n[seen] >= 2).all()):
            n = self.n[seen, None].double()
            means = self.sum[seen] / n
            var = ((self.sumsq[seen] - n * means ** 2).clamp_min(0) / (n - 1))
            w = self.w[seen] / self.w[seen].sum()
            return ((w[:, None] ** 2) * var / n).sum(0).sqrt()
        mean = self.pooled_sum / k
        return ((self.pooled_sumsq - k * mean ** 2).clamp_min(0) / (k - 1) / k).sqrt()

    def worst_rel(self, active: torch.Tensor) -> float:
        """Largest stderr/|mean| among `active` experts; an active expert still at 0 counts as infinite."""
        if not bool(active.any()):
            return 0.0
        mean, err = self.mean[active].abs(), self.stderr[active]
        rel = torch.where(mean > 0, err / mean.clamp_min(1e-300), torch.full_like(mean, math.inf))
        return float(rel.max())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] (float32) predicting the N labelled tokens, and those labels [N]."""
    dev = model_device(model)
    logits = model(**to_device(model_inputs(batch), dev), use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(dev)
    keep = labelled_predictions(batch).to(dev)
    if not bool(keep.any()):
        raise MopeqError("a calibration batch has no labelled token; the loss (and its Hessian) would be empty")
    return logits[keep].float(), labels[keep]


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, from logits (never a model's aux losses)."""
    logits, labels = labelled_logits(model, batch)
    return nn.functional.cross_entropy(logits, labels)


class _ExpertGrad:
    """Only the routed experts need gradients: freezing the rest keeps the double backward small."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        self.model, self.params = model, params

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)


def curvature_probe(model: nn.Module, slots: ExpertSlots, batch: dict, curvature: str,
                    gen: torch.Generator) -> torch.Tensor:
    """One probe's per-expert estimates [experts]: one forward and one backward (double for "hessian")."""
    if curvature == "hessian":
        return hutchinson_probe(task_loss(model, batch), slots, gen).cpu()
    logits, _ = labelled_logits(model, batch)
    return gauss_newton_probe(logits, slots, gen).cpu()


@contextlib.contextmanager
def recomputed(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block each decoder layer keeps only its input for the backward and recomputes the rest
    (torch.utils.checkpoint, non-reentrant: parameter-gradient hooks still fire). The saved activations of
    a probe shrink from all layers' to one layer's; the price is one more forward per probe. The numbers
    are the same: the recomputation repeats the forward exactly."""
    if not on:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    from .models.adapters import decoder_stack

    _, stack = decoder_stack(model)
    for layer in stack:
        inner = layer.forward
        layer.forward = lambda *a, inner=inner, **k: checkpoint(inner, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for layer in stack:
            del layer.forward


def hessian_traces(model: nn.Module, slots: ExpertSlots, batches: Sequence[dict], cfg: EstimatorConfig,
                   active: torch.Tensor, on_probe: ProbeCallback | None = None,
                   recompute: bool = False) -> StratifiedMean:
    """Hutchinson over probes, batch i % len(batches) for probe i, until rel_tol or max_probes.

    Batches are weighted by their labelled tokens (``StratifiedMean``), so unequal batches (a short
    last one, coverage samples, VQA answers of different lengths) still give the whole set's trace.
    The run stops early only once every batch has been probed, at least min_probes were done, and
    every active expert's relative standard error is under rel_tol. `recompute` (Gauss-Newton only: the
    exact Hessian's double backward keeps its graph) trades a forward per probe for the activations.
    """
    from .devices import trim_host_heap

    gen = torch.Generator().manual_seed(cfg.seed)
    labelled = [int(labelled_predictions(b).sum()) for b in batches]
    stats = StratifiedMean(labelled, slots.count)
    with _ExpertGrad(model, slots.params), recomputed(model, recompute and cfg.curvature == "gauss-newton"):
        for i in range(cfg.max_probes):
            b = i % len(batches)
            stats.add(b, curvature_probe(model, slots, batches[b], cfg.curvature, gen))
            if model_device(model).type == "cpu":
                trim_host_heap()
            worst = stats.worst_rel(active)
            if on_probe:
                on_probe(i + 1, worst)
            if stats.all_seen and stats.count >= max(cfg.min_probes, 2) and worst < cfg.rel_tol:
                break
    return stats


def weight_norm_traces(layers: Sequence[MoELayer]) -> torch.Tensor:
    """Tr Hess ||W_e||_F per expert, no data: the closed form (n - 1) / ||W_e||_F (n = the expert's weights).

    The Hessian of a norm is (I - u u^T) / ||W|| with u = W / ||W||; its trace is (n - 1) / ||W||. Computed
    expert by expert in float64 on the weights' device."""
    out = []
    for layer in layers:
        for e in range(layer.num_experts):
            sq = layer.get_w1(e).double().pow(2).sum() + layer.get_w2(e).double().pow(2).sum()
            out.append(((layer.expert_params - 1) / sq.sqrt()).cpu())
    return torch.stack(out)


# -- routing statistics and quantization errors -------------------------------------------------------
@dataclass
class RoutingStats:
    tokens: torch.Tensor  # [experts] (token, slot) assignments
    weight: torch.Tensor  # [experts] routing weight mass
    layer_tokens: torch.Tensor  # [experts] tokens seen by the expert's layer
    mask: torch.Tensor | None = field(default=None)  # real (non-padding) tokens of the current batch


def _routing_callback(stats: RoutingStats, offset: int, num_experts: int):
    def callback(hidden, top_k_index, top_k_weights):
        keep = stats.mask if stats.mask is not None and stats.mask.numel() == top_k_index.shape[0] else None
        idx, w = top_k_index.long().cpu(), top_k_weights.detach().double().cpu()
        if keep is not None:
            idx, w = idx[keep], w[keep]
        sl = slice(offset, offset + num_experts)
        stats.tokens[sl] += torch.bincount(idx.flatten(), minlength=num_experts)[:num_experts]
        stats.weight[sl] += torch.zeros(num_experts, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten())
        stats.layer_tokens[sl] += idx.shape[0]
    return callback


@torch.no_grad()
def routing_stats(model: nn.Module, layers: Sequence[MoELayer], batches: Sequence[dict]) -> RoutingStats:
    n = sum(layer.num_experts for layer in layers)
    stats = RoutingStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long))
    handles, offset = [], 0
    for layer in layers:
        handles.append(layer.register_routing_hook(_routing_callback(stats, offset, layer.num_experts)))
        offset += layer.num_experts
    from .devices import trim_host_heap

    dev = model_device(model)
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            stats.mask = mask.flatten().bool() if mask is not None else None
            model(**to_device(model_inputs(batch), dev), use_cache=False)
            if dev.type == "cpu":
                trim_host_heap()
    finally:
        for h in handles:
            h.remove()
    return stats


def loss_reaching_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: real tokens at or before the row's last labelled prediction (later ones, like a
    window's last token or an answer's end, cannot change the loss, so they measure nothing)."""
    labelled = labelled_predictions(batch)
    t = torch.arange(batch["input_ids"].shape[1])
    last = torch.where(labelled.any(1), (labelled * torch.arange(labelled.shape[1])).max(1).values, -1)
    keep = t[None, :] <= last[:, None]
    mask = batch.get("attention_mask")
    return keep & mask.bool() if mask is not None else keep


@torch.no_grad()
def cover_experts(model: nn.Module, layers: Sequence[MoELayer], calib: CalibrationSet,
                  stats: RoutingStats) -> tuple[CalibrationSet, RoutingStats]:
    """Add spare calibration samples that route tokens to experts the chosen samples never reached.

    Scans the spare pool in order (routing only: each forward stops at the deepest layer with an
    uncovered expert) and adds, per uncovered expert, the first sample that routes it a token that
    can reach the loss (``loss_reaching_positions``). Returns the extended set and routing statistics
    that include the added samples.
    """
    offsets = np.cumsum([0] + [layer.num_experts for layer in layers])
    missing = set((stats.tokens == 0).nonzero().flatten().tolist())
    if not missing or calib.spare is None or not calib.spare.ids:
        return calib, stats
    found: dict[int, int] = {}  # expert -> spare sample id
    state: dict = {}

    def hook_for(li: int):
        def callback(hidden, top_k_index, top_k_weights):
            rows = torch.arange(top_k_index.shape[0]) // state["seq"]
            keep = state["keep"]
            idx = top_k_index.long().cpu() + int(offsets[li])
            if keep.numel() == idx.shape[0]:
                idx, rows = idx[keep], rows[keep]
            for e in missing - found.keys():
                hit = (idx == e).any(1)
                if bool(hit.any()):
                    found[e] = state["ids"][int(rows[hit][0])]
            if li == state["deepest"]:
                raise StopForward  # the deepest layer that still needs coverage has been routed
        return callback

    handles = [layer.register_routing_hook(hook_for(li)) for li, layer in enumerate(layers)]
    try:
        for ids, batch in calib.spare.batches(calib.batch_size):
            left = missing - found.keys()
            if not left:
                break
            state.update(ids=ids, seq=batch["input_ids"].shape[1], keep=loss_reaching_positions(batch).flatten(),
                         deepest=max(int(np.searchsorted(offsets, e, side="right")) - 1 for e in left))
            forward_until_stopped(model, to_device(model_inputs(batch), model_device(model)))
    finally:
        for h in handles:
            h.remove()
    added = sorted(set(found.values()))
    if not added:
        return calib, stats
    extended = calib.extend(added)
    more = routing_stats(model, layers, extended.batches[len(calib.batches):])
    return extended, RoutingStats(stats.tokens + more.tokens, stats.weight + more.weight,
                                  stats.layer_tokens + more.layer_tokens)


def _squared_errors(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """[E] float64 sums of (Q_b(W_e) - W_e)^2 for w [E, rows, K] (one expert: summed as one matrix)."""
    if w.shape[0] == 1:
        return ((rtn(w[0], bits, group_size).dequantize() - w[0]) ** 2).sum(dtype=torch.float64).reshape(1)
    return ((rtn(w, bits, group_size).dequantize() - w) ** 2).flatten(1).sum(1, dtype=torch.float64)


def quant_errors(layer: MoELayer, bits: Sequence[int], group_size: int, batch: int | None = None) -> list[dict[int, float]]:
    """Per expert {bits: ||W - Q_b(W)||^2} (RTN with the clipping search) on the weights' device: one expert
    at a time on the CPU (its float32 copies are the transients), experts batched in chunks of about 1 GiB
    on a GPU (the search is thousands of small kernels per call). `batch` overrides the chunk."""
    dev = layer.get_w1(0).device
    per = batch or (1 if dev.type == "cpu" else
                    max(1, (1 << 30) // (8 * 3 * layer.hidden_size * layer.intermediate_size * 4)))
    out = []
    for start in range(0, layer.num_experts, per):
        idx = range(start, min(start + per, layer.num_experts))
        w1 = torch.stack([layer.get_w1(e) for e in idx])
        w2 = torch.stack([layer.get_w2(e) for e in idx])
        sums = {b: (_squared_errors(w1, b, group_size) + _squared_errors(w2, b, group_size)).tolist() for b in bits}
        out += [{b: sums[b][j] for b in bits} for j in range(len(idx))]
    return out


# -- the stage ------------------------------------------------------------------------------------
def _records(layers, stats: RoutingStats, traces: StratifiedMean, norm_traces, errors) -> tuple[ExpertSensitivity, ...]:
    out, i = [], 0
    mean, stderr = traces.mean, traces.stderr
    for layer in layers:
        for e in range(layer.num_experts):
            tokens, total = int(stats.tokens[i]), int(stats.layer_tokens[i])
            out.append(ExpertSensitivity(
                name=layer.expert_name(e), layer=layer.layer, expert=e, params=layer.expert_params,
                hessian_trace=float(mean[i]), hessian_trace_stderr=(float(stderr[i]) if math.isfinite(stderr[i]) else None) if tokens else 0.0,
                tokens=tokens, layer_tokens=total, frequency=tokens / total if total else 0.0,
                routing_weight=float(stats.weight[i]), no_tokens=tokens == 0, quant_error=errors[i],
                weight_norm_trace=float(norm_traces[i])))
            i += 1
    return tuple(out)


def analyze(model: nn.Module, info: ModelInfo, calib: CalibrationSet, cfg: EstimatorConfig,
            on_probe: ProbeCallback | None = None, recompute: bool | None = None) -> SensitivityReport:
    """Every per-expert statistic of the module docstring, for every routed expert of the model.

    `recompute` None: on for a real-size model (over 1e9 parameters) on the CPU, where host memory is the
    budget (`recomputed`); off otherwise (small models, and GPUs, where the time matters more)."""
    from .devices import FLOAT32_MAX_PARAMS

    start = time.perf_counter()
    if recompute is None:
        recompute = model_device(model).type == "cpu" and sum(p.numel() for p in model.parameters()) > FLOAT32_MAX_PARAMS
    layers = find_moe_layers(model)
    slots = expert_slots(layers)
    stats = routing_stats(model, layers, calib.batches)
    if cfg.cover:
        calib, stats = cover_experts(model, layers, calib, stats)
    traces = hessian_traces(model, slots, calib.batches, cfg, stats.tokens > 0, on_probe, recompute)
    norm_traces = weight_norm_traces(layers)
    errors = [err for layer in layers for err in quant_errors(layer, cfg.bits, cfg.group_size)]
    experts = _records(layers, stats, traces, norm_traces, errors)
    converged = traces.worst_rel(stats.tokens > 0) < cfg.rel_tol
    return SensitivityReport(info, calib.info, cfg, traces.count, converged, round(time.perf_counter() - start, 3), experts)


def load_report(path) -> SensitivityReport:
    from .fsutil import read_json

    return SensitivityReport.from_json(read_json(path, "sensitivity file"), str(path))


def run_analyze(model_dir, calib, *, cfg: EstimatorConfig, samples: int, seq_len: int,
                device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                trust_remote_code: bool = False, on_probe: ProbeCallback | None = None,
                say: Callable[[str], None] = lambda s: None) -> SensitivityReport:
    """The stage from a checkpoint folder: settings checked, memory estimated against the device, the model
    loaded there in the compute dtype, calibration read, every statistic computed (with what it cost)."""
    from pathlib import Path

    from .calibration import check_sizes, load_calibration
    from .devices import Meter, dtype_name, gib, resolve_device, resolve_dtype
    from .models.loading import check_weights, load_model, load_tokenizer, model_info
    from .models.onload import skeleton
    from .scale import ModelShape, analyze_bytes, check_fits

    check_sizes(samples, seq_len, cfg.batch_size)
    if not Path(calib).exists():
        raise MopeqError(f"calibration data not found: {calib}")
    info = model_info(model_dir)
    check_weights(model_dir)
    dev = resolve_device(device)
    bare = skeleton(model_dir, trust_remote_code=trust_remote_code)
    shape = ModelShape.of(bare)
    data = load_calibration(calib, load_tokenizer(model_dir, trust_remote_code), bare.config, samples=samples,
                            seq_len=seq_len, batch_size=cfg.batch_size)
    compute = resolve_dtype(dtype, shape.params)
    tokens = max(int(b["input_ids"].numel()) for b in data.batches)
    need = analyze_bytes(shape, compute, tokens, cfg.curvature)
    check_fits(need, dev, "the analysis", "use --device cuda, a smaller --batch-size or --seq-len, "
               "or --dtype bfloat16")
    say(f"analyze: {shape.params / 1e9:.2f}B parameters on {dev} in {dtype_name(compute)}, about {gib(need)} "
        "at peak (estimate)")
    meter = Meter(dev, compute, estimate_bytes=need)
    net, info = load_model(model_dir, device=dev, dtype=compute, trust_remote_code=trust_remote_code)
    report = analyze(net, info, data, cfg, on_probe)
    return replace(report, resources=meter.done().to_json())
