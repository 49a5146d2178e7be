"""Learned rounding (quantization/signround.py): its start, its loss, that it learns, and the pipeline's use."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from mopeq_export.calibration import CalibrationInfo, CalibrationSet
from mopeq_export.models.adapters import find_moe_layers
from mopeq_export.quantization.gptq import GPTQConfig
from mopeq_export.quantization.pipeline import QuantizeConfig, quantize_layers
from mopeq_export.quantization.primitives import rtn
from mopeq_export.quantization.signround import SignRoundConfig, _Learned, signround_experts, signround_layer

act = torch.nn.functional.silu


def _problem(seed: int, e=4, h=64, inter=48, n=400, k=2):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(e, 2 * inter, h, generator=g) * 0.1
    w2 = torch.randn(e, h, inter, generator=g) * 0.1
    x = torch.randn(n, h, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    rw = torch.rand(n, k, generator=g)
    return w1, w2, x, idx, rw


def _expert(x, a, b, inter):
    y = x @ a.t()
    return (act(y[:, :inter]) * y[:, inter:]) @ b.t()


def _reference_loss(w1, w2, q1, q2, x, idx, rw, delta) -> float:
    """Per token, one expert at a time: ||sum_j rw_j (E_j'(x) - E_j(x)) - delta||^2, averaged."""
    inter = w2.shape[-1]
    total = 0.0
    for t in range(x.shape[0]):
        change = torch.zeros(x.shape[1])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            change += rw[t, j] * (_expert(x[t:t + 1], q1[e], q2[e], inter) - _expert(x[t:t + 1], w1[e], w2[e], inter))[0]
        total += float(((change - (delta[t] if delta is not None else 0)) ** 2).sum())
    return total / x.shape[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_start_is_round_to_nearest_with_the_clipping_search(bits):
    w1, w2, x, idx, rw = _problem(bits)
    mats, info = signround_layer(w1, w2, x, idx, rw, None, [bits] * 4, 32, act, SignRoundConfig(iters=0))
    for e, (q1, q2) in enumerate(mats):
        for q, w in ((q1, w1[e]), (q2, w2[e])):
            r = rtn(w, bits, 32)
            assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)
    assert info["loss_learned"] == info["loss_start"]


def _autograd_fake_quant(m: _Learned) -> torch.Tensor:
    """The plain composition of torch operations the fused forward/backward must equal."""
    s, z = m._scale_zero(hard=False)
    s, z = m._expand(s), m._expand(z)
    u = m.w / s + m.v
    q = torch.minimum((u + (torch.round(u) - u).detach() + z).clamp_min(0), m.qmax)
    return (q - z) * s


@pytest.mark.parametrize("k", [256, 80])  # whole groups (the [.., G, g] view) and a partial last group
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_fake_quant_matches_autograd(k, seed):
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(6, 40, k, generator=g) * 0.05
    m = _Learned(w, torch.tensor([2, 3, 4, 2, 3, 4]), 32)
    with torch.no_grad():  # move off the start so that clipping and offsets are all in play
        m.v.copy_(torch.rand(m.v.shape, generator=g) - 0.5)
        m.alpha.copy_(0.5 + 0.5 * torch.rand(m.alpha.shape, generator=g))
        m.beta.copy_(0.5 + 0.5 * torch.rand(m.beta.shape, generator=g))
    up = torch.randn(w.shape, generator=g)
    got, want = m.forward(), _autograd_fake_quant(m)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * up).sum(), m.params()),
                    torch.autograd.grad((want * up).sum(), m.params())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (torch.sign(a) == torch.sign(b)).float().mean() > 0.999  # the step uses the signs


@pytest.mark.parametrize("with_delta", [False, True])
def test_reported_loss_is_the_layer_output_change(with_delta):
    w1, w2, x, idx, rw = _problem(7, n=60)
    delta = torch.randn(60, 64, generator=torch.Generator().manual_seed(1)) * 0.01 if with_delta else None
    mats, info = signround_layer(w1, w2, x, idx, rw, delta, [2, 3, 4, 2], 32, act, SignRoundConfig(iters=5))
    q1 = torch.stack([a.dequantize() for a, _ in mats])
    q2 = torch.stack([b.dequantize() for _, b in mats])
    ref = _reference_loss(w1, w2, q1, q2, x, idx, rw, delta)
    chosen = min(info["loss_learned"], info["loss_start"])
    assert chosen == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_learning_lowers_the_layer_loss_at_two_bits(seed):
    w1, w2, x, idx, rw = _problem(100 + seed)
    _, info = signround_layer(w1, w2, x, idx, rw, None, [2] * 4, 32, act, SignRoundConfig(iters=60, batch_tokens=64))
    assert info["loss_learned"] < 0.95 * info["loss_start"]


def test_the_learned_experts_offset_a_target_shift():
    """With delta the target moves; the learned experts move towards it (lower loss against delta than the
    round-to-nearest start), and the start's loss against delta is what the reference says."""
    w1, w2, x, idx, rw = _problem(5)
    delta = 0.02 * _expert(x, w1[0], w2[0], 48)  # a shift the experts can partly represent
    _, info = signround_layer(w1, w2, x, idx, rw, delta, [4] * 4, 32, act, SignRoundConfig(iters=60, batch_tokens=64))
    assert info["loss_learned"] < 0.9 * info["loss_start"]


def test_per_expert_scope_never_worse_than_its_start():
    w1, w2, x, _, _ = _problem(3)
    xs = [x[i::4] for i in range(4)]
    out = signround_experts(w1, w2, xs, [2, 2, 3, 3], 32, act, SignRoundConfig(iters=30, batch_tokens=64))
    assert all(new <= old for _, _, new, old in out)
    assert sum(new for _, _, new, _ in out) < sum(old for _, _, _, old in out)


def _calib(n=6, t=24) -> CalibrationSet:
    ids = torch.randint(3, tm.V, (n, t), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(CalibrationInfo("synthetic", "0" * 64, "text", n, t, n * t),
                          [{"input_ids": b, "labels": b} for b in ids.split(3)])


@pytest.mark.parametrize("arch", ["qwen2_moe", "modulelist"])
@pytest.mark.parametrize("scope,float_targets", [("layer", True), ("layer", False), ("expert", False)])
def test_pipeline_signround_quantizes_every_expert_closer_than_rtn(arch, scope, float_targets):
    """Learned rounding through the layer walk (with the float stream for float targets): every expert gets
    its width, and on the calibration tokens (what it fits; a tiny random model generalises nothing) the
    model's logits are closer to the float model's than with round-to-nearest."""
    torch.manual_seed(0)
    ref = tm.ALL_MOE[arch]()
    x = torch.cat([b["input_ids"] for b in _calib().batches])
    with torch.no_grad():
        want = ref(input_ids=x).logits
    errs = {}
    for method in ("rtn", "signround"):
        model = tm.ALL_MOE[arch]()
        model.load_state_dict(ref.state_dict())
        layers = find_moe_layers(model)
        bits = {n: 2 for l in layers for n in l.expert_names}
        cfg = QuantizeConfig(method=method, gptq=GPTQConfig(min_tokens=4),
                             signround=SignRoundConfig(iters=40, batch_tokens=32, scope=scope,
                                                       float_targets=float_targets))
        results = quantize_layers(model, layers, bits, _calib(), cfg)
        assert [r.bits for rs in results for r in rs] == list(bits.values())
        if method == "signround":
            assert any(r.method == "signround" for rs in results for r in rs)
        with torch.no_grad():
            errs[method] = float((model(input_ids=x).logits - want).norm())
    assert errs["signround"] < errs["rtn"]


def test_layer_in_expert_chunks_still_beats_rtn():
    """With too little working memory for a whole layer the experts are learned in chunks (one expert each
    here), each chunk's target carrying the change of the chunks before it."""
    from mopeq_export.models.sequential import SequentialRunner
    from mopeq_export.quantization.pipeline import quantize_sequential

    torch.manual_seed(0)
    ref = tm.qwen2_moe()
    calib = _calib()
    x = torch.cat([b["input_ids"] for b in calib.batches])
    with torch.no_grad():
        want = ref(input_ids=x).logits
    errs = {}
    for method, work in (("rtn", 1 << 30), ("signround", 1)):
        model = tm.qwen2_moe()
        model.load_state_dict(ref.state_dict())
        layers = find_moe_layers(model)
        bits = {n: 2 for l in layers for n in l.expert_names}
        cfg = QuantizeConfig(method=method, gptq=GPTQConfig(min_tokens=4),
                             signround=SignRoundConfig(iters=40, batch_tokens=32))
        runner = SequentialRunner(model, calib.batches if method != "rtn" else [], torch.device("cpu"))
        results = quantize_sequential(runner, layers, bits, cfg, work_bytes=work)
        assert all(r.bits == 2 for rs in results for r in rs)
        with torch.no_grad():
            errs[method] = float((model(input_ids=x).logits - want).norm())
    assert errs["signround"] < errs["rtn"]


def test_runner_capture_of_the_first_batches():
    """`run(first=k)` (the dense weights' GPTQ capture) sends only the first k batches through the layer and
    does not advance the stream; a pass that advances refuses it."""
    from mopeq_export.models.sequential import SequentialRunner

    model = tm.qwen2_moe()
    calib = _calib(n=9, t=16)  # three batches of three
    runner = SequentialRunner(model, calib.batches, torch.device("cpu"))
    before = [h.clone() for h in runner.hidden]
    seen = []
    with runner.loaded(0) as layer:
        handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        try:
            assert runner.run(0, layer, stop_ok=True, first=2) is None
        finally:
            handle.remove()
        with pytest.raises(ValueError):
            runner.run(0, layer, first=2)
    assert len(seen) == 2 and all(torch.equal(s, b) for s, b in zip(seen, before[:2]))
    assert all(torch.equal(h, b) for h, b in zip(runner.hidden, before))


@pytest.mark.parametrize("method,scope", [("signround", "layer"), ("signround", "expert"), ("gptq", "layer"),
                                          ("rtn", "layer")])
def test_per_matrix_widths_reach_each_matrix(method, scope):
    """A width pair (w1's, w2's) quantizes w1 and w2 at their own widths in every quantizer path, and the
    pair (b, b) is the integer b exactly (the same codes, scales and zero points)."""
    ref = tm.ALL_MOE["qwen2_moe"]()

    def run(width):
        torch.manual_seed(0)
        model = tm.ALL_MOE["qwen2_moe"]()
        model.load_state_dict(ref.state_dict())
        layers = find_moe_layers(model)
        names = [n for l in layers for n in l.expert_names]
        bits = {n: width(i) for i, n in enumerate(names)}
        cfg = QuantizeConfig(method=method, gptq=GPTQConfig(min_tokens=4),
                             signround=SignRoundConfig(iters=10, batch_tokens=32, scope=scope))
        return [r for rs in quantize_layers(model, layers, bits, _calib(), cfg) for r in rs]

    mixed = run(lambda i: (3, 2) if i % 2 else (2, 4))
    assert method in {r.method for r in mixed}  # the path under test ran (not only the RTN fallback)
    for i, r in enumerate(mixed):
        assert (r.w1.bits, r.w2.bits) == ((3, 2) if i % 2 else (2, 4))
        assert int(r.w1.codes.max()) < 2 ** r.w1.bits and int(r.w2.codes.max()) < 2 ** r.w2.bits
    assert int(max(r.w2.codes.max() for r in mixed[::2])) > 3  # the 4-bit w2 use their range
    assert int(max(r.w1.codes.max() for r in mixed[1::2])) > 3  # the 3-bit w1 too
    same, ints = run(lambda i: (3, 3) if i % 2 else (2, 2)), run(lambda i: 3 if i % 2 else 2)
    for a, b in zip(same, ints):
        for qa, qb in ((a.w1, b.w1), (a.w2, b.w2)):
            assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales) and torch.equal(qa.zeros, qb.zeros)


@pytest.mark.parametrize("v_range", [0.5, 1.5])
def test_offset_bound_decides_how_far_a_code_moves(v_range):
    """SignRound's bound 0.5 keeps every code within one level of round-to-nearest's at the learned scale and zero;
    a wider bound (`SignRoundConfig.v_range`), with its step scaled to reach it, lets codes move further."""
    from mopeq_export.quantization.signround import _descend
    w1, w2, x, _, _ = _problem(11)
    # unscaled, 60 linearly decaying steps of 0.03 sum to 0.915: past 0.5, short of 1.5 (the scaled step reaches it)
    cfg = SignRoundConfig(iters=60, v_range=v_range, lr=0.03)
    m1 = _Learned(w1, torch.tensor([3] * 4), 32, v_range)
    m2 = _Learned(w2, torch.tensor([3] * 4), 32, v_range)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(x.shape[0], 64, generator=gen)  # far from the float output: the offsets go to their bound

    def loss_of(q1, q2):
        rows = torch.randint(0, x.shape[0], (64,), generator=gen)
        y = torch.stack([_expert(x[rows], q1[e], q2[e], 48) for e in range(4)]).sum(0)
        return ((y - target[rows]) ** 2).sum()

    _descend(m1, m2, loss_of, cfg)
    assert float(m1.v.detach().abs().max()) == pytest.approx(v_range)  # the offsets reach their bound, not past it
    s, z = m1._scale_zero(hard=True)
    nearest = (torch.round(m1.w / m1._expand(s)) + m1._expand(z)).clamp(0, 7)
    moved = int((m1.export()[0].float() - nearest).abs().max())
    assert moved == 1 if v_range == 0.5 else moved == 2


def test_step_per_bit_scales_each_width():
    """`lr_per_bit` multiplies an expert's step by lr_per_bit ** (bits - 2): at 0 only the 2-bit experts move off the
    start, at 1 every width moves."""
    w1, w2, x, idx, rw = _problem(12)
    moved = {}
    for per_bit in (0.0, 1.0):
        start, _ = signround_layer(w1, w2, x, idx, rw, None, [2, 3, 4, 2], 32, act, SignRoundConfig(iters=0))
        cfg = SignRoundConfig(iters=40, batch_tokens=64, lr_per_bit=per_bit)
        b1, b2 = _Learned(w1, torch.tensor([2, 3, 4, 2]), 32), _Learned(w2, torch.tensor([2, 3, 4, 2]), 32)
        from mopeq_export.quantization.signround import _descend
        gen = torch.Generator().manual_seed(0)

        def loss_of(q1, q2):
            rows = torch.randint(0, x.shape[0], (64,), generator=gen)
            y = torch.stack([_expert(x[rows], q1[e], q2[e], 48) for e in range(4)])
            ref = torch.stack([_expert(x[rows], w1[e], w2[e], 48) for e in range(4)])
            return ((y - ref) ** 2).sum()

        _descend(b1, b2, loss_of, cfg)
        codes = b1.export()[0]
        moved[per_bit] = [not torch.equal(codes[e], start[e][0].codes) for e in range(4)]
    assert moved[0.0] == [True, False, False, True]
    assert moved[1.0] == [True, True, True, True]
