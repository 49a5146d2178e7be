"""`mopeq-export analyze` and `plan` end to end: outputs, exit code 2 with one line, nothing partial."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from mopeq_export import cli
from mopeq_export.sensitivity import SCHEMA_VERSION

import tiny_models as tm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (vocab 259), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<image>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def save_model(model, folder: Path) -> Path:
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(**{**tm._COMMON, "vocab_size": 320}, intermediate_size=64, moe_intermediate_size=tm.I,
                         num_experts=tm.E, num_experts_per_tok=tm.K, shared_expert_intermediate_size=64)
    return save_model(tm._causal(cfg), tmp_path_factory.mktemp("qwen2moe"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["mopeq-export", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


ANALYZE_FAST = ("--samples", "4", "--seq-len", "16", "--batch-size", "2", "--probes", "2")


@pytest.fixture(scope="module")
def analyzed(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("an") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["mopeq-export", "analyze", "--model", str(tiny_dir), "--calib", str(text_file),
                             "--out", str(out), *ANALYZE_FAST])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    mp.undo()
    assert exc.value.code in (0, None)
    return out


def test_analyze_writes_record_and_heatmap(analyzed):
    rec = json.loads((analyzed / "sensitivity.json").read_text())
    assert rec["kind"] == "mopeq.sensitivity" and rec["schema_version"] == SCHEMA_VERSION and rec["probes"] == 2
    assert rec["estimator"]["curvature"] == "gauss-newton"
    assert len(rec["experts"]) == 2 * tm.E
    for key in ("name", "layer", "expert", "params", "hessian_trace", "hessian_trace_stderr", "tokens", "frequency",
                "routing_weight", "no_tokens", "quant_error", "weight_norm_trace"):
        assert key in rec["experts"][0]
    assert rec["calibration"]["samples"] - rec["calibration"]["coverage_samples"] == 4 and rec["model"]["weights_sha256"]
    assert (analyzed / "sensitivity.png").stat().st_size > 1000


@pytest.mark.parametrize("args, avg", [(("--method", "budget", "--avg-bits", "2.5"), 2.5),
                                       (("--method", "kmeans", "--scope", "layer"), None),
                                       (("--method", "uniform", "--avg-bits", "3"), 3.0)])
def test_plan_from_analyze(analyzed, tmp_path, monkeypatch, capsys, args, avg):
    out = tmp_path / "plan.json"
    code, _ = run(monkeypatch, capsys, "plan", "--sensitivity", analyzed / "sensitivity.json", "--out", out, *args)
    assert code in (0, None)
    rec = json.loads(out.read_text())
    assert rec["kind"] == "mopeq.bitplan" and len(rec["experts"]) == 2 * tm.E
    if avg is not None:
        assert avg - 0.01 <= rec["avg_bits"] <= avg


def test_plan_override_flag(analyzed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plan.json"
    name = json.loads((analyzed / "sensitivity.json").read_text())["experts"][0]["name"]
    code, _ = run(monkeypatch, capsys, "plan", "--sensitivity", analyzed / "sensitivity.json", "--out", out,
                  "--avg-bits", "3", "--set", f"{name}=4")
    assert code in (0, None) and json.loads(out.read_text())["experts"][name] == 4


def assert_one_line_error(code, err, fragment):
    # transformers' own loading progress bars (tqdm, "it/s]") may precede the error; they are not ours
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err


def test_analyze_bad_input(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    dense = save_model(tm.dense_llama(), tmp_path / "dense")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [(("--model", tmp_path / "nope", "--calib", text_file), "model folder not found"),
             (("--model", dense, "--calib", text_file), "no Mixture-of-Experts layer"),
             (("--model", tiny_dir, "--calib", empty), "is empty"),
             (("--model", tiny_dir, "--calib", text_file, "--seq-len", "100000"), "fewer than one window"),
             (("--model", tiny_dir, "--calib", text_file, "--rel-tol", "0"), "--rel-tol"),
             (("--model", tiny_dir, "--calib", text_file, "--curvature", "newton"), "unknown --curvature"),
             (("--model", tiny_dir, "--calib", text_file, "--samples", "0"), "--samples")]
    for args, fragment in cases:
        out = tmp_path / "out"
        code, err = run(monkeypatch, capsys, "analyze", *ANALYZE_FAST, *args, "--out", out)
        assert_one_line_error(code, err, fragment)
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_plan_bad_input(analyzed, tmp_path, monkeypatch, capsys):
    sens = analyzed / "sensitivity.json"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "mopeq.sensitivity", "schema_version": SCHEMA_VERSION, "experts": []}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kind": "mopeq.sensitivity", "schema_version": 1, "experts": []}))
    cases = [(("--sensitivity", sens, "--method", "hawq"), "unknown method"),
             (("--sensitivity", sens, "--scope", "expert"), "unknown scope"),
             (("--sensitivity", sens, "--avg-bits", "5"), "outside [2, 4]"),
             (("--sensitivity", sens, "--set", "model.layers.0.mlp.experts.0=5"), "not a candidate"),
             (("--sensitivity", sens, "--set", "model.layers.0.mlp.expert.0=4"), "did you mean"),
             (("--sensitivity", sens, "--set", "nobits"), "NAME=BITS"),
             (("--sensitivity", sens, "--bits-candidates", "2,x"), "comma-separated"),
             (("--sensitivity", broken), "malformed"),
             (("--sensitivity", old), "rerun `mopeq-export analyze`"),
             (("--sensitivity", tmp_path / "missing.json"), "not found")]
    for args, fragment in cases:
        out = tmp_path / "plan.json"
        code, err = run(monkeypatch, capsys, "plan", *args, "--out", out)
        assert_one_line_error(code, err, fragment)
        assert not out.exists() and not list(tmp_path.glob(".plan.json.partial-*"))


@pytest.mark.slow
def test_text_moe_end_to_end(tmp_path, monkeypatch, capsys):
    model = SHARED / "models" / "text-moe"
    if not model.is_dir():
        pytest.skip("../shared/models/text-moe not present")
    out = tmp_path / "an"
    code, _ = run(monkeypatch, capsys, "analyze", "--model", model, "--calib", SHARED / "data" / "text_calib.txt",
                  "--out", out, "--samples", "4", "--seq-len", "64", "--probes", "2")
    assert code in (0, None)
    rec = json.loads((out / "sensitivity.json").read_text())
    assert len(rec["experts"]) == 96
    # layer 1 expert 14 is reached by one token of the whole file: coverage must find that window
    assert rec["calibration"]["coverage_samples"] >= 1
    assert all(not e["no_tokens"] and math.isfinite(e["hessian_trace"]) and e["hessian_trace"] > 0 for e in rec["experts"])
    code, _ = run(monkeypatch, capsys, "plan", "--sensitivity", out / "sensitivity.json", "--out", tmp_path / "p.json",
                  "--avg-bits", "2.5")
    assert code in (0, None) and 2.49 <= json.loads((tmp_path / "p.json").read_text())["avg_bits"] <= 2.5
