"""Quantizers (RTN with clipping search, GPTQ), the layer-by-layer pipeline, QDIR and load_quantized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models as tm
from mopeq_export.calibration import CalibrationInfo, CalibrationSet
from mopeq_export.errors import MopeqError
from mopeq_export.models.adapters import find_moe_layers
from mopeq_export.quantization import packing, reference
from mopeq_export.quantization.gptq import GPTQConfig, Gram, gptq
from mopeq_export.quantization.pipeline import QuantizeConfig, quantize_layers
from mopeq_export.quantization.primitives import choose_params, dequantize, quantize_codes, rtn
from mopeq_export.quantization.signround import SignRoundConfig

TEXT_MOE = Path(__file__).resolve().parents[2] / "shared" / "models" / "text-moe"


def _err(q, w):
    return float(((q.dequantize() - w) ** 2).sum())


@pytest.mark.parametrize("k,g", [(160, 32), (160, 128), (192, 64), (100, 32), (33, 32)])
def test_rtn_shapes_ranges_and_partial_groups(k, g):
    torch.manual_seed(0)
    w = torch.randn(7, k)
    for b in (2, 3, 4, 8):
        q = rtn(w, b, g)
        assert q.codes.shape == (7, k) and q.scales.shape == (7, -(-k // g)) and q.scales.dtype == torch.float16
        assert int(q.codes.max()) <= 2 ** b - 1
    errs = [_err(rtn(w, b, g), w) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]


def test_clipping_search_never_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(16, 128) ** 3  # heavy tails: clipping should help
    for b in (2, 3):
        s0, z0 = choose_params(w, b, 32, clip_grid=(1.0,))
        minmax = float(((dequantize(quantize_codes(w, s0, z0, b, 32), s0.half(), z0, 32) - w) ** 2).sum())
        assert _err(rtn(w, b, 32), w) < minmax


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(3, 64)
    w[1] = 0.37
    w[2, :32] = -1.25
    q = rtn(w, 2, 32)
    assert torch.allclose(q.dequantize(), w, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), k=st.integers(1, 100), seed=st.integers(0, 2 ** 16))
def test_torch_unpack_matches_numpy_reference(bits, rows, k, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2 ** bits, size=(rows, k), dtype=np.uint8)
    words = packing.pack_codes(codes, bits)
    got = reference.unpack_codes(torch.from_numpy(words), bits, k)
    np.testing.assert_array_equal(got.numpy(), codes)


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with strong cross-feature correlation (low rank plus noise), as in real layers."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, k, generator=g)
    return torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(act_order):
    torch.manual_seed(2)
    w = torch.randn(48, 96) * 0.05
    x = _correlated_inputs(512, 96)
    gram = Gram(96)
    gram.add(x)
    for b in (2, 3, 4):
        q_gptq = gptq(w, gram, b, 32, GPTQConfig(act_order=act_order))
        q_rtn = rtn(w, b, 32)
        out = lambda q: float(((x @ (q.dequantize() - w).t()) ** 2).sum())  # noqa: E731
        assert out(q_gptq) < 0.9 * out(q_rtn), b
        assert int(q_gptq.codes.max()) <= 2 ** b - 1


def test_gptq_handles_dead_columns_and_partial_group():
    torch.manual_seed(3)
    w = torch.randn(8, 70)
    x = torch.randn(200, 70)
    x[:, 5] = 0  # an input that never fires
    gram = Gram(70)
    gram.add(x)
    q = gptq(w, gram, 3, 64, GPTQConfig())
    assert q.codes.shape == (8, 70) and torch.isfinite(q.dequantize()).all()


def _calib(model, n=6, t=24, vocab=tm.V) -> CalibrationSet:
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(CalibrationInfo("synthetic", "0" * 64, "text", n, t, n * t),
                          [{"input_ids": b, "labels": b} for b in ids.split(3)])


def _write_and_install(model, layers, results, tmp_path):
    """The layers' packed tensors as a quantized checkpoint in tmp_path, then installed into the model (the
    loader's path: read_checkpoint + install_packed)."""
    from mopeq_export.quantization.checkpoint import (SCHEMA_VERSION, layer_record, layer_tensors, read_checkpoint,
                                                      to_json_layers, write_checkpoint)
    from mopeq_export.quantization.loader import install_packed

    tensors = {f"{l.experts_path}.{n}": t for l, rs in zip(layers, results) for n, t in layer_tensors(rs).items()}
    rec = {"schema_version": SCHEMA_VERSION, "layout_version": packing.LAYOUT_VERSION, "group_size": 32,
           "model": {"path": "x", "name": "x", "architecture": "x", "model_type": "x", "is_vlm": False,
                     "config_sha256": "0", "weights_sha256": "0"},
           "layers": to_json_layers([layer_record(l, rs) for l, rs in zip(layers, results)])}
    write_checkpoint(tmp_path, rec, tensors, {})
    return install_packed(model, read_checkpoint(tmp_path))


@pytest.mark.parametrize("arch", ["qwen2_moe", "modulelist"])
def test_pipeline_quantizes_every_expert_and_packed_model_matches(arch, tmp_path):
    from mopeq_export.quantization.checkpoint import layer_tensors

    model = tm.ALL_MOE[arch]()
    layers = find_moe_layers(model)
    bits = {n: (2, 3, 4)[i % 3] for i, n in enumerate(n for l in layers for n in l.expert_names)}
    cfg = QuantizeConfig(method="gptq", group_size=32, gptq=GPTQConfig(min_tokens=4))
    results = quantize_layers(model, layers, bits, _calib(model), cfg)
    assert [r.bits for rs in results for r in rs] == list(bits.values())
    assert all(r.method == "gptq" for rs in results for r in rs if r.tokens >= 4)
    # the fake-quant model (dequantized weights written back) is the reference for the packed model
    x = torch.randint(3, tm.V, (2, 9))
    with torch.no_grad():
        fake = model(input_ids=x).logits
    for l, rs in zip(layers, results):  # layout v2: codes, scales and zeros of every matrix in 16-row tiles
        t = layer_tensors(rs)
        h, i, e = l.hidden_size, l.intermediate_size, l.num_experts
        assert t["w1.scales"].shape == (e, 2 * i // 16, packing.num_groups(h, 32), 16)
        assert t["w2.zeros"].shape == (e, h // 16, packing.num_groups(i, 32), 16)
        assert t["w1.q2"].shape[1:] == (2 * i // 16, packing.num_blocks(h) * 2, 16)
        for n, r in enumerate(rs):
            np.testing.assert_array_equal(packing.untile_rows(t["w1.scales"][n]), r.w1.scales.numpy())
            np.testing.assert_array_equal(packing.untile_rows(t["w2.zeros"][n]), r.w2.zeros.numpy())
            words, _, _ = packing.expert_matrix(t, "w1", n, [x.bits for x in rs])
            np.testing.assert_array_equal(packing.unpack_codes(words, r.bits, h), r.w1.codes.numpy())
    packed = _write_and_install(model, layers, results, tmp_path)
    with torch.no_grad():
        got = packed(input_ids=x).logits
    torch.testing.assert_close(got, fake, rtol=1e-4, atol=1e-4)


def test_modulelist_views_split_gate_and_up_inside_a_tile(tmp_path):
    """ModuleList experts with I = 24: rows 0-23 of w1 (gate) and 24-47 (up) share the tile of rows 16-31; the
    loader's PackedLinears (untiled row slices) give the fake-quant model's logits, and the whole packed layer
    (what the export computes from) the block's own output."""
    from mopeq_export.quantization.loader import PACKED_ATTR

    model = tm.modulelist_moe()
    torch.manual_seed(2)
    for layer in model.model.layers:
        layer.mlp = tm.DeepseekStyleMoE(tm.H, 24, tm.E, tm.K)
    layers = find_moe_layers(model)
    assert layers[0].intermediate_size == 24
    bits = {n: (2, 3, 4, 8)[k % 4] for k, n in enumerate(n for l in layers for n in l.expert_names)}
    results = quantize_layers(model, layers, bits, None, QuantizeConfig(method="rtn", group_size=32))
    x = torch.randint(3, tm.V, (2, 9))
    with torch.no_grad():
        fake = model(input_ids=x).logits
    packed = _write_and_install(model, layers, results, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=x).logits, fake, rtol=1e-4, atol=1e-4)
        block = packed.model.layers[0].mlp
        h = torch.randn(5, tm.H)
        idx, w, _ = block.gate(h)
        whole = getattr(block, PACKED_ATTR)(h, idx, w.to(h.dtype)) + block.shared_experts(h)
        torch.testing.assert_close(whole, block(h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("h,i", [(64, 48), (48, 24)])  # I = 24: the gate/up split falls inside a 16-row tile
def test_torch_reference_matches_numpy_reference(h, i):
    from packed_layers import random_layer

    rng = np.random.default_rng(h + i)
    bits, g = [2, 3, 4, 8, 2], 32
    layer = random_layer(rng, bits, h, i, g)
    x = rng.standard_normal((6, h)).astype(np.float32)
    idx, w = rng.integers(0, len(bits), (6, 2)), rng.uniform(0.1, 1, (6, 2)).astype(np.float32)
    want = packing.moe_experts_reference(x, idx, w, layer, bits, g)
    got = reference.PackedLayer({n: torch.from_numpy(a) for n, a in layer.items()}, bits, g, "silu")(
        torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(w))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_checkpoint_of_layout_1_is_refused_with_the_quantize_to_rerun(tmp_path):
    from packed_layers import random_layer

    from mopeq_export.quantization.checkpoint import (SCHEMA_VERSION, LayerRecord, read_checkpoint, to_json_layers,
                                                      write_checkpoint)

    bits = [2, 4]
    layer = random_layer(np.random.default_rng(0), bits, 32, 24, 32)
    lrec = LayerRecord("model.layers.0.mlp.experts", "model.layers.0.mlp", 0, 2, 32, 24, "silu", tuple(bits))
    rec = {"schema_version": SCHEMA_VERSION, "layout_version": packing.LAYOUT_VERSION, "group_size": 32,
           "method": "gptq", "plan": {"path": "/p/plan.json"},
           "model": {"path": "/m/model", "name": "x", "architecture": "x", "model_type": "x", "is_vlm": False,
                     "config_sha256": "0", "weights_sha256": "0"},
           "layers": to_json_layers([lrec])}
    tensors = {f"{lrec.experts_path}.{n}": t for n, t in layer.items()}
    (tmp_path / "v2").mkdir()
    write_checkpoint(tmp_path / "v2", rec, tensors, {})
    ckpt = read_checkpoint(tmp_path / "v2")
    assert ckpt.layer_tensors(lrec)["w1.scales"].shape == (2, 3, 1, 16)
    old = tmp_path / "v1"
    shutil.copytree(tmp_path / "v2", old)
    (old / "quantized.json").write_text(json.dumps(dict(json.loads((old / "quantized.json").read_text()),
                                                        layout_version=1)))
    with pytest.raises(MopeqError, match=r"layout version 1 is not supported .*reads version 2.*rebuild the quantized "
                                         r"checkpoint: mopeq-export quantize --model /m/model --plan /p/plan.json "
                                         r"--method gptq --group-size 32 --out \S*v1 --force"):
        read_checkpoint(old)


def test_quantize_refuses_rows_not_multiple_of_16_before_any_work(tmp_path, monkeypatch):
    """Layout v2 tiles expert matrices by 16 rows: a model with H = 40 (w2's rows) is refused when the quantize
    stage has only built the skeleton (no calibration read, no output written); likewise 2I = 40."""
    from transformers import Qwen2MoeConfig

    from mopeq_export.models.loading import model_info
    from mopeq_export.quantization import stage

    def calibration_read(*a, **k):
        raise AssertionError("the calibration was read before the refusal")

    monkeypatch.setattr(stage, "load_calibration", calibration_read)
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text\n" * 8)
    for name, h, i in (("h40", 40, 32), ("i20", 32, 20)):
        cfg = Qwen2MoeConfig(**{**tm._COMMON, "hidden_size": h}, intermediate_size=64, moe_intermediate_size=i,
                             num_experts=tm.E, num_experts_per_tok=tm.K, shared_expert_intermediate_size=64)
        model_dir = tmp_path / name
        tm._causal(cfg).to(torch.float16).save_pretrained(model_dir)
        names = [n for l in find_moe_layers(tm._causal(cfg)) for n in l.expert_names]
        plan = tmp_path / f"{name}.json"
        plan.write_text(json.dumps({"kind": "mopeq.bitplan", "experts": {n: 2 for n in names}, "method": "test",
                                    "avg_bits": 2.0, "model": {"weights_sha256": model_info(model_dir).weights_sha256}}))
        rows = h if name == "h40" else 2 * i
        with pytest.raises(MopeqError, match=rf"has {rows} rows; layout v2 stores expert matrices in tiles of 16 rows"):
            stage.run_quantize(model_dir, plan, tmp_path / f"q-{name}", calib=calib,
                               cfg=QuantizeConfig(method="gptq"), device="cpu")
        assert not (tmp_path / f"q-{name}").exists()
        with pytest.raises(MopeqError, match="multiples of 16"):  # what a build checks before its analysis
            stage.check_model_rows(model_dir)


def test_unknown_method_and_bad_width_are_refused():
    model = tm.mixtral()
    layers = find_moe_layers(model)
    bits = {n: 2 for l in layers for n in l.expert_names}
    with pytest.raises(MopeqError, match="unknown quantization method"):
        quantize_layers(model, layers, bits, None, QuantizeConfig(method="awq"))
    for g in (48, 4096, 0):  # the format reads any multiple of 32; the quantizer offers 32/64/128/256
        with pytest.raises(MopeqError, match="is not offered"):
            quantize_layers(model, layers, bits, None, QuantizeConfig(method="rtn", group_size=g))
    with pytest.raises(MopeqError, match="unsupported width"):
        quantize_layers(model, layers, {n: 5 for n in bits}, None, QuantizeConfig(method="rtn"))


# -- end to end on the reference text model (RTN: fast) ------------------------------------------
@pytest.fixture(scope="module")
def text_plan(tmp_path_factory):
    from mopeq_export.models.loading import load_model

    if not TEXT_MOE.is_dir():
        pytest.skip("../shared/models/text-moe not present")
    model, info = load_model(TEXT_MOE)
    names = [n for l in find_moe_layers(model) for n in l.expert_names]
    p = tmp_path_factory.mktemp("plan") / "plan.json"
    p.write_text(json.dumps({"kind": "mopeq.bitplan", "experts": {n: (2, 3, 4)[i % 3] for i, n in enumerate(names)}, "method": "test",
                             "avg_bits": 3.0, "model": {"weights_sha256": info.weights_sha256}}))
    return p


@pytest.fixture(scope="module")
def text_qdir(text_plan, tmp_path_factory):
    from mopeq_export.quantization.stage import run_quantize

    out = tmp_path_factory.mktemp("q") / "qdir"
    run_quantize(TEXT_MOE, text_plan, out, calib=None, cfg=QuantizeConfig(method="rtn"))
    return out


@pytest.mark.slow
def test_quantize_text_moe_record_and_sizes(text_qdir):
    rec = json.loads((text_qdir / "quantized.json").read_text())
    assert len(rec["experts"]) == 96 and rec["group_size"] == 32
    s = rec["sizes"]
    assert abs(s["nominal_bits"] - 3.0) < 1e-9
    # effective bits: codes + (16 + 8) / 32 bits of scale and zero per weight, no padding (160 and 256 are x32)
    assert abs(s["effective_bits"] - 3.75) < 0.01
    assert s["model_bytes"] < s["model_bytes_float16"]


@pytest.mark.slow
def test_load_quantized_runs_and_tampering_is_refused(text_qdir, tmp_path):
    from mopeq_export.quantization.loader import load_quantized

    model = load_quantized(text_qdir)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 4096, (1, 12))).logits
    assert torch.isfinite(logits).all()
    bad = tmp_path / "bad"
    shutil.copytree(text_qdir, bad)
    layer = next((bad / "experts").iterdir())
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(MopeqError, match="does not match its recorded size/hash"):
        load_quantized(bad)


@pytest.mark.slow
def test_plan_for_another_model_or_incomplete_is_refused(text_plan, tmp_path):
    from mopeq_export.quantization.stage import run_quantize

    plan = json.loads(text_plan.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(plan, model={"weights_sha256": "f" * 64})))
    with pytest.raises(MopeqError, match="made for another model"):
        run_quantize(TEXT_MOE, other, tmp_path / "o1", calib=None, cfg=QuantizeConfig(method="rtn"))
    missing = tmp_path / "missing.json"
    experts = dict(plan["experts"])
    experts.pop(next(iter(experts)))
    missing.write_text(json.dumps(dict(plan, experts=experts)))
    with pytest.raises(MopeqError, match="misses 1 of the model's experts"):
        run_quantize(TEXT_MOE, missing, tmp_path / "o2", calib=None, cfg=QuantizeConfig(method="rtn"))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(dict(plan, experts={**plan["experts"], "model.layers.9.mlp.experts.0": 2})))
    with pytest.raises(MopeqError, match="does not have"):
        run_quantize(TEXT_MOE, extra, tmp_path / "o3", calib=None, cfg=QuantizeConfig(method="rtn"))
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.is_dir())


@pytest.mark.slow
def test_quantize_dense_option_packs_shared_experts_and_attention(text_plan, tmp_path):
    from mopeq_export.models.loading import load_model
    from mopeq_export.quantization.loader import load_quantized
    from mopeq_export.quantization.reference import PackedLinear
    from mopeq_export.quantization.stage import run_quantize

    out = tmp_path / "q8"
    res = run_quantize(TEXT_MOE, text_plan, out, calib=None, cfg=QuantizeConfig(method="rtn"), dense_bits=8,
                       dense_attention=True)
    dense = res.record["dense"]
    assert any(".shared_expert." in d["path"] for d in dense) and any(".self_attn.q_proj" in d["path"] for d in dense)
    model = load_quantized(out)
    assert isinstance(model.get_submodule(dense[0]["path"]), PackedLinear)
    with pytest.raises(MopeqError, match="4 or 8"):
        run_quantize(TEXT_MOE, text_plan, tmp_path / "q3", calib=None, cfg=QuantizeConfig(method="rtn"), dense_bits=3)
    # 8-bit dense layers barely move the logits relative to the experts-only checkpoint's float16 dense layers
    ref, _ = load_model(TEXT_MOE)
    x = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits, model(input_ids=x).logits
    assert torch.isfinite(b).all() and float((a - b).abs().max()) < 0.5 * float(a.abs().max())


@pytest.mark.slow
def test_evaluate_cli_writes_a_report(text_qdir, tmp_path):
    from typer.testing import CliRunner

    from mopeq_export.cli import app

    data = TEXT_MOE.parents[1] / "data" / "text_dev.txt"
    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["evaluate", "--model", str(TEXT_MOE), "--quantized", str(text_qdir), "--data",
                                   str(data), "--max-windows", "2", "--out", str(report)])
    assert res.exit_code == 0, res.output
    m = json.loads(report.read_text())["metrics"]
    assert m["windows"] == 2 and m["tokens"] == 2 * 255 and m["ppl"] > m["ppl_ref"] * 0.9 and 0 < m["top1_agreement"] <= 1
    bad = CliRunner().invoke(app, ["evaluate", "--model", str(TEXT_MOE), "--quantized", str(tmp_path / "nope"),
                                   "--data", str(data)])
    assert bad.exit_code != 0


# -- expert-balanced calibration ------------------------------------------------------------------
def test_balance_routed_fills_each_shortfall_with_rows_routed_alone():
    """Fresh random routing: every expert under the target gains min(shortfall, its candidate tokens) rows,
    each a copy of a candidate token routed to that expert alone with its candidate routing weight; experts at
    or over the target and the original rows are untouched."""
    from mopeq_export.quantization.pipeline import Routed, balance_routed

    seed = int(torch.randint(0, 2 ** 31, (1,)))
    print("seed", seed)  # shown with a failure
    g = torch.Generator().manual_seed(seed)
    e, k, h = 6, 2, 5

    def routed(n, p):
        idx = torch.stack([torch.multinomial(p, k, generator=g) for _ in range(n)])
        return Routed(torch.randn(n, h, generator=g), idx, torch.rand(n, k, generator=g))

    skew = torch.tensor([8.0, 4, 2, 1, 0.3, 0.05])
    base, extra = routed(60, skew), routed(40, torch.ones(e))
    target = 25
    out, added = balance_routed(base, extra, e, target)
    count = lambda r, i: int((r.idx == i).any(-1).sum())  # noqa: E731
    assert torch.equal(out.x[:60], base.x) and torch.equal(out.idx[:60], base.idx) and torch.equal(out.w[:60], base.w)
    assert added == out.x.shape[0] - 60
    for i in range(e):
        want = count(base, i) + max(0, min(target - count(base, i), count(extra, i)))
        assert count(out, i) == want
    new_idx, new_w, new_x = out.idx[60:], out.w[60:], out.x[60:]
    assert ((new_idx >= 0).sum(-1) == 1).all() and (new_idx[:, 1:] == -1).all() and (new_w[:, 1:] == 0).all()
    for row in range(added):  # each added row is a candidate token of that expert, with its weight
        ex = int(new_idx[row, 0])
        match = [(j, s) for j in range(40) for s in range(k) if int(extra.idx[j, s]) == ex
                 and torch.equal(extra.x[j], new_x[row])]
        assert match and any(float(extra.w[j, s]) == float(new_w[row, 0]) for j, s in match)
    assert balance_routed(base, extra, e, 0) == (base, 0)


def _calib_with_spare(n=6, spare=6, t=24) -> CalibrationSet:
    from mopeq_export.calibration import SparePool

    ids = torch.randint(3, tm.V, (n + spare, t), generator=torch.Generator().manual_seed(0))
    pool = ids[n:]
    return CalibrationSet(CalibrationInfo("synthetic", "0" * 64, "text", n, t, n * t),
                          [{"input_ids": b, "labels": b} for b in ids[:n].split(3)],
                          SparePool(tuple(range(spare)), lambda w: {"input_ids": pool[w], "labels": pool[w]},
                                    lambda w: len(w) * t), batch_size=3)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])  # deepseek_v3: a dense first decoder layer
@pytest.mark.parametrize("method", ["gptq", "signround"])
def test_expert_balanced_calibration_adds_the_candidates_tokens(method, arch):
    """With a target above every expert's count, every expert of every MoE layer gets exactly the tokens the
    spare samples route to it through the quantized layers before it (the candidate stream advances with the
    calibration set): per expert, the count is the quantized model's routing of the calibration set plus its
    routing of the spare samples (a layer's router sees only the layers before it, all quantized by then).
    Off, the counts are the calibration set's alone."""
    from mopeq_export.sensitivity import routing_stats

    ref = tm.ALL_MOE[arch]()
    calib = _calib_with_spare()
    spare = calib.spare_batches(6)
    tokens, routing = {}, {}
    for bal in (0, 10 ** 6):
        model = tm.ALL_MOE[arch]()
        model.load_state_dict(ref.state_dict())
        layers = find_moe_layers(model)
        bits = {n: 2 for l in layers for n in l.expert_names}
        cfg = QuantizeConfig(method=method, gptq=GPTQConfig(min_tokens=4), balance_tokens=bal, balance_samples=6,
                             signround=SignRoundConfig(iters=5, batch_tokens=16))
        tokens[bal] = [r.tokens for rs in quantize_layers(model, layers, bits, calib, cfg) for r in rs]
        routing[bal] = (routing_stats(model, layers, calib.batches).tokens,
                        routing_stats(model, layers, spare).tokens)  # the quantized model's routing
    assert tokens[0] == routing[0][0].tolist()
    assert tokens[10 ** 6] == (routing[10 ** 6][0] + routing[10 ** 6][1]).tolist()
    assert int(routing[10 ** 6][1].sum()) > 0
    with pytest.raises(MopeqError, match="balance"):
        quantize_layers(model, layers, bits, calib, QuantizeConfig(method="gptq", balance_tokens=-1))
