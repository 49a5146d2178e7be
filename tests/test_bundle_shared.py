"""Acceptance on the reference models (slow: minutes from a cold cache, seconds from a warm one).

The builds share the test session's stage cache (conftest.py; not the user's ~/.cache/mopeq-export, which may
hold checkpoints of older quantizer versions), and the text cpu bundle is the session's (`text_cpu_bundle`), so
the jetson bundle reuses its analyze/plan/quantize stages and only re-exports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mopeq_runtime
from mopeq_export.pipeline import BuildConfig, build

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT, VLM, DATA = SHARED / "models" / "text-moe", SHARED / "models" / "vlm-moe", SHARED / "data"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not TEXT.is_dir(), reason="needs ../shared/models")]


@pytest.fixture(scope="module")
def cache(session_cache):
    return session_cache


@pytest.fixture(scope="module")
def text_bundle(text_cpu_bundle):
    return text_cpu_bundle


def test_text_bundle_passes_gate_and_matches_pytorch_quantized(text_bundle, cache):
    from mopeq_export.evaluate import evaluate_text, torch_forward
    from mopeq_export.quantization.loader import load_quantized
    from mopeq_export.validate import runtime_forward

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from check_bundle_ppl import find_qdir

    m = mopeq_runtime.load(text_bundle)
    assert m.manifest.validation["passed"] and m.manifest.validation["metrics"]["ppl_ratio"] <= 1.05
    ids = m.tokenizer.encode((DATA / "text_dev.txt").read_text())[: 32 * 256]
    res = evaluate_text(torch_forward(load_quantized(find_qdir(m.manifest, cache))), runtime_forward(m),
                        torch.tensor(ids).view(32, 256))
    assert abs(res.ppl_ratio - 1) < 0.005


def test_run_cli_prints_text(text_bundle):
    r = subprocess.run([sys.executable, "-m", "mopeq_export", "run", str(text_bundle), "--prompt", "The os module",
                        "--max-new-tokens", "12"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The os module") and len(r.stdout.strip()) > len("The os module")


def test_jetson_bundle_float16_manifest_memory_and_runs_here(tmp_path, cache):
    out = tmp_path / "J"
    build(BuildConfig(model=TEXT, target="jetson-orin-nano", out=out, avg_bits=2.5, calib=DATA / "text_calib.txt",
                      cache=cache))
    with pytest.raises(mopeq_runtime.BundleError, match="not a Jetson|this host is"):
        mopeq_runtime.load(out)
    m = mopeq_runtime.load(out, allow_foreign_target=True)
    man = m.manifest
    assert man.target.activation_dtype == "float16" and man.target.arches == ("aarch64",)
    assert man.kernel.status == "source" and not m.uses_kernel
    assert man.target.memory_bytes == int(8 * 0.5 * 2**30)
    mem = man.validation["memory"]
    assert mem["fits"] and mem["kv_bytes"] == 2 * 6 * 4 * 32 * 2 * mem["context"]
    assert next(s for s in man.graph("decoder").inputs if s.name.startswith("past")).dtype == "float16"
    logits, _ = m.forward([[5, 6, 7]])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.skipif(not VLM.is_dir(), reason="needs ../shared/models/vlm-moe")
def test_vlm_bundle_retention_and_image(tmp_path, cache):
    out = tmp_path / "V"
    build(BuildConfig(model=VLM, target="cpu", out=out, avg_bits=2.5, calib=DATA / "vqa_calib.npz",
                      eval=DATA / "vqa_dev.npz", cache=cache))
    m = mopeq_runtime.load(out)
    assert m.manifest.validation["metrics"]["accuracy_retention"] >= 0.985
    assert m.manifest.quantization["method"] == "signround"  # the build's default for VLMs too (BUILD_METHOD)
    assert m.manifest.quantization["config"]["head_gptq"] is True
    with np.load(DATA / "vqa_dev.npz") as z:
        img, q = z["images"][0], str(z["questions"][0])
    assert m.generate(q, image=img, max_new_tokens=8).text.strip()
    with pytest.raises(mopeq_runtime.InputError, match="64x64"):
        m.generate(q, image=img[:32], max_new_tokens=1)
