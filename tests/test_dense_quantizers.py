"""The dense weights' calibrated quantizers (quantization/stage.py): lm_head by GPTQ on the final hidden
states (`QuantizeConfig.head_gptq`), learned rounding of the shared experts (`QuantizeConfig.mlp_method`), and
the order of the shared experts against the routed ones (`QuantizeConfig.shared_first`). A tiny Qwen2-MoE
with a shared expert and an untied lm_head, quantized from disk as the build does."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mopeq_export.calibration import load_calibration
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.models.sequential import SequentialRunner
from mopeq_export.quantization.dense import DEFAULT_DENSE
from mopeq_export.quantization.checkpoint import RECORD
from mopeq_export.quantization.gptq import GPTQConfig
from mopeq_export.quantization.loader import load_quantized
from mopeq_export.quantization.pipeline import QuantizeConfig
from mopeq_export.quantization.signround import SignRoundConfig
from mopeq_export.quantization.stage import _float_target_map, _head_gram, final_norm
from tiny_checkpoint import quantize_random_plan, save_tiny, save_tiny_qwen2_moe, write_text

SAMPLES, SEQ = 8, 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("denseq")
    return save_tiny_qwen2_moe(root / "model"), write_text(root / "calib.txt")


def _calib(src, calib):
    model, _ = load_model(src, device="cpu", dtype=torch.float32)
    return model, load_calibration(calib, load_tokenizer(src), model.config, samples=SAMPLES, seq_len=SEQ)


def _quantize(tiny, out, **over):
    src, calib = tiny
    out.parent.mkdir(parents=True, exist_ok=True)
    method = over.pop("method", "gptq")
    cfg = QuantizeConfig(method=method, gptq=GPTQConfig(min_tokens=4),
                         signround=SignRoundConfig(iters=60, batch_tokens=64), **over)
    return quantize_random_plan(src, out, dense=DEFAULT_DENSE, cfg=cfg, calib=calib, samples=SAMPLES, seq_len=SEQ)


def _inputs_of(model, module, batches) -> torch.Tensor:
    """What `module` receives over the batches in the model's own forward (padding dropped)."""
    seen = []

    def hook(_m, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                rows = len(seen)
                model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
                mask = b.get("attention_mask")
                if mask is not None:
                    seen[rows] = seen[rows][mask.reshape(-1).bool()]
    finally:
        h.remove()
    return torch.cat(seen)


def test_head_gram_is_what_lm_head_receives(tiny):
    """After every decoder layer ran (`final_pass`), the final norm of the stream is lm_head's input: its Gram
    matrix equals the one of lm_head's inputs in the model's own forward."""
    model, calib = _calib(*tiny)
    assert final_norm(model, "model.layers")[0] == "model.norm"
    want = _inputs_of(model, model.lm_head, calib.batches).double()
    runner = SequentialRunner(model, calib.batches, torch.device("cpu"))
    for i in range(len(runner.stack)):
        with runner.loaded(i) as layer:
            runner.run(i, layer)
    gram, cross = _head_gram(model, runner, None)
    assert cross is None  # no float stream asked for
    assert gram.n == want.shape[0]
    torch.testing.assert_close(gram.xtx, want.t() @ want, rtol=1e-5, atol=1e-6)


def _dequantized(model, path) -> torch.Tensor:
    mod = model.get_submodule(path)
    x = torch.eye(mod.in_features)
    with torch.no_grad():
        y = mod(x)
    if getattr(mod, "bias", None) is not None:
        y = y - mod.bias
    return y.t().float()  # [out, in]


def test_head_gptq_lowers_lm_head_output_error(tiny, tmp_path):
    """GPTQ on the final hidden states gives lm_head a smaller output error on them, tr((W'-W) H (W'-W)^T),
    than round-to-nearest with the clipping search; both 4-bit, both recorded."""
    model, calib = _calib(*tiny)
    x = _inputs_of(model, model.lm_head, calib.batches)
    w = model.lm_head.weight.detach().float()
    err = {}
    for head_gptq in (False, True):
        qdir = _quantize(tiny, tmp_path / f"h{int(head_gptq)}" / "q", head_gptq=head_gptq)
        rec = json.loads((qdir / RECORD).read_text())
        assert [d["bits"] for d in rec["dense"] if d["path"] == "lm_head"] == [4]
        assert rec["config"]["head_gptq"] is head_gptq
        wq = _dequantized(load_quantized(qdir, tiny[0], device="cpu"), "lm_head")
        err[head_gptq] = float(((x @ (wq - w).t()) ** 2).sum())
    assert err[True] < 0.9 * err[False]


def test_shared_expert_learned_rounding_beats_round_to_nearest(tiny, tmp_path):
    """`mlp_method="signround"`: the shared expert's gate/up/down, fitted together to its float output, are
    packed at the plan's width and give a smaller output error on the tokens it receives than its start,
    round-to-nearest with the clipping search (a gate/up mix-up would be far worse than either)."""
    from mopeq_export.quantization.primitives import rtn

    src, _ = tiny
    model, calib = _calib(*tiny)
    path = "model.layers.0.mlp.shared_expert"
    qdir = _quantize(tiny, tmp_path / "q", mlp_method="signround")
    rec = json.loads((qdir / RECORD).read_text())
    assert sorted(d["path"] for d in rec["dense"] if d["path"].startswith(path)) == \
        [f"{path}.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    q = load_quantized(qdir, src, device="cpu")
    x = _inputs_of(q, q.get_submodule(path), calib.batches)
    float_mlp = model.get_submodule(path)
    rtn_mlp = copy.deepcopy(float_mlp)
    with torch.no_grad():
        for n in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(rtn_mlp, n)
            lin.weight.copy_(rtn(lin.weight.float(), 4, 32).dequantize())
        ref = float_mlp(x)
        err = {k: float((m(x) - ref).norm() / ref.norm()) for k, m in
               (("learned", q.get_submodule(path)), ("rtn", rtn_mlp))}
    assert err["learned"] < err["rtn"] < 0.2, err


def test_shared_first_leaves_gptq_unchanged(tiny, tmp_path):
    """The shared expert's inputs do not depend on the routed experts, so with GPTQ everywhere quantizing it
    before them changes no packed tensor."""
    from safetensors.numpy import load_file

    a = _quantize(tiny, tmp_path / "last" / "q")
    b = _quantize(tiny, tmp_path / "first" / "q", shared_first=True)
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        ta, tb = load_file(a / f), load_file(b / f)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert (ta[k] == tb[k]).all(), f"{f}:{k}"


def test_float_target_head_maps_own_hidden_states_to_float_logits():
    """When the float model's hidden states are a linear map of this model's (x_f = M x), the float-target head
    W* = W A G^-1 reproduces the float logits W x_f from x; and with x_f = x it is W itself."""
    from mopeq_export.quantization.gptq import Gram

    g = torch.Generator().manual_seed(5)
    n, h, v = 4000, 24, 40
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    m = torch.eye(h, dtype=torch.float64) + 0.2 * torch.randn(h, h, generator=g, dtype=torch.float64)
    xf = x @ m.t()
    w = torch.randn(v, h, generator=g)
    gram = Gram(h)
    gram.add(x)
    star = (w.double() @ _float_target_map(gram, xf.t() @ x, damp=1e-9)).float()
    torch.testing.assert_close((x.float() @ star.t()), (xf.float() @ w.t()), rtol=1e-3, atol=1e-3)
    same = (w.double() @ _float_target_map(gram, x.t() @ x, damp=1e-9)).float()
    torch.testing.assert_close(same, w, rtol=1e-4, atol=1e-4)


def test_head_float_target_default_follows_the_model_kind(tiny, tmp_path):
    """None, the default, is resolved by the quantize stage from the model's kind (HEAD_FLOAT_TARGET: on for
    a text model, off for a vision-language one) and recorded resolved; an explicit choice is kept."""
    assert QuantizeConfig().head_float_target is None
    (tmp_path / "t").mkdir()
    (tmp_path / "v").mkdir()
    text = quantize_random_plan(tiny[0], tmp_path / "t" / "q", cfg=QuantizeConfig(method="rtn"))
    vlm = quantize_random_plan(save_tiny("llava_olmoe", tmp_path / "vlm"), tmp_path / "v" / "q",
                               cfg=QuantizeConfig(method="rtn"))
    assert json.loads((text / RECORD).read_text())["config"]["head_float_target"] is True
    assert json.loads((vlm / RECORD).read_text())["config"]["head_float_target"] is False
    assert QuantizeConfig(head_float_target=True).for_kind(is_vlm=True).head_float_target is True
    assert QuantizeConfig(head_float_target=False).for_kind(is_vlm=False).head_float_target is False


def test_head_float_target_brings_calibration_logits_closer_to_float(tiny, tmp_path):
    """`head_float_target` under learned rounding: everything but lm_head is quantized identically, and the
    quantized model's logits on the calibration set are closer (squared error) to the float model's than with
    the default head, which GPTQ fits to this model's own hidden states."""
    src, _ = tiny
    model, calib = _calib(*tiny)
    err, recs = {}, {}
    for flag in (False, True):
        qdir = _quantize(tiny, tmp_path / f"f{int(flag)}" / "q", method="signround", head_float_target=flag)
        recs[flag] = json.loads((qdir / RECORD).read_text())
        assert recs[flag]["config"]["head_float_target"] is flag
        q = load_quantized(qdir, src, device="cpu")
        total = 0.0
        with torch.no_grad():
            for b in calib.batches:
                total += float(((q(**b).logits - model(**b).logits) ** 2).sum())
        err[flag] = total
    assert recs[False]["experts"] == recs[True]["experts"]
    assert err[True] < err[False], err


@pytest.mark.parametrize("method", ["gptq", "signround"])
def test_expert_balanced_calibration_through_the_stage(tiny, tmp_path, method):
    """`balance_tokens` through the quantize stage (layer-by-layer loading, dense weights quantized): with a
    target above every count, every MoE layer's experts receive every (token, slot) of the `balance_samples`
    spare windows beside the calibration set's, the record says so, and the checkpoint loads and runs."""
    recs = {}
    for bal in (0, 10 ** 6):
        qdir = _quantize(tiny, tmp_path / f"b{bal}" / "q", method=method, balance_tokens=bal, balance_samples=4)
        recs[bal] = json.loads((qdir / RECORD).read_text())
        assert recs[bal]["config"]["balance_tokens"] == bal
        out = load_quantized(qdir)(input_ids=torch.randint(3, 50, (1, 12))).logits
        assert torch.isfinite(out).all()
    tokens = {b: [e["tokens"] for e in r["experts"]] for b, r in recs.items()}
    layers, top_k = 2, 2  # the tiny Qwen2-MoE: 2 MoE layers, 2 experts per token
    assert sum(tokens[10 ** 6]) == sum(tokens[0]) + layers * 4 * SEQ * top_k
