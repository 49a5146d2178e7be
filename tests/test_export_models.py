"""Exported graphs against the PyTorch quantized model (`load_quantized`), through ONNX Runtime with the
kernel library and without it (function bodies): full-sequence logits, and prefill + decode steps with
the KV cache equal to the full-sequence run. Tiny models here; the shared models in the slow tests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mopeq_export.quantization.loader import load_quantized
from mopeq_exporters import export_quantized
from mopeq_exporters.ort_check import Exported

pytestmark = pytest.mark.usefixtures("exact_kernel")  # parity with PyTorch: the float-activation path

SHARED = Path(__file__).resolve().parents[2] / "shared"
native = pytest.importorskip("mopeq_runtime.native")
try:
    native.library_path()
    KERNEL = [True, False]
except native.KernelLibraryMissing:
    KERNEL = [False]


def rel(a, b):
    return float(np.abs(a.astype(np.float32) - b).max() / np.abs(b).max())


def check_decoder(ex: Exported, embeds: np.ndarray | None, ids: np.ndarray, ref: np.ndarray, split: int, tol: float):
    tokens = embeds if embeds is not None else ids
    full, present = ex.step(tokens, ex.empty_past(tokens.shape[0]))
    assert rel(full, ref) < tol
    assert present[0].shape[2] == tokens.shape[1]
    logits, past = ex.step(tokens[:, :split], ex.empty_past(tokens.shape[0]))
    steps = [logits]
    for t in range(split, tokens.shape[1]):
        logits, past = ex.step(tokens[:, t:t + 1], past)
        steps.append(logits)
    assert rel(np.concatenate(steps, 1), full) < tol


# -- tiny Qwen2-MoE (text, shared expert) ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from tiny_checkpoint import quantize_random_plan, save_tiny_qwen2_moe

    root = tmp_path_factory.mktemp("tiny_text")
    src = save_tiny_qwen2_moe(root / "model")
    qdir = quantize_random_plan(src, root / "q")
    export_quantized(qdir, "cpu", root / "onnx", nbits_accuracy_level=0)
    return qdir, root / "onnx"


@pytest.mark.parametrize("kernel", KERNEL)
def test_tiny_text_matches_pytorch(tiny_text, kernel):
    qdir, odir = tiny_text
    model = load_quantized(qdir)
    ids = np.array([[0, 5, 17, 3, 40, 9, 22, 8], [0, 7, 7, 30, 2, 11, 19, 4]], np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    check_decoder(Exported(odir, kernel=kernel), None, ids, ref, split=5, tol=1e-4)


def test_tiny_text_contract(tiny_text):
    _, odir = tiny_text
    import onnx

    rec = json.loads((odir / "export.json").read_text())
    assert rec["custom_op"] == {"domain": "mopeq", "op_type": "MoEExperts", "version": 1, "layout_version": 2,
                                "fallback": "model-local ONNX function"}
    g = onnx.load(odir / "decoder.onnx", load_external_data=False)
    assert g.ir_version == rec["ir_version"] == 10
    assert [f.name for f in g.functions] == ["MoEExperts"]
    moe = [n for n in g.graph.node if n.domain == "mopeq"]
    assert [n.name for n in moe] == ["/model/layers.0/mlp/experts/MoEExperts", "/model/layers.1/mlp/experts/MoEExperts"]
    inits = {i.name: i for i in g.graph.initializer}
    assert inits["model.layers.0.mlp.experts.w1_q2"].data_type == onnx.TensorProto.UINT32
    assert inits["model.layers.0.mlp.experts.w1_scales"].data_type == onnx.TensorProto.FLOAT16
    assert inits["model.layers.0.mlp.experts.w2_zeros"].data_type == onnx.TensorProto.UINT8
    # layout v2 (H = 32, I = 48, 4 experts, g = 32): [E, rows/16, G, 16] and [E_b, rows/16, NB*b, 16]
    assert list(inits["model.layers.0.mlp.experts.w1_scales"].dims) == [4, 96 // 16, 1, 16]
    assert list(inits["model.layers.0.mlp.experts.w2_zeros"].dims) == [4, 32 // 16, 2, 16]
    assert list(inits["model.layers.0.mlp.experts.w2_q3"].dims)[1:] == [32 // 16, 2 * 3, 16]
    assert all(n.attribute[[a.name for a in n.attribute].index("layout_version")].i == 2 for n in moe)
    names = [i["name"] for i in rec["graphs"]["decoder"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    assert (odir / "decoder.onnx.data").stat().st_size > 0


def test_tiny_text_left_padding(tiny_text):
    """Batch with left padding: position_ids = cumsum(mask) - 1, as documented in docs/EXPORT.md."""
    qdir, odir = tiny_text
    model = load_quantized(qdir)
    ids = np.array([[1, 1, 0, 5, 17, 3], [0, 7, 7, 30, 2, 11]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.numpy()
    ex = Exported(odir, kernel=KERNEL[0])
    logits, _ = ex.step(ids, ex.empty_past(2), mask=mask, positions=pos)
    assert rel(logits[:, 2:], ref[:, 2:]) < 1e-4


def test_tiny_text_float16_target_runs_on_cpu(tiny_text, tmp_path):
    """GPU targets export float16 activations; the graph must still run on the CPU EP, both paths."""
    qdir, _ = tiny_text
    rec = export_quantized(qdir, "jetson", tmp_path / "onnx")
    assert rec["activation_dtype"] == "float16" and rec["opset"] == 19 and rec["ir_version"] == 9
    model = load_quantized(qdir)
    ids = np.array([[0, 5, 17, 3, 40, 9]], np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    for kernel in KERNEL:
        ex = Exported(tmp_path / "onnx", kernel=kernel)
        logits, present = ex.step(ids, ex.empty_past(1))
        assert logits.dtype == np.float32 and present[0].dtype == np.float16
        assert rel(logits, ref) < 1e-2


# -- tiny LLaVA + OLMoE (vision graph, embed graph, inputs_embeds) ----------------------------------

@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny_checkpoint import quantize_random_plan
    from tiny_models import llava_olmoe

    root = tmp_path_factory.mktemp("tiny_vlm")
    llava_olmoe().to(torch.float16).save_pretrained(root / "model")
    qdir = quantize_random_plan(root / "model", root / "q", seed=1)
    export_quantized(qdir, "cpu", root / "onnx", nbits_accuracy_level=0)
    return qdir, root / "onnx"


@pytest.mark.parametrize("kernel", KERNEL)
def test_tiny_vlm_matches_pytorch(tiny_vlm, kernel):
    qdir, odir = tiny_vlm
    model = load_quantized(qdir)
    cfg = model.config
    pix = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ids = np.array([[cfg.image_token_index] * cfg.image_seq_length + [5, 17, 3, 40, 9]], np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pix)).logits.numpy()
    ex = Exported(odir, kernel=kernel)
    check_decoder(ex, ex.embed(ids, pix), ids, ref, split=ids.shape[1] - 3, tol=1e-4)
