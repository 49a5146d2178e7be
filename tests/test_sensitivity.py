"""Sensitivity stage: the Hutchinson estimator against exact traces, routing sums, every architecture."""

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
        got = slots.reduce(sens.hutchinson_probe(loss, slots.params, torch.Generator().manual_seed(7)))
    v = torch.cat([t.flatten() for t in sens.rademacher((gu, dn), torch.Generator().manual_seed(7))]).double()
    torch.testing.assert_close(got, _per_expert(v * (H @ v), gu, dn), rtol=1e-4, atol=1e-7)


def test_hutchinson_mean_matches_exact_hessian_trace_of_a_model():
    model = micro_mixtral()
    batch = text_batch(vocab=32, batch=2, seq=8)
    H, (gu, dn) = exact_hessian(model, batch)
    exact = _per_expert(torch.diagonal(H), gu, dn)
    cfg = EstimatorConfig(max_probes=40, min_probes=40, rel_tol=1e-9)
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
    stats = sens.RunningMean(5)
    for _ in range(1000):
        x = torch.cat([p.flatten() for p in (fused, a, b)]).double()
        stats.add(slots.reduce(sens.hutchinson_probe(0.5 * x @ A @ x, (fused, a, b), gen)).detach())
    assert bool(((stats.mean - exact).abs() <= 4 * stats.stderr).all()), (stats.mean, exact)
    assert float((stats.stderr / exact).max()) < 0.05  # tight enough to catch a wrong block split




@pytest.mark.parametrize("build", [tm.mixtral, tm.modulelist_moe])
def test_weight_norm_trace_matches_closed_form(build):
    model = build()
    layers = find_moe_layers(model)
    est = weight_norm_traces(expert_slots(layers), probes=8, seed=0)
    closed = []
    for layer in layers:
        for e in range(layer.num_experts):
            w = torch.cat([layer.get_w1(e).flatten(), layer.get_w2(e).flatten()]).double()
            closed.append((w.numel() - 1) / w.norm())
    torch.testing.assert_close(est, torch.stack(closed), rtol=1e-2, atol=0)


def test_one_hessian_vector_product_per_probe(monkeypatch):
    model = tm.qwen2_moe()
    layers = find_moe_layers(model)
    calls, forwards = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    batches = [text_batch(seed=s) for s in range(3)]
    cfg = EstimatorConfig(max_probes=5, min_probes=5, rel_tol=1e-9)
    hessian_traces(model, expert_slots(layers), batches, cfg, torch.ones(8, dtype=torch.bool))
    # per probe: one forward, one gradient (create_graph) and one Hessian-vector product, for all experts
    assert len(forwards) == 5 and len(calls) == 10


def test_probes_stop_early_when_tolerance_met():
    model = tm.olmoe()
    report = analyze(model, INFO, calib([text_batch()]), EstimatorConfig(max_probes=50, min_probes=3, rel_tol=1e6))
    assert report.probes == 3 and report.converged


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
