"""The done-criteria of issue 4 on the shared reference models (slow: quantize + export each, ~1-2 min).

Quantized (RTN, random 2/3/4-bit plan) text-moe and vlm-moe, exported for the cpu target, against
`load_quantized` in float32: max relative logits error < 1e-3 with the kernel and with the function bodies,
prefill + decode steps equal to the full-sequence run, and perplexity on a subset of text_dev.txt within
0.2% (scripts/check_export_ppl.py does the whole file)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mopeq_export.evaluate import evaluate_text, text_windows, torch_forward
from mopeq_export.models.loading import load_tokenizer
from mopeq_export.quantization.loader import load_quantized
from mopeq_exporters import export_quantized
from mopeq_exporters.ort_check import Exported
from test_export_models import KERNEL, check_decoder
from tiny_checkpoint import quantize_random_plan

SHARED = Path(__file__).resolve().parents[2] / "shared"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("exact_kernel"),  # parity with PyTorch: float path
              pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared/models not present")]


@pytest.fixture(scope="module")
def text_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_moe")
    qdir = quantize_random_plan(SHARED / "models" / "text-moe", root / "q")
    export_quantized(qdir, "cpu", root / "onnx", nbits_accuracy_level=0)
    return qdir, root / "onnx", load_quantized(qdir)


def test_text_moe_logits_and_cache(text_moe):
    qdir, odir, model = text_moe
    ids = np.random.default_rng(0).integers(3, 4096, (2, 24)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    for kernel in KERNEL:
        check_decoder(Exported(odir, kernel=kernel), None, ids, ref, split=20, tol=1e-3)


def test_text_moe_perplexity_subset(text_moe):
    qdir, odir, model = text_moe
    windows = text_windows(SHARED / "data" / "text_dev.txt", load_tokenizer(SHARED / "models" / "text-moe"),
                           max_windows=8)
    ex = Exported(odir, kernel=KERNEL[0], threads=2)

    def ort_logits(inputs):
        ids = inputs["input_ids"].numpy()
        return torch.from_numpy(ex.step(ids, ex.empty_past(ids.shape[0]))[0])

    m = evaluate_text(torch_forward(model), ort_logits, windows)
    assert abs(m.ppl_ratio - 1) < 0.002, m


def test_vlm_moe_logits_and_cache(tmp_path):
    qdir = quantize_random_plan(SHARED / "models" / "vlm-moe", tmp_path / "q", seed=1)
    export_quantized(qdir, "cpu", tmp_path / "onnx", nbits_accuracy_level=0)
    model = load_quantized(qdir)
    data = np.load(SHARED / "data" / "vqa_dev.npz")
    mean, std = np.array([0.48, 0.46, 0.41], np.float32), np.array([0.27, 0.26, 0.28], np.float32)
    pix = ((data["images"][:2] / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    tok = load_tokenizer(SHARED / "models" / "vlm-moe")
    q = tok(f"\nQuestion: {data['questions'][0]}\nAnswer:", add_special_tokens=False)["input_ids"]
    ids = np.array([[model.config.image_token_index] * 64 + q] * 2, np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pix)).logits.numpy()
    for kernel in KERNEL:
        ex = Exported(tmp_path / "onnx", kernel=kernel)
        check_decoder(ex, ex.embed(ids, pix), ids, ref, split=ids.shape[1] - 3, tol=1e-3)
