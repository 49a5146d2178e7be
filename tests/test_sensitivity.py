"""Sensitivity stage: both Hutchinson estimators against exact traces, coverage, routing sums, every architecture."""

from __future__ import annotations

import json

import pytest
import torch

from mopeq_export.calibration import CalibrationInfo, CalibrationSet
from mopeq_export.models.adapters import find_moe_layers
from mopeq_export.models.loading import ModelInfo
from mopeq_export import sensitivity as sens
from mopeq_export.sensitivity import (EstimatorConfig, SensitivityReport, analyze, expert_slots, hessian_traces,
                                      task_loss, weight_norm_traces)

import tiny_models as tm

INFO = ModelInfo("/tiny", "tiny", "Tiny", "tiny", False, "c" * 64, "w" * 64)


def text_batch(vocab=128, batch=2, seq=16, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def calib(batches):
    return CalibrationSet(CalibrationInfo("/calib", "h" * 64, "text", 2, 16, 32), batches)


def micro_mixtral():
    """One layer, 4 experts of 3*8*4 weights: small enough for an exact Hessian."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return tm._causal(cfg)


def exact_hessian(model, batch):
    """Full Hessian of the loss w.r.t. the (only) layer's fused expert params, as one matrix."""
    layer = find_moe_layers(model)[0]
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj

    def f(flat):
        a, b = flat[:gu.numel()].view_as(gu), flat[gu.numel():].view_as(dn)
        params = {f"{layer.experts_path}.gate_up_proj": a, f"{layer.experts_path}.down_proj": b}
        logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": batch["input_ids"],
                                                                           "use_cache": False}).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    flat = torch.cat([gu.detach().flatten(), dn.detach().flatten()])
    return torch.autograd.functional.hessian(f, flat, vectorize=True).double(), (gu, dn)


def _per_expert(flat: torch.Tensor, gu, dn) -> torch.Tensor:
    a, b = flat[:gu.numel()].view(gu.shape[0], -1), flat[gu.numel():].view(dn.shape[0], -1)
    return a.sum(1) + b.sum(1)


def test_one_probe_splits_v_hv_exactly_by_expert():
    """For the same Rademacher v, the per-expert sums of v * Hv equal those from the exact Hessian."""
    model = micro_mixtral()
    batch = text_batch(vocab=32, batch=2, seq=8)
    H, (gu, dn) = exact_hessian(model, batch)
    slots = expert_slots(find_moe_layers(model))
    with sens._ExpertGrad(model, slots.params):
        loss = task_loss(model, batch)
        got = sens.hutchinson_probe(loss, slots, torch.Generator().manual_seed(7))
    v = torch.cat([t.flatten() for t in sens.rademacher((gu, dn), torch.Generator().manual_seed(7))]).double()
    torch.testing.assert_close(got, _per_expert(v * (H @ v), gu, dn), rtol=1e-4, atol=1e-7)


def test_hutchinson_mean_matches_exact_hessian_trace_of_a_model():
    model = micro_mixtral()
    batch = text_batch(vocab=32, batch=2, seq=8)
    H, (gu, dn) = exact_hessian(model, batch)
    exact = _per_expert(torch.diagonal(H), gu, dn)
    cfg = EstimatorConfig(curvature="hessian", max_probes=40, min_probes=40, rel_tol=1e-9)
    stats = hessian_traces(model, expert_slots(find_moe_layers(model)), [batch], cfg, torch.ones(4, dtype=torch.bool))
    assert stats.count == 40
    # statistical tolerance: 4 standard errors (plus float noise)
    assert bool(((stats.mean - exact).abs() <= 4 * stats.stderr + 1e-7).all()), (stats.mean, exact, stats.stderr)


def test_hutchinson_matches_exact_trace_of_coupled_quadratic():
    """loss = x^T A x / 2 over a fused [E, 3, 2] block and two ModuleList-style params, A coupling them all."""
    torch.manual_seed(0)
    fused, a, b = (torch.nn.Parameter(torch.randn(*s)) for s in ((3, 3, 2), (2, 2), (5,)))
    slots = sens.ExpertSlots((fused, a, b), (0, 3, 4), (True, False, False), 5)
    n = 18 + 4 + 5
    m = torch.randn(n, n, dtype=torch.float64)
    A = m @ m.T / n + torch.diag(torch.rand(n, dtype=torch.float64) * 4)
    blocks = [range(0, 6), range(6, 12), range(12, 18), range(18, 22), range(22, 27)]
    exact = torch.stack([torch.diagonal(A)[list(r)].sum() for r in blocks])
    gen = torch.Generator().manual_seed(1)
    stats = sens.StratifiedMean([1.0], 5)
    for _ in range(1000):
        x = torch.cat([p.flatten() for p in (fused, a, b)]).double()
        stats.add(0, sens.hutchinson_probe(0.5 * x @ A @ x, slots, gen))
    assert bool(((stats.mean - exact).abs() <= 4 * stats.stderr).all()), (stats.mean, exact)
    assert float((stats.stderr / exact).max()) < 0.05  # tight enough to catch a wrong block split




# -- Gauss-Newton ---------------------------------------------------------------------------------
def labelled_jacobian(model, batch):
    """Jacobian [N, V, P] of the labelled logits w.r.t. the (only) layer's fused expert params, and p [N, V]."""
    layer = find_moe_layers(model)[0]
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    keep = batch["labels"][:, 1:] != -100

    def f(flat):
        a, b = flat[:gu.numel()].view_as(gu), flat[gu.numel():].view_as(dn)
        params = {f"{layer.experts_path}.gate_up_proj": a, f"{layer.experts_path}.down_proj": b}
        logits = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": batch["input_ids"],
                                                                           "use_cache": False}).logits
        return logits[:, :-1][keep]

    flat = torch.cat([gu.detach().flatten(), dn.detach().flatten()])
    with torch.no_grad():
        p = f(flat).double().softmax(-1)
    return torch.autograd.functional.jacobian(f, flat, vectorize=True).double(), p, (gu, dn)


def exact_gauss_newton_diag(model, batches):
    """diag of G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t / N over all labelled tokens of all batches."""
    total, n = 0, 0
    for batch in batches:
        J, p, blocks = labelled_jacobian(model, batch)
        Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        total = total + torch.einsum("tak,tab,tbk->k", J, Hz, J)
        n += p.shape[0]
    return total / n, blocks


def test_softmax_hessian_factor_squares_to_the_cross_entropy_hessian():
    gen = torch.Generator().manual_seed(0)
    for v in (2, 5, 33):
        p = (torch.randn(v, generator=gen, dtype=torch.float64) * 3).softmax(-1)
        A_T = sens.softmax_hessian_factor(p.expand(v, v), torch.eye(v, dtype=torch.float64))  # row i: A e_i
        torch.testing.assert_close(A_T.T @ A_T, torch.diag(p) - torch.outer(p, p))


def test_one_gauss_newton_probe_splits_exactly_by_expert():
    """For the same logit-space u, per-expert sums of g*g equal those of g = J^T A u / sqrt(N) built from J."""
    model = micro_mixtral()
    batch = text_batch(vocab=32, batch=2, seq=8)
    J, p, (gu, dn) = labelled_jacobian(model, batch)
    slots = expert_slots(find_moe_layers(model))
    with sens._ExpertGrad(model, slots.params):
        logits, _ = sens.labelled_logits(model, batch)
        got = sens.gauss_newton_probe(logits, slots, torch.Generator().manual_seed(3))
    u = sens.rademacher([p], torch.Generator().manual_seed(3))[0]
    g = torch.einsum("tak,ta->k", J, sens.softmax_hessian_factor(p, u)) / p.shape[0] ** 0.5
    torch.testing.assert_close(got, _per_expert(g * g, gu, dn), rtol=1e-4, atol=1e-9)


def test_gauss_newton_mean_matches_exact_trace_over_unequal_batches():
    """Two batches with different numbers of labelled tokens: the cycle average is the whole set's trace."""
    model = micro_mixtral()
    short = text_batch(vocab=32, batch=2, seq=8, seed=1)
    short["labels"][:, :5] = -100  # 2 * 3 labelled predictions vs 14 in the other batch
    batches = [text_batch(vocab=32, batch=2, seq=8), short]
    diag, (gu, dn) = exact_gauss_newton_diag(model, batches)
    exact = _per_expert(diag, gu, dn)
    cfg = EstimatorConfig(max_probes=400, min_probes=400, rel_tol=1e-9)
    stats = hessian_traces(model, expert_slots(find_moe_layers(model)), batches, cfg, torch.ones(4, dtype=torch.bool))
    assert bool((exact > 0).all())
    assert bool(((stats.mean - exact).abs() <= 4 * stats.stderr).all()), (stats.mean, exact, stats.stderr)
    assert float((stats.stderr / exact).max()) < 0.1  # tight enough to catch a wrong scale or batch weighting


def test_stratified_mean_weights_batches_by_tokens_and_reports_probe_noise():
    stats = sens.StratifiedMean([3, 1], 2)  # batch 0 holds 3/4 of the labelled tokens
    for x in ([1.0, 0.0], [3.0, 0.0]):
        stats.add(0, torch.tensor(x))
    assert stats.mean.tolist() == [2.0, 0.0] and not stats.all_seen  # batch 1 not probed: left out
    stats.add(1, torch.tensor([10.0, 4.0]))
    # batch 1 has one probe: no within-batch variance yet -> the pooled spread of w_b * B * x
    pooled = torch.tensor([1.0 * 0.75 * 2, 3.0 * 0.75 * 2, 10.0 * 0.25 * 2], dtype=torch.float64)
    torch.testing.assert_close(stats.stderr[0], pooled.std() / 3 ** 0.5)
    stats.add(1, torch.tensor([14.0, 4.0]))
    torch.testing.assert_close(stats.mean, torch.tensor([0.75 * 2 + 0.25 * 12, 0.25 * 4], dtype=torch.float64))
    # stratified: sqrt(sum w_b^2 var_b / n_b), var_0 = 2, var_1 = 8 (expert 0); expert 1 has no probe noise
    torch.testing.assert_close(stats.stderr, torch.tensor([(0.75 ** 2 * 2 / 2 + 0.25 ** 2 * 8 / 2) ** 0.5, 0.0],
                                                           dtype=torch.float64))
    assert stats.worst_rel(torch.tensor([False, True])) == 0.0
    zero = sens.StratifiedMean([1], 2)
    for _ in range(3):
        zero.add(0, torch.tensor([1.0, 0.0]))
    assert zero.worst_rel(torch.tensor([True, True])) == float("inf")  # an active expert at 0 is not converged


@pytest.mark.parametrize("build", [tm.mixtral, tm.modulelist_moe])
def test_weight_norm_trace_is_the_trace_of_the_norms_hessian(build):
    """The closed form against the trace of the exact Hessian of ||W_e||_F, expert by expert."""
    model = build()
    layers = find_moe_layers(model)
    got = weight_norm_traces(layers)
    i = 0
    for layer in layers:
        for e in range(layer.num_experts):
            w = torch.cat([layer.get_w1(e).flatten(), layer.get_w2(e).flatten()]).double()
            exact = torch.autograd.functional.hessian(lambda x: x.norm(), w).diagonal().sum()
            torch.testing.assert_close(got[i], exact, rtol=1e-9, atol=0)
            i += 1
    assert i == len(got)


@pytest.mark.parametrize("curvature, grads_per_probe", [("hessian", 2), ("gauss-newton", 1)])
def test_probe_cost_is_independent_of_the_expert_count(monkeypatch, curvature, grads_per_probe):
    model = tm.qwen2_moe()
    layers = find_moe_layers(model)
    calls, forwards = [], []
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: calls.append(1) or real_backward(*a, **k))
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    batches = [text_batch(seed=s) for s in range(3)]
    cfg = EstimatorConfig(curvature=curvature, max_probes=5, min_probes=5, rel_tol=1e-9)
    hessian_traces(model, expert_slots(layers), batches, cfg, torch.ones(8, dtype=torch.bool))
    # hessian: per probe one forward, one gradient (create_graph) and one Hessian-vector product;
    # gauss-newton: one forward and one vector-Jacobian product; for all experts together either way
    assert len(forwards) == 5 and len(calls) == 5 * grads_per_probe


@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
@pytest.mark.parametrize("build", [tm.qwen2_moe, tm.modulelist_moe])
def test_probe_gradients_are_reduced_and_freed_one_parameter_at_a_time(build, curvature):
    """The memory bound of the analysis: no full-size gradient of the experts exists at any moment; each
    parameter's gradient is reduced to per-expert sums as it arrives and freed before the next one."""
    model = build()
    slots = expert_slots(find_moe_layers(model))
    holding = []
    for p in slots.params:  # registered before the estimator's hooks, so it runs first on each arrival
        p.register_post_accumulate_grad_hook(lambda q: holding.append(sum(r.grad is not None for r in slots.params)))
    cfg = EstimatorConfig(curvature=curvature, max_probes=2, min_probes=2, rel_tol=1e-9)
    stats = hessian_traces(model, slots, [text_batch()], cfg, torch.ones(slots.count, dtype=torch.bool))
    assert holding and max(holding) == 1  # only the gradient that just arrived
    assert all(p.grad is None for p in slots.params)
    assert bool((stats.mean != 0).any())


@pytest.mark.parametrize("build", [tm.qwen2_moe, tm.modulelist_moe])
def test_recomputing_layer_activations_changes_no_number(build):
    """The CPU memory saver (activation recomputation) repeats the forward exactly: the same traces."""
    model = build()
    slots = expert_slots(find_moe_layers(model))
    cfg = EstimatorConfig(max_probes=3, min_probes=3, rel_tol=1e-9)
    batches = [text_batch(seed=s) for s in range(2)]
    from mopeq_export.models.adapters import decoder_stack

    calls = []
    decoder_stack(model)[1][0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = hessian_traces(model, slots, batches, cfg, torch.ones(slots.count, dtype=torch.bool))
    once = len(calls)
    again = hessian_traces(model, slots, batches, cfg, torch.ones(slots.count, dtype=torch.bool), recompute=True)
    assert once == 3 and len(calls) - once == 2 * 3  # recomputed: each probe runs the layer twice
    assert bool((plain.mean > 0).any())
    torch.testing.assert_close(again.mean, plain.mean, rtol=1e-12, atol=0)


def test_probes_stop_early_when_tolerance_met():
    model = tm.olmoe()
    report = analyze(model, INFO, calib([text_batch()]), EstimatorConfig(max_probes=50, min_probes=3, rel_tol=1e6))
    assert report.probes == 3 and report.converged
    # never before every batch has been probed: the estimate is for the whole calibration set
    batches = [text_batch(seed=s) for s in range(5)]
    report = analyze(model, INFO, calib(batches), EstimatorConfig(max_probes=50, min_probes=3, rel_tol=1e6))
    assert report.probes == 5 and report.converged


def test_routing_sums_and_counts_are_consistent():
    model = tm.mixtral()
    batches = [text_batch(seed=0, pad=5), text_batch(seed=1)]
    report = analyze(model, INFO, calib(batches), EstimatorConfig(max_probes=2, min_probes=2))
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # padding is not counted
    for layer in {e.layer for e in report.experts}:
        experts = [e for e in report.experts if e.layer == layer]
        assert all(e.layer_tokens == real_tokens for e in experts)
        assert sum(e.tokens for e in experts) == real_tokens * tm.K
        assert sum(e.frequency for e in experts) == pytest.approx(tm.K)
        assert sum(e.routing_weight for e in experts) == pytest.approx(real_tokens, rel=1e-5)  # Mixtral renormalizes


def _starve_expert_zero(model):
    """Route nothing to expert 0 of every ModuleList layer (its router score forced to the bottom)."""
    for layer in find_moe_layers(model):
        gate = layer.block.gate

        def forward(h, gate=gate):
            scores = torch.nn.functional.linear(h.reshape(-1, h.shape[-1]), gate.weight).softmax(-1)
            scores = torch.cat([torch.full_like(scores[:, :1], -1.0), scores[:, 1:]], 1)
            w, idx = torch.topk(scores, gate.top_k, dim=-1)
            return idx, w, None

        gate.forward = forward


def test_expert_without_tokens_is_flagged_not_zeroed():
    model = tm.modulelist_moe()
    _starve_expert_zero(model)
    report = analyze(model, INFO, calib([text_batch()]), EstimatorConfig(max_probes=3, min_probes=3))
    starved = [e for e in report.experts if e.expert == 0]
    assert starved and all(e.no_tokens and e.tokens == 0 and e.hessian_trace == 0.0 for e in starved)
    assert not any(e.no_tokens for e in report.experts if e.expert != 0)
    assert all(e.weight_norm_trace > 0 for e in starved)  # the data-free signal still exists


# -- coverage: spare samples for experts the chosen samples never reach -----------------------------
RARE = 5  # the only token id that expert 0 of layer 0 is routed


def _route_expert_zero_only_for(model, token=RARE):
    """Layer 0's expert 0 gets exactly the tokens equal to `token`; returns a call counter of layer 1's gate."""
    seen, calls = {}, []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(ids=kw["input_ids"]), with_kwargs=True)
    layers = find_moe_layers(model)
    gate = layers[0].block.gate

    def forward(h):
        scores = torch.nn.functional.linear(h.reshape(-1, h.shape[-1]), gate.weight).softmax(-1)
        rare = (seen["ids"].flatten() == token)[:, None]
        scores = torch.cat([torch.where(rare, 1.0, -1.0), scores[:, 1:]], 1)
        w, idx = torch.topk(scores, gate.top_k, dim=-1)
        return idx, w, None

    gate.forward = forward
    deeper = layers[1].block.gate
    deeper.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _windows(rare_at: dict[int, int], n=6, seq=16):
    """n windows of ids in [6, vocab) (no RARE), RARE placed at {window: position}."""
    w = torch.randint(6, tm.V, (n, seq), generator=torch.Generator().manual_seed(0))
    for i, pos in rare_at.items():
        w[i, pos] = RARE
    return w


def _set_with_spare(windows, chosen, batch_size=1):
    from mopeq_export.calibration import SparePool

    batch = lambda idx: {"input_ids": windows[idx], "labels": windows[idx].clone()}  # noqa: E731
    spare = SparePool(tuple(i for i in range(len(windows)) if i not in chosen), batch, lambda idx: len(idx) * windows.shape[1])
    info = CalibrationInfo("/calib", "h" * 64, "text", len(chosen), windows.shape[1], len(chosen) * windows.shape[1])
    return CalibrationSet(info, [batch(list(chosen))], spare, batch_size)


def test_coverage_adds_the_first_spare_sample_that_reaches_an_unrouted_expert():
    model = tm.modulelist_moe()
    deeper_calls = _route_expert_zero_only_for(model)
    windows = _windows({3: 7, 4: 2})  # windows 3 and 4 reach expert 0; 0 and 1 are chosen
    report = analyze(model, INFO, _set_with_spare(windows, [0, 1]), EstimatorConfig(max_probes=4, min_probes=4))
    rare = next(e for e in report.experts if e.layer == 0 and e.expert == 0)
    assert rare.tokens == 1 and not rare.no_tokens and rare.hessian_trace > 0
    assert report.calibration.coverage_samples == 1 and report.calibration.samples == 3
    assert report.calibration.tokens == 3 * 16
    assert all(e.layer_tokens == 3 * 16 for e in report.experts)  # routing stats include the added window
    # the scan of spare windows 2 and 3 stopped at layer 0: layer 1 routed only the chosen and the added batch
    # (routing statistics, then one forward per probe)
    assert len(deeper_calls) == 1 + 1 + 4


def test_coverage_ignores_padding_and_tokens_after_the_last_prediction():
    """Spare batches of two samples: RARE in (left) padding (sample 2) or at a window's last position
    (sample 3) cannot change the loss and is skipped; sample 4 reaches the loss and is the one added."""
    from mopeq_export.calibration import SparePool

    model = tm.modulelist_moe()
    _route_expert_zero_only_for(model)
    windows = _windows({2: 3, 3: 15, 4: 5})
    first = torch.zeros(len(windows), 1, dtype=torch.long)
    first[2] = 6  # sample 2: positions 0..5 are padding

    def batch(idx):
        mask = (torch.arange(16)[None] >= first[idx]).long()
        ids = windows[idx]  # padding positions keep their ids: a router may send padding anywhere
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    spare = SparePool((2, 3, 4, 5), batch, lambda idx: len(idx) * 16)
    info = CalibrationInfo("/calib", "h" * 64, "text", 2, 16, 32)
    report = analyze(model, INFO, CalibrationSet(info, [batch([0, 1])], spare, 2),
                     EstimatorConfig(max_probes=4, min_probes=4))
    rare = next(e for e in report.experts if e.layer == 0 and e.expert == 0)
    assert report.calibration.coverage_samples == 1 and rare.tokens == 1 and rare.hessian_trace > 0
    assert all(e.layer_tokens == 32 + 16 for e in report.experts)  # sample 4 was added, not 2 or 3


def test_early_stop_waits_for_every_batch_including_coverage():
    """Five batches, min_probes 2 and a tolerance met at once: the run still probes all five, so the
    expert only the last (coverage) batch reaches gets its measured, positive trace."""
    model = tm.modulelist_moe()
    _route_expert_zero_only_for(model)
    windows = _windows({6: 4}, n=8)
    data = _set_with_spare(windows, [0], batch_size=1)
    data.batches = [data.spare.collate([i]) for i in range(4)]
    data.spare = type(data.spare)((5, 6, 7), data.spare.collate, data.spare.tokens)
    report = analyze(model, INFO, data, EstimatorConfig(max_probes=50, min_probes=2, rel_tol=1e6))
    rare = next(e for e in report.experts if e.layer == 0 and e.expert == 0)
    assert report.calibration.coverage_samples == 1 and report.probes == 5 and report.converged
    assert rare.tokens == 1 and rare.hessian_trace > 0


def test_coverage_off_or_unreachable_leaves_the_expert_flagged():
    for rare_at, cover in (({3: 7}, False), ({}, True)):
        model = tm.modulelist_moe()
        _route_expert_zero_only_for(model)
        report = analyze(model, INFO, _set_with_spare(_windows(rare_at), [0, 1]),
                         EstimatorConfig(max_probes=2, min_probes=2, cover=cover))
        rare = next(e for e in report.experts if e.layer == 0 and e.expert == 0)
        assert rare.no_tokens and rare.tokens == 0 and rare.hessian_trace == 0.0
        assert report.calibration.coverage_samples == 0 and report.calibration.samples == 2


def test_text_spare_pool_is_every_window_not_chosen(tmp_path):
    from mopeq_export.calibration import load_calibration

    class Tok:  # one token per character
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    path = tmp_path / "t.txt"
    path.write_text("".join(chr(65 + i % 26) for i in range(10 * 8 + 3)))  # 10 windows of 8, 3 left over
    data = load_calibration(path, Tok(), object(), samples=4, seq_len=8, batch_size=3)
    chosen = [tuple(r.tolist()) for b in data.batches for r in b["input_ids"]]
    spare = [tuple(r.tolist()) for _, b in data.spare.batches(4) for r in b["input_ids"]]
    every = [tuple(ord(c) for c in path.read_text()[i * 8:(i + 1) * 8]) for i in range(10)]
    assert len(chosen) == 4 and sorted(chosen + spare) == sorted(every) and not set(chosen) & set(spare)
    more = data.extend([data.spare.ids[1]])
    assert more.info.samples == 5 and more.info.coverage_samples == 1 and more.info.tokens == 40
    assert [tuple(r.tolist()) for r in more.batches[-1]["input_ids"]] == [every[data.spare.ids[1]]]
    assert data.spare.ids[1] not in more.spare.ids and len(more.spare.ids) == 5


def vlm_batch():
    """Four image tokens (id 2) then text; loss on the last three tokens only, as for a VQA answer."""
    ids = torch.tensor([[2, 2, 2, 2, 5, 9, 11, 17, 23, 40], [2, 2, 2, 2, 7, 8, 30, 31, 1, 1]])
    mask = (ids != 1).long()
    labels = torch.full_like(ids, -100)
    labels[0, 7:] = ids[0, 7:]
    labels[1, 6:8] = ids[1, 6:8]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.randn(2, 3, 16, 16)}


@pytest.mark.parametrize("name", sorted(tm.ALL_MOE))
def test_every_architecture_is_analyzable(name):
    model = tm.ALL_MOE[name]()
    batch = vlm_batch() if name == "llava_olmoe" else text_batch()
    report = analyze(model, INFO, calib([batch]), EstimatorConfig(max_probes=2, min_probes=2))
    layers = find_moe_layers(model)
    assert [e.name for e in report.experts] == [n for layer in layers for n in layer.expert_names]
    for e in report.experts:
        assert all(map(torch.isfinite, map(torch.tensor, (e.hessian_trace, e.hessian_trace_stderr, e.weight_norm_trace))))
        assert set(e.quant_error) == set(EstimatorConfig().bits)
        assert e.quant_error[2] > e.quant_error[3] > e.quant_error[4] > 0
        assert e.params == 3 * tm.H * tm.I
    assert not any(p.requires_grad is False for p in model.parameters())  # gradients restored afterwards


def test_quant_errors_batched_over_experts_equal_one_by_one():
    """The GPU path batches experts through the clipping search: the same errors as one at a time."""
    layer = find_moe_layers(tm.qwen2_moe())[0]
    one = sens.quant_errors(layer, (2, 3, 4), 32, batch=1)
    many = sens.quant_errors(layer, (2, 3, 4), 32, batch=3)
    assert len(one) == len(many) == layer.num_experts
    for a, b in zip(one, many):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a)
        assert a[2] > a[3] > a[4] > 0


def test_report_round_trips_json():
    report = analyze(tm.olmoe(), INFO, calib([text_batch()]), EstimatorConfig(max_probes=2, min_probes=2))
    again = SensitivityReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report


def test_loss_uses_only_labelled_tokens():
    model = tm.olmoe()
    batch = text_batch()
    masked = dict(batch, labels=batch["labels"].clone())
    masked["labels"][:, :8] = -100
    assert float(task_loss(model, masked).detach()) != pytest.approx(float(task_loss(model, batch).detach()))
    masked["labels"][:] = -100
    with pytest.raises(sens.MopeqError, match="no labelled token"):
        task_loss(model, masked)
