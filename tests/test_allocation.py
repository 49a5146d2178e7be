"""Allocation stage: exact solvers against brute force, budgets, overrides, bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mopeq_export import allocation
from mopeq_export.allocation import BitPlan, PlanConfig, kmeans_1d, make_plan, solve_knapsack
from mopeq_export.calibration import CalibrationInfo
from mopeq_export.errors import MopeqError
from mopeq_export.fsutil import write_json
from mopeq_export.models.loading import ModelInfo
from mopeq_export.sensitivity import EstimatorConfig, ExpertSensitivity, SensitivityReport

MODEL = ModelInfo("/m", "m", "Arch", "t", False, "c" * 64, "w" * 64)


def fake_report(layers=3, experts=16, params=3 * 256 * 160, seed=0, no_tokens=()) -> SensitivityReport:
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(layers):
        for e in range(experts):
            name = f"model.layers.{layer}.mlp.experts.{e}"
            dead = name in no_tokens
            trace = 0.0 if dead else float(np.exp(rng.normal(1.0, 1.2)))
            base = float(rng.uniform(0.5, 1.5)) * params * 1e-4
            err = {2: base * 16, 3: base * 4, 4: base, 8: base / 256}
            tokens = 0 if dead else int(rng.integers(1, 500))
            out.append(ExpertSensitivity(name, layer, e, params, trace, 0.1 * trace, tokens, 4096, tokens / 4096,
                                         tokens * 0.3, dead, err, 1000.0))
    cal = CalibrationInfo("/c", "h" * 64, "text", 32, 128, 4096)
    return SensitivityReport(MODEL, cal, EstimatorConfig(), 16, True, 1.0, tuple(out))


@pytest.fixture
def sens_file(tmp_path):
    path = tmp_path / "sensitivity.json"
    write_json(path, fake_report().to_json())
    return path


def plan(path, **kw) -> BitPlan:
    return allocation.plan_from_file(path, PlanConfig(**kw))[0]


# -- k-means -----------------------------------------------------------------------------------------
def brute_kmeans(x, k):
    best = np.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        if len(set(labels)) < k:
            continue
        lab = np.array(labels)
        best = min(best, sum(((x[lab == c] - x[lab == c].mean()) ** 2).sum() for c in range(k)))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=7), st.integers(1, 3))
def test_kmeans_dp_is_optimal(values, k):
    x = np.array(values)
    k_eff = min(k, len(np.unique(x)))
    labels, cost = kmeans_1d(x, k)
    assert len(set(labels)) == k_eff
    realized = sum(((x[labels == c] - x[labels == c].mean()) ** 2).sum() for c in set(labels))
    assert realized == pytest.approx(cost, abs=1e-9)
    assert cost <= brute_kmeans(x, k_eff) + 1e-9
    order = np.argsort(x)  # clusters are numbered from low to high values
    assert (np.diff(labels[order]) >= 0).all()


def test_kmeans_clusters_raw_traces():
    """As the paper: near-zero experts share the lowest cluster (on a log scale they would take two)."""
    assert allocation.cluster_widths(np.array([1e-6, 1e-3, 5.0, 6.0, 10.0]), (2, 3, 4)).tolist() == [2, 2, 3, 3, 4]


def test_kmeans_with_fewer_distinct_values_than_widths():
    assert allocation.cluster_widths(np.array([1.0, 1.0, 1.0]), (2, 3, 4)).tolist() == [3, 3, 3]
    assert allocation.cluster_widths(np.array([1.0, 5.0, 1.0]), (2, 3, 4)).tolist() == [2, 4, 2]


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_kmeans_gives_three_clusters_per_scope(sens_file, scope):
    p = plan(sens_file, method="kmeans", scope=scope)
    layers = {}
    for name, bits in p.experts.items():
        layers.setdefault(name.rsplit(".", 1)[0], set()).add(bits)
    if scope == "layer":
        assert all(v == {2, 3, 4} for v in layers.values())
    assert set(p.experts.values()) == {2, 3, 4}
    report = fake_report()  # most sensitive -> highest width
    top = max(report.experts, key=lambda e: e.hessian_trace)
    low = min(report.experts, key=lambda e: e.hessian_trace)
    assert p.experts[top.name] == 4 and p.experts[low.name] == 2


# -- knapsack ----------------------------------------------------------------------------------------
def brute_knapsack(loss, cost, cap):
    best = np.inf
    for pick in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        rows = np.arange(loss.shape[0])
        if cost[rows, pick].sum() <= cap:
            best = min(best, loss[rows, pick].sum())
    return best


def knapsack_instance(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    params = rng.choice([6, 12, 18, 30], n)
    widths = np.array([2, 3, 4])
    cost = params[:, None] * widths[None, :]
    loss = np.sort(rng.uniform(0, 10, (n, 3)), axis=1)[:, ::-1].copy()  # more bits, less loss
    cap = int(params.sum() * rng.uniform(2, 4))
    return loss, cost, cap


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_dp_is_optimal(seed):
    loss, cost, cap = knapsack_instance(seed)
    r = solve_knapsack(loss, cost, cap)
    rows = np.arange(len(loss))
    assert r.solver == "dp" and r.gap_bound == 0
    assert cost[rows, r.choice].sum() <= cap
    assert r.value == pytest.approx(brute_knapsack(loss, cost, cap))


@pytest.mark.parametrize("seed", range(20))
def test_lagrangian_fallback_is_feasible_within_its_bound(seed, monkeypatch):
    monkeypatch.setattr(allocation, "DP_MAX_CELLS", 0)
    loss, cost, cap = knapsack_instance(seed)
    r = solve_knapsack(loss, cost, cap)
    rows = np.arange(len(loss))
    opt = brute_knapsack(loss, cost, cap)
    assert r.solver == "lagrangian" and cost[rows, r.choice].sum() <= cap
    assert opt - 1e-9 <= r.value <= opt + r.gap_bound + 1e-9


# -- budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["model", "layer"])
@pytest.mark.parametrize("budget", [2.0, 2.25, 2.5, 3.0, 3.125, 3.75, 4.0])
def test_budget_lands_within_a_hundredth_under(sens_file, scope, budget):
    p = plan(sens_file, method="budget", scope=scope, avg_bits=budget)
    assert budget - 0.01 <= p.avg_bits <= budget + 1e-9
    assert p.solver == {"name": "dp", "gap_bound": 0.0}


@pytest.mark.parametrize("scope, experts", [("model", 48), ("layer", 16)])
@pytest.mark.parametrize("budget", [2.3, 3.3, 3.7])
def test_budget_is_met_to_one_expert_bit(sens_file, scope, experts, budget):
    """Equal-size experts move the average in steps of 1/experts bits: the DP fills to the last step."""
    p = plan(sens_file, method="budget", scope=scope, avg_bits=budget)
    assert budget - 1 / experts <= p.avg_bits <= budget


def test_budget_beats_or_matches_other_methods_on_predicted_loss(sens_file):
    best = plan(sens_file, method="budget", avg_bits=3.0).predicted_loss
    for method in ("kmeans", "frequency"):
        assert best <= plan(sens_file, method=method, avg_bits=3.0).predicted_loss + 1e-9


@pytest.mark.parametrize("method", ["kmeans", "frequency"])
def test_signal_methods_hit_a_budget_by_rank_fill(sens_file, method):
    p = plan(sens_file, method=method, avg_bits=2.5)
    assert p.avg_bits == pytest.approx(2.5) and set(p.experts.values()) == {2, 3}


def test_uniform(sens_file):
    assert set(plan(sens_file, method="uniform").experts.values()) == {4}
    assert set(plan(sens_file, method="uniform", avg_bits=3).experts.values()) == {3}


def test_experts_without_tokens_get_the_lowest_width(tmp_path):
    dead = ("model.layers.1.mlp.experts.3", "model.layers.2.mlp.experts.0")
    path = tmp_path / "s.json"
    write_json(path, fake_report(no_tokens=dead).to_json())
    for kw in (dict(method="kmeans"), dict(method="frequency"), dict(method="budget", avg_bits=3.0)):
        p = plan(path, **kw)
        assert all(p.experts[d] == 2 for d in dead), kw


def test_overrides_are_kept_and_budget_resolved(sens_file):
    names = list(plan(sens_file, method="uniform").experts)
    sets = ((names[0], 4), (names[1], 4), (names[5], 2))
    p = plan(sens_file, method="budget", avg_bits=2.5, overrides=sets)
    assert all(p.experts[n] == b for n, b in sets)
    assert 2.49 <= p.avg_bits <= 2.5
    k = plan(sens_file, method="kmeans", overrides=((names[0], 2),))
    assert k.experts[names[0]] == 2 and k.overrides == {names[0]: 2}


def test_plan_records_identity_and_round_trips(sens_file):
    p = plan(sens_file, method="budget", avg_bits=2.5)
    assert p.model == MODEL and p.sensitivity["sha256"] and list(p.experts) == [e.name for e in fake_report().experts]
    assert BitPlan.from_json(json.loads(json.dumps(p.to_json()))) == p


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(method="hawq"), "unknown method"),
    (dict(scope="expert"), "unknown scope"),
    (dict(avg_bits=1.5), "outside"),
    (dict(avg_bits=4.5), "outside"),
    (dict(method="uniform", avg_bits=2.5), "not a candidate"),
    (dict(overrides=(("model.layers.0.mlp.experts.0", 5),)), "not a candidate"),
    (dict(overrides=(("model.layers.0.mlp.expert.0", 4),)), "did you mean model.layers.0.mlp.experts.0"),
    (dict(candidates=(2, 3, 5), avg_bits=3.0), "quantization errors for widths"),
    (dict(avg_bits=2.0, overrides=(("model.layers.0.mlp.experts.0", 4),)), "overrides spend more"),
])
def test_bad_plan_input(sens_file, kw, message):
    with pytest.raises(MopeqError, match=message):
        plan(sens_file, **kw)


@pytest.mark.parametrize("content", ["[1, 2]", '{"kind": "mopeq.sensitivity", "schema_version": 1}',
                                     '{"kind": "mopeq.sensitivity", "schema_version": 99}', "{not json"])
def test_malformed_sensitivity_file(tmp_path, content):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(MopeqError):
        plan(path)


def test_oracle_allocation_bound_is_the_exhaustive_optimum():
    """scripts/oracle_allocation.py's dynamic programme over the net width offset against every assignment of
    widths {2, 3, 4} to 7 experts, on fresh random in-context gains (some negative, as measured ones can be)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from oracle_allocation import best_offsets

    rng = np.random.default_rng()
    n = 7
    g23, g34 = rng.normal(0.01, 0.01, n), rng.normal(0.003, 0.003, n)
    best = best_offsets(g23, g34)
    brute: dict[int, float] = {}
    for steps in itertools.product((-1, 0, 1), repeat=n):
        cost = sum(g23[i] if s < 0 else (-g34[i] if s > 0 else 0.0) for i, s in enumerate(steps))
        off = sum(steps)
        brute[off] = min(brute.get(off, np.inf), cost)
    assert sorted(best) == sorted(brute)
    for off, (cost, widths) in best.items():
        assert cost == pytest.approx(brute[off], abs=1e-12)
        assert int((widths - 3).sum()) == off and set(widths.tolist()) <= {2, 3, 4}
        again = sum(g23[i] if w == 2 else (-g34[i] if w == 4 else 0.0) for i, w in enumerate(widths))
        assert again == pytest.approx(cost, abs=1e-12)  # the widths returned reach the cost reported


def _study_row(plan, bits, quantizer, seed, units, **over):
    return {"plan": plan, "avg_bits": float(bits), "quantizer": quantizer, "seed": seed, "data": "text_dev.txt",
            "kind": "text", "expert_mb": 1.0 + bits, "units": units, "ppl_ratio": 1.01, "kl": 0.1, "top1": 0.8, **over}


def _units(rng, n_units=12, ref=None):
    n = [255.0] * n_units
    nll_ref = ref if ref is not None else list(rng.uniform(500, 900, n_units))
    return {"n": n, "nll_ref": nll_ref, "nll": list(np.array(nll_ref) + rng.uniform(0, 30, n_units)),
            "kl": list(rng.uniform(10, 40, n_units)), "agree": list(rng.uniform(150, 250, n_units))}


def test_external_quantizer_rows_join_the_study_on_the_same_units():
    """scripts/compare_allocations.py's `--external` merge: another quantizer's uniform rows (compare_quantizers.py's)
    become study rows with the study's bytes at that width, are refused on other data or other units, and are
    compared with this project's quantizer on the same plan unit by unit."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from compare_allocations import external_rows, external_table, merge

    rng = np.random.default_rng(13)
    ref = list(rng.uniform(500, 900, 12))
    study = [_study_row("uniform-2", 2, "signround", s, _units(rng, ref=ref)) for s in (0, 1)]
    study.append(_study_row("budget", 2.5, "signround", 0, _units(rng, ref=ref)))
    theirs = {"method": "autoround", "bits": 2, "data": "text_dev.txt", "kind": "text", "seconds": 9.0,
              "ppl_ratio": 1.02, "kl": 0.11, "top1": 0.79,
              "units": _units(rng, ref=[x + rng.uniform(-0.01, 0.01) for x in ref])}  # another device's float16 reference
    ours_again = {**theirs, "method": "signround"}
    rows = external_rows([theirs, ours_again], study)
    assert len(rows) == 1  # the study's own quantizer keeps its rows
    r = rows[0]
    assert (r["plan"], r["avg_bits"], r["quantizer"], r["expert_mb"], r["external"]) == ("uniform-2", 2.0, "autoround", 3.0, True)
    for bad in ({"data": "text_eval.txt"}, {"bits": 4},
                {"units": {**theirs["units"], "nll_ref": list(rng.uniform(500, 900, 12))}},
                {"units": {k: v[:11] for k, v in theirs["units"].items()}},
                {"units": {**theirs["units"], "nll_ref": [x * (1 + 1e-3) for x in ref]}}):  # 0.1 %, 3e-3 nats a token: another reference
        with pytest.raises(SystemExit):
            external_rows([{**theirs, **bad}], study)
    line = external_table(study + rows, boot=200)[2]
    mean_kl = np.mean([s["units"]["kl"] for s in study[:2]], 0)
    want = (mean_kl.sum() - np.sum(theirs["units"]["kl"])) / (255.0 * 12)
    assert "uniform-2 (autoround)" in line and f"{want:+.5f}" in line
    # merge: the study's parts and the external file; merging the merged file again adds nothing twice
    import json

    tmp = Path(__import__("tempfile").mkdtemp())
    (tmp / "part.json").write_text(json.dumps(study))
    (tmp / "ext.json").write_text(json.dumps([theirs]))
    merge([str(tmp / "part.json")], str(tmp / "m1"), [str(tmp / "ext.json")])
    merge([str(tmp / "m1.json")], str(tmp / "m2"), [str(tmp / "ext.json")])
    for m in ("m1", "m2"):
        got = json.loads((tmp / f"{m}.json").read_text())
        assert [(r["plan"], r["quantizer"]) for r in got].count(("uniform-2", "autoround")) == 1 and len(got) == 4
        assert "uniform-2 (autoround)" in (tmp / f"{m}.md").read_text()
