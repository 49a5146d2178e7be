"""The public API (mopeq_export/api.py): the five verbs on a tiny Qwen2-MoE, each a path or record plus a
typed config in and a typed record out, with one progress protocol; and the CLI producing the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mopeq_export
from mopeq_export import (BitPlan, BuildConfig, BuildResult, EstimatorConfig, ExportedModel, GateConfig, PlanConfig,
                          ProgressEvent, QuantizeConfig, QuantizedCheckpoint, SensitivityReport, analyze, build,
                          export, load_quantized, plan, quantize)
from mopeq_export.errors import MopeqError
from tiny_checkpoint import save_tiny_qwen2_moe, write_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return save_tiny_qwen2_moe(root / "model"), write_text(root / "calib.txt"), root


def test_root_exports_the_verbs_and_stays_free_of_torch():
    code = ("import sys, mopeq_export; names = ['analyze','plan','quantize','export','build','load_quantized']; "
            "assert all(n in mopeq_export.__all__ for n in names); assert 'torch' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    with pytest.raises(AttributeError):
        mopeq_export.no_such_name  # noqa: B018


def test_stages_chain_records_and_report_progress(tiny, tmp_path):
    model, calib, _ = tiny
    events: list[ProgressEvent] = []
    est = EstimatorConfig(max_probes=2, min_probes=2, batch_size=2)
    report = analyze(model, est, calib=calib, samples=4, seq_len=32, out=tmp_path / "sens", device="cpu",
                     progress=events.append)
    assert isinstance(report, SensitivityReport) and (tmp_path / "sens" / "sensitivity.json").is_file()
    probes = [e for e in events if e.stage == "analyze" and e.done is not None]
    assert [e.done for e in probes] == [1, 2] and all(e.total == 2 for e in probes)

    # a plan from the record in memory equals the plan from the file the CLI would read
    from_record = plan(report, PlanConfig(avg_bits=3.0), progress=events.append)
    from_file = plan(tmp_path / "sens", PlanConfig(avg_bits=3.0), out=tmp_path / "plan.json")
    assert isinstance(from_record, BitPlan) and from_record.experts == from_file.experts
    assert from_record.sensitivity["path"] is None and len(from_record.sensitivity["sha256"]) == 64
    assert json.loads((tmp_path / "plan.json").read_text())["kind"] == "mopeq.bitplan"
    with pytest.raises(MopeqError):  # the file output follows the CLI's rules: no silent overwrite
        plan(report, PlanConfig(avg_bits=3.0), out=tmp_path / "plan.json")

    events.clear()
    ckpt = quantize(model, from_record, tmp_path / "qdir", QuantizeConfig(method="gptq"), calib=calib, samples=4,
                    seq_len=32, device="cpu", progress=events.append)
    assert isinstance(ckpt, QuantizedCheckpoint) and ckpt.path == (tmp_path / "qdir")
    counted = [e.done for e in events if e.stage == "quantize" and e.done is not None]
    assert counted == list(range(1, len(from_record.experts) + 1))
    widths = {e["name"]: e["bits"] for e in ckpt.record["experts"]}
    assert widths == from_record.experts

    exported = export(ckpt, tmp_path / "export", "cpu", progress=events.append)
    assert isinstance(exported, ExportedModel) and exported.target == "cpu" and "decoder" in exported.graphs
    assert any(e.stage == "export" and e.message for e in events)
    assert load_quantized(ckpt).config.num_experts == 4


def test_build_verb_reports_every_stage(tiny, tmp_path):
    model, calib, root = tiny
    events: list[ProgressEvent] = []
    cfg = BuildConfig(model=model, target="cpu", out=tmp_path / "bundle", calib=calib, cache=root / "cache",
                      gate=GateConfig(max_ppl_ratio=10.0, max_windows=4))
    result = build(cfg, progress=events.append)
    assert isinstance(result, BuildResult) and result.out == (tmp_path / "bundle").resolve()
    stages = {e.stage for e in events}
    assert {"analyze", "plan", "quantize", "export"} <= stages
    assert any(e.stage == "validate" and e.done for e in events)


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    model, calib, _ = tiny
    with pytest.raises(MopeqError, match="not a bit plan|not found|cannot be read"):
        quantize(model, tmp_path / "missing-plan.json", tmp_path / "q", calib=calib)
    with pytest.raises(MopeqError, match="no export.json"):
        mopeq_export.read_export(tmp_path)
