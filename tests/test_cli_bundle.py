"""`mopeq-export inspect` and `run` on a synthetic bundle (in-process, through typer's runner)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fake_export import make_fake_bundle
from mopeq_export.cli import app


def test_inspect_summarizes_and_verifies(tmp_path):
    b = make_fake_bundle(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(b)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "hashes ok" in r.output and "model.layers.0.mlp.experts" in r.output and "decoder.onnx.data" in r.output
    (b / "tokenizer.json").write_text("{}")
    r = CliRunner().invoke(app, ["inspect", str(b)], env={"COLUMNS": "200"})
    assert "FAILED" in r.output and "tokenizer.json" in r.output


def test_inspect_shows_the_genai_record(tmp_path):
    b = make_fake_bundle(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(b)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "ONNX Runtime GenAI" in r.output, r.output
    d = json.loads((b / "manifest.json").read_text())
    d["genai"] = {"config": "genai_config.json", "tokenizer": ["tokenizer.json"], "note": "registers libmopeq_ops.so"}
    (b / "manifest.json").write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["inspect", str(b)], env={"COLUMNS": "250"})
    assert "genai_config.json: registers libmopeq_ops.so" in r.output, r.output
    d["genai"] = {"config": None, "tokenizer": [], "note": "no genai_config.json: per-layer caches"}
    (b / "manifest.json").write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["inspect", str(b)], env={"COLUMNS": "250"})
    assert "no config: no genai_config.json: per-layer caches" in r.output, r.output


def test_run_streams_text_and_refuses_foreign_bundle(tmp_path):
    b = make_fake_bundle(tmp_path)
    r = CliRunner().invoke(app, ["run", str(b), "--prompt", "The os", "--max-new-tokens", "3"])
    assert r.exit_code == 0 and "The os" in r.output and "stopped: length" in r.output, r.output
    d = json.loads((b / "manifest.json").read_text())
    d["target"]["arches"] = ["riscv64"]
    (b / "manifest.json").write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["run", str(b), "--prompt", "x"])
    assert r.exit_code != 0 and "allow-foreign-target" in str(r.exception)
    r = CliRunner().invoke(app, ["run", str(b), "--prompt", "x", "--allow-foreign-target", "--max-new-tokens", "1"])
    assert r.exit_code == 0, r.output
