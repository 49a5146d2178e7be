"""Stage "plan": turn per-expert sensitivities into a bit plan (an ordered map expert -> bits).

Methods
- ``kmeans`` (the MoPEQ paper): exact 1-D k-means of the traces Tr(H_e) themselves into as many
  clusters as candidate widths; the most sensitive cluster gets the highest width. Raw values, as the
  paper clusters them: on a log scale the few near-zero experts (rarely routed ones) take the low
  clusters of their own and nearly everything else lands at the highest width (measured: 3.95 of 4
  bits on text-moe at model scope, docs/RESULTS.md).
- ``frequency`` (the paper's ablation): the same clustering on activation frequency.
- ``budget`` (HAWQ-V2 style): minimize the predicted loss increase
  sum_e Tr(H_e)/n_e * ||W_e - Q_b(W_e)||^2 subject to sum_e n_e b_e <= B * sum_e n_e, an exact
  multiple-choice knapsack solved by dynamic programming over cost units (see `solve_knapsack`).
- ``uniform``: every expert at one width.

With ``avg_bits`` set, ``kmeans`` and ``frequency`` rank experts by their signal instead and fill two
adjacent widths (most sensitive first) to meet the budget: clustering alone cannot hit a size, and
matched-size comparisons between methods need the same size.

Experts that received no calibration tokens are the least sensitive by definition (their loss Hessian
is exactly 0): they get the lowest width and stay listed. A noisy negative trace is read as 0.
Overrides (``NAME=BITS``) are fixed first; a budget is then re-solved over the other experts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import MopeqError
from .fsutil import sha256_file
from .models.loading import ModelInfo
from .quantization.dense import check_dense, dense_widths
from .sensitivity import ExpertSensitivity, SensitivityReport, load_report

SCHEMA_VERSION = 1
METHODS = ("budget", "kmeans", "frequency", "uniform")
SCOPES = ("model", "layer")
DP_MAX_CELLS = 50_000_000  # choice table entries (int8) before the Lagrangian fallback


# -- records ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanConfig:
    method: str = "budget"
    scope: str = "model"
    avg_bits: float | None = None  # budget: default mean of the candidates; uniform: default the highest
    candidates: tuple[int, ...] = (2, 3, 4)
    overrides: tuple[tuple[str, int], ...] = ()
    dense_bits: int | None = None  # dense (non-expert) weights: None/4 the defaults of quantization/dense.py, 16 float

    def __post_init__(self):
        if self.method not in METHODS:
            raise MopeqError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise MopeqError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates) or min(self.candidates) < 1:
            raise MopeqError(f"bad candidate widths {self.candidates}; give distinct positive widths, e.g. 2,3,4")
        lo, hi = min(self.candidates), max(self.candidates)
        if self.avg_bits is not None and not (lo <= self.avg_bits <= hi and math.isfinite(self.avg_bits)):
            raise MopeqError(f"--avg-bits {self.avg_bits} is outside [{lo}, {hi}], the range of the candidate widths")
        if self.method == "uniform" and self.avg_bits is not None and self.avg_bits not in self.candidates:
            raise MopeqError(f"uniform width {self.avg_bits} is not a candidate ({', '.join(map(str, self.candidates))})")
        dense_widths(self.dense_bits)  # refuses anything but None, 4 and 16
        for name, bits in self.overrides:
            if bits not in self.candidates:
                raise MopeqError(f"override {name}={bits}: {bits} bits is not a candidate width "
                                 f"({', '.join(map(str, self.candidates))})")

    @property
    def target(self) -> float | None:
        """The average-bits budget in force, if any."""
        if self.method == "budget" and self.avg_bits is None:
            return float(np.mean(self.candidates))
        return None if self.method == "uniform" else self.avg_bits


@dataclass(frozen=True)
class BitPlan:
    experts: dict[str, int]  # model order
    avg_bits: float  # realized, weighted by parameter count
    method: str
    scope: str
    candidates: tuple[int, ...]
    target_avg_bits: float | None
    overrides: dict[str, int]
    predicted_loss: float | None  # sum_e Tr(H_e)/n_e * err_e(b_e): comparable between plans of one report
    solver: dict  # {"name": ..., "gap_bound": predicted-loss gap to the optimum (0 = exact)}
    sensitivity: dict  # {"path": ..., "sha256": ...}
    model: ModelInfo
    # width per class of dense weight (quantization/dense.py: attention, shared_experts, dense_mlp, lm_head,
    # embeddings), 16 = kept float; a plan file without it (older toolchains) keeps them all float
    dense: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_json()
        d["candidates"] = list(self.candidates)
        return {"schema_version": d.pop("schema_version"), "kind": "mopeq.bitplan", **d}

    @classmethod
    def from_json(cls, d: dict, source: str = "bit plan") -> "BitPlan":
        if not isinstance(d, dict) or d.get("kind") != "mopeq.bitplan" or d.get("schema_version") != SCHEMA_VERSION:
            raise MopeqError(f"{source} is not a version-{SCHEMA_VERSION} bit plan; rerun `mopeq-export plan`")
        try:
            kw = {k: d[k] for k in cls.__dataclass_fields__ if k not in ("schema_version", "dense")}
            kw["dense"] = check_dense(d.get("dense"), source)
            kw["model"] = ModelInfo.from_json(d["model"])
            kw["candidates"] = tuple(d["candidates"])
            kw["experts"] = {str(k): int(v) for k, v in d["experts"].items()}
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise MopeqError(f"{source} is malformed ({e}); rerun `mopeq-export plan`") from None


# -- exact 1-D k-means -----------------------------------------------------------------------------
def kmeans_1d(x: Sequence[float], k: int) -> tuple[np.ndarray, float]:
    """Optimal 1-D k-means by dynamic programming: labels (0 = lowest cluster) and the within-SS.

    Optimal 1-D clusters are contiguous in sorted order, so D[c][j] = min_i D[c-1][i] + SS(i, j) over
    the first j sorted points is exact; O(k n^2) with each row vectorized. k shrinks to the number of
    distinct values (a cluster of equal values has no split that lowers the cost).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    k = min(k, len(np.unique(x)))
    if n == 0 or k <= 1:
        return np.zeros(n, dtype=int), float(((x - x.mean()) ** 2).sum()) if n else 0.0
    order = np.argsort(x, kind="stable")
    xs = x[order]
    s1, s2 = np.concatenate([[0.0], np.cumsum(xs)]), np.concatenate([[0.0], np.cumsum(xs * xs)])

    def ss(i: np.ndarray, j: int) -> np.ndarray:  # within-SS of sorted points i..j-1
        m = j - i
        return np.maximum(s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m, 0.0)

    cost = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=int)
    cost[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            i = np.arange(c - 1, j)
            cand = cost[c - 1, i] + ss(i, j)
            best = int(np.argmin(cand))
            cost[c, j], arg[c, j] = cand[best], i[best]
    labels_sorted = np.empty(n, dtype=int)
    j = n
    for c in range(k, 0, -1):
        i = arg[c, j]
        labels_sorted[i:j] = c - 1
        j = i
    labels = np.empty(n, dtype=int)
    labels[order] = labels_sorted
    return labels, float(cost[k, n])


def cluster_widths(signal: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """Cluster signal (1-D k-means) into len(widths) groups; higher cluster -> higher width.

    With fewer distinct values than widths, k clusters take k evenly spaced widths including both
    extremes; a single cluster (no information) takes the middle width.
    """
    w = sorted(widths)
    labels, _ = kmeans_1d(signal, len(w))
    k = int(labels.max()) + 1 if labels.size else 1
    if k == 1:
        return np.full(signal.size, w[len(w) // 2])
    pick = [w[round(c * (len(w) - 1) / (k - 1))] for c in range(k)]
    return np.array([pick[c] for c in labels])


def rank_fill(signal: np.ndarray, params: np.ndarray, widths: Sequence[int], budget: float) -> np.ndarray:
    """Most sensitive first get the upper of the two widths around `budget` while the budget allows."""
    w = sorted(widths)
    lo = max(b for b in w if b <= budget)
    hi = min((b for b in w if b >= budget), default=lo)
    bits = np.full(signal.size, lo)
    spare = budget * params.sum() - lo * params.sum()
    for i in np.argsort(-signal, kind="stable"):
        if hi > lo and params[i] * (hi - lo) <= spare + 1e-9:
            bits[i], spare = hi, spare - params[i] * (hi - lo)
    return bits


# -- multiple-choice knapsack ------------------------------------------------------------------------
@dataclass(frozen=True)
class KnapsackResult:
    choice: np.ndarray  # option index per item
    value: float
    solver: str  # "dp" (exact) | "lagrangian" (+ greedy repair)
    gap_bound: float  # value - lower bound on the optimum (0 for the DP)


def solve_knapsack(loss: np.ndarray, cost: np.ndarray, capacity: int) -> KnapsackResult:
    """min sum_i loss[i, c_i] s.t. sum_i cost[i, c_i] <= capacity; option 0 must be the cheapest.

    Costs are integers (parameter-bits); dividing by their gcd gives the DP's unit. The DP is exact;
    if its table would exceed DP_MAX_CELLS the Lagrangian relaxation is used, whose dual value is a
    lower bound on the optimum, so `gap_bound` bounds the suboptimality of the repaired solution.
    """
    capacity = capacity - int(cost[:, 0].sum())  # option 0 is paid up front; the DP buys upgrades
    cost = cost - cost[:, :1]
    unit = reduce(math.gcd, (int(c) for c in cost.flatten() if c), 0) or 1
    cap = int(capacity // unit)
    if cap < 0:
        raise MopeqError("the budget is below the cheapest assignment")
    if loss.shape[0] * (cap + 1) <= DP_MAX_CELLS:
        return _knapsack_dp(loss, cost // unit, cap)
    return _knapsack_lagrangian(loss, cost, capacity)


def _knapsack_dp(loss: np.ndarray, units: np.ndarray, cap: int) -> KnapsackResult:
    n, m = loss.shape
    best = np.zeros(cap + 1)  # best[j]: min loss of the items so far with cost <= j
    choice = np.zeros((n, cap + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for o in range(m):
            u = int(units[i, o])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[:cap + 1 - u] + loss[i, o]
            better = cand < new  # strict: ties keep the cheaper option (lower index)
            new[better], choice[i, better] = cand[better], o
        best = new
    picks, j = np.zeros(n, dtype=int), cap
    for i in range(n - 1, -1, -1):
        picks[i] = choice[i, j]
        j -= int(units[i, picks[i]])
    return KnapsackResult(picks, float(best[cap]), "dp", 0.0)


def _knapsack_lagrangian(loss: np.ndarray, cost: np.ndarray, capacity: float) -> KnapsackResult:
    def pick(lam: float) -> np.ndarray:
        return np.argmin(loss + lam * cost, axis=1)

    rows = np.arange(loss.shape[0])
    lo, hi = 0.0, 1.0
    while cost[rows, pick(hi)].sum() > capacity:
        hi *= 2
    for _ in range(100):  # smallest multiplier whose relaxed choice fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost[rows, pick(mid)].sum() > capacity else (lo, mid)
    c = pick(hi)
    bound = float((loss + hi * cost).min(axis=1).sum() - hi * capacity)
    c = _greedy_repair(loss, cost, capacity, c)
    value = float(loss[rows, c].sum())
    return KnapsackResult(c, value, "lagrangian", max(value - bound, 0.0))


def _greedy_repair(loss, cost, capacity, c):
    """Spend what the relaxed solution left: best loss drop per extra cost first."""
    c = c.copy()
    rows = np.arange(loss.shape[0])
    while True:
        spare = capacity - cost[rows, c].sum()
        extra = cost - cost[rows, c][:, None]
        gain = loss[rows, c][:, None] - loss
        ok = (extra > 0) & (extra <= spare) & (gain > 0)
        if not ok.any():
            return c
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1), -np.inf)
        i, o = np.unravel_index(np.argmax(ratio), ratio.shape)
        c[i] = o


# -- per-group allocation -------------------------------------------------------------------------
def _traces(experts: Sequence[ExpertSensitivity]) -> np.ndarray:
    # a negative estimate is noise around a near-zero curvature: read it as 0 (least sensitive)
    return np.array([0.0 if e.no_tokens else max(e.hessian_trace, 0.0) for e in experts])


def _signal(experts: Sequence[ExpertSensitivity], method: str) -> np.ndarray:
    """What kmeans/frequency rank by; 0 marks experts without tokens (or without measured curvature)."""
    return _traces(experts) if method == "kmeans" else np.array([e.frequency for e in experts])


def _loss_table(experts: Sequence[ExpertSensitivity], widths: Sequence[int]) -> np.ndarray:
    """Predicted loss increase [expert, width]: Tr(H_e)/n_e * ||W_e - Q_b(W_e)||^2."""
    missing = sorted({b for e in experts for b in widths if b not in e.quant_error})
    if missing:
        have = sorted(experts[0].quant_error)
        raise MopeqError(f"the sensitivity file has quantization errors for widths {have}, not {missing}; "
                         "choose --bits-candidates among those or rerun analyze")
    per_weight = _traces(experts) / np.array([e.params for e in experts])
    return per_weight[:, None] * np.array([[e.quant_error[b] for b in widths] for e in experts])


def _by_signal(experts, method: str, widths: Sequence[int], budget: float | None) -> np.ndarray:
    signal = _signal(experts, method)
    params = np.array([e.params for e in experts], dtype=np.float64)
    if budget is not None:
        return rank_fill(signal, params, widths, budget)
    bits = np.full(len(experts), min(widths))
    live = signal > 0  # no tokens / no curvature: lowest width, outside the clustering
    if live.any():
        bits[live] = cluster_widths(signal[live], widths)
    return bits


def budget_widths(experts, widths: Sequence[int], budget: float,
                  loss: np.ndarray | None = None) -> tuple[np.ndarray, KnapsackResult]:
    """The exact knapsack at `budget` average bits on a loss table [expert, width] (default: the budget
    plan's predicted loss, `_loss_table`)."""
    params = np.array([e.params for e in experts], dtype=np.int64)
    cost = params[:, None] * np.array(widths, dtype=np.int64)[None, :]
    capacity = int(math.floor(budget * params.sum() + 1e-6))
    result = solve_knapsack(_loss_table(experts, widths) if loss is None else loss, cost, capacity)
    return np.array(widths)[result.choice], result


def _groups(experts: Sequence[ExpertSensitivity], scope: str, fixed: set[str]) -> list[list[int]]:
    free = [i for i, e in enumerate(experts) if e.name not in fixed]
    if scope == "model":
        return [free]
    layers: dict[tuple, list[int]] = {}
    for i in free:
        layers.setdefault(_layer_key(experts[i]), []).append(i)
    return list(layers.values())


def _layer_key(e: ExpertSensitivity) -> tuple:
    return (e.layer, e.name.rsplit(".", 1)[0])


def _group_budget(experts, group: list[int], all_in_scope: list[int], target: float, fixed: dict[str, int]) -> float:
    """Average width the free experts of a scope may use once the overridden ones are paid for."""
    total = target * sum(experts[i].params for i in all_in_scope)
    spent = sum(experts[i].params * fixed[experts[i].name] for i in all_in_scope if experts[i].name in fixed)
    return (total - spent) / sum(experts[i].params for i in group)


def _scope_members(experts, scope: str, group: list[int]) -> list[int]:
    if scope == "model":
        return list(range(len(experts)))
    key = _layer_key(experts[group[0]])
    return [i for i, e in enumerate(experts) if _layer_key(e) == key]


# -- the stage ------------------------------------------------------------------------------------
def resolve_overrides(experts: Sequence[ExpertSensitivity], overrides) -> dict[str, int]:
    names = [e.name for e in experts]
    known = set(names)
    for name, _ in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; names look like {names[0]}"
            raise MopeqError(f"override {name!r} names no routed expert of the model{hint}")
    return dict(overrides)


def _fit_budget(budget: float, widths: Sequence[int], where: str) -> float:
    if budget < min(widths) - 1e-9:
        raise MopeqError(f"the overrides spend more than the budget allows {where}; "
                         "raise --avg-bits or lower the overridden widths")
    return min(budget, max(widths))  # more than the top width: everything at the top width


def _allocate_group(sub, cfg: PlanConfig, widths, budget) -> tuple[np.ndarray, dict]:
    if cfg.method == "uniform":
        width = int(cfg.avg_bits) if cfg.avg_bits is not None else max(widths)
        return np.full(len(sub), width), {"name": "uniform", "gap_bound": 0.0}
    if cfg.method == "budget":
        bits, res = budget_widths(sub, widths, budget)
        return bits, {"name": res.solver, "gap_bound": res.gap_bound}
    name = "rank-fill" if budget is not None else "kmeans-dp"
    return _by_signal(sub, cfg.method, widths, budget), {"name": name, "gap_bound": 0.0}


def _predicted_loss(experts, bits: np.ndarray) -> float | None:
    if any(int(b) not in e.quant_error for e, b in zip(experts, bits)):
        return None
    t = _traces(experts)
    return float(sum(t[i] / e.params * e.quant_error[int(bits[i])] for i, e in enumerate(experts)))


def make_plan(report: SensitivityReport, cfg: PlanConfig, source: str | Path | None) -> BitPlan:
    """Allocate widths per scope group, then apply the overrides (already excluded from the groups).

    `source` is the sensitivity file the report was read from; None for a record in memory (the plan then
    records the hash of the record's canonical JSON and no path)."""
    experts = report.experts
    fixed = resolve_overrides(experts, cfg.overrides)
    widths = sorted(cfg.candidates)
    bits = np.zeros(len(experts), dtype=int)
    solvers = []
    for group in _groups(experts, cfg.scope, set(fixed)):
        if not group:
            continue
        budget = None
        if cfg.target is not None:
            members = _scope_members(experts, cfg.scope, group)
            where = "in the model" if cfg.scope == "model" else f"in layer {experts[group[0]].layer}"
            budget = _fit_budget(_group_budget(experts, group, members, cfg.target, fixed), widths, where)
        bits[group], solver = _allocate_group([experts[i] for i in group], cfg, widths, budget)
        solvers.append(solver)
    for i, e in enumerate(experts):
        bits[i] = fixed.get(e.name, bits[i])
    params = np.array([e.params for e in experts], dtype=np.float64)
    solver = {"name": "+".join(sorted({s["name"] for s in solvers})) or "overrides",
              "gap_bound": float(sum(s["gap_bound"] for s in solvers))}
    return BitPlan(
        experts={e.name: int(b) for e, b in zip(experts, bits)},
        avg_bits=round(float((params * bits).sum() / params.sum()), 6),
        method=cfg.method, scope=cfg.scope, candidates=tuple(widths), target_avg_bits=cfg.target,
        overrides=fixed, predicted_loss=_predicted_loss(experts, bits), solver=solver,
        sensitivity=_provenance(report, source), model=report.model, dense=dense_widths(cfg.dense_bits))


def _provenance(report: SensitivityReport, source: str | Path | None) -> dict:
    if source is not None:
        return {"path": str(Path(source).resolve()), "sha256": sha256_file(source)}
    canonical = json.dumps(report.to_json(), sort_keys=True, separators=(",", ":")).encode()
    return {"path": None, "sha256": hashlib.sha256(canonical).hexdigest()}


def plan_from_file(path: str | Path, cfg: PlanConfig) -> tuple[BitPlan, SensitivityReport]:
    report = load_report(path)
    return make_plan(report, cfg, path), report
