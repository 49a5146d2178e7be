"""Issue 2's acceptance on the trained reference models: every routed expert gets a finite positive
trace with the default settings, and two seeds rank the experts alike (Spearman >= 0.9)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from mopeq_export.calibration import calibration_kind, load_calibration
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.sensitivity import DATA_DEFAULTS, TEXT_SEQ_LEN, EstimatorConfig, analyze

SHARED = Path(__file__).resolve().parents[2] / "shared"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared/models not present")]


@pytest.mark.parametrize("model, calib, experts", [("text-moe", "text_calib.txt", 96), ("vlm-moe", "vqa_calib.npz", 64)])
def test_default_analysis_is_positive_and_seed_stable(model, calib, experts):
    path, data_path = SHARED / "models" / model, SHARED / "data" / calib
    net, info = load_model(path)
    samples, batch = DATA_DEFAULTS[calibration_kind(data_path)]
    data = load_calibration(data_path, load_tokenizer(path), net.config, samples=samples, seq_len=TEXT_SEQ_LEN,
                            batch_size=batch)
    reports = [analyze(net, info, data, EstimatorConfig(seed=seed, batch_size=batch)) for seed in (0, 1)]
    for report in reports:
        assert len(report.experts) == experts
        bad = [e.name for e in report.experts if e.no_tokens or not math.isfinite(e.hessian_trace) or e.hessian_trace <= 0]
        assert not bad, bad
    rho = spearmanr([e.hessian_trace for e in reports[0].experts], [e.hessian_trace for e in reports[1].experts])[0]
    assert rho >= 0.9, rho
