"""`build` end to end on a tiny Qwen2-MoE: the bundle, its determinism, the gate, and faults that must
leave nothing on disk. One real build (about a minute, mostly the ONNX export) warms a cache that the
other tests reuse, so they only re-run packaging and validation."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import mopeq_runtime
from mopeq_export import pipeline as build_mod
from mopeq_export import bundle as bundle_mod
from mopeq_export.pipeline import BuildConfig, GateFailed, build, report_beside
from mopeq_export.errors import MopeqError
from mopeq_export.memory import check_memory, require_fit
from mopeq_export.targets import get_target
from mopeq_export.validate import GateConfig
from tiny_checkpoint import save_tiny_qwen2_moe, write_text

LOOSE = GateConfig(max_ppl_ratio=10.0, max_windows=8)  # a random-init model: the gate itself is tested below


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_qwen2_moe(root / "model")
    calib = write_text(root / "calib.txt")
    cfg = BuildConfig(model=model, target="cpu", out=root / "A", calib=calib, cache=root / "cache", gate=LOOSE)
    build(cfg)
    return cfg


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith((f"{name}.", f".{name}."))]


def test_bundle_is_complete_verified_and_runs(tiny):
    m = mopeq_runtime.load(tiny.out)
    man = m.manifest
    assert man.validation["passed"] and man.kernel.status == "binary" and m.uses_kernel
    assert {g.name for g in man.graphs} == {"decoder"} and man.target.activation_dtype == "float32"
    assert set(man.plan["experts"].values()) <= {2, 3, 4} and len(man.plan["experts"]) == 8
    assert {"validation/report.json", "validation/fidelity.png"} <= {f.path for f in man.files}
    g = m.generate("The os module", max_new_tokens=5, stop_on_eos=False)
    assert len(g.token_ids) == 5
    # nothing the bundle hashes names the build machine's folders (the kernel binary is built elsewhere)
    for rel, data in _files(tiny.out).items():
        if not rel.endswith(".so"):
            assert str(tiny.cache).encode() not in data and str(tiny.model.parent).encode() not in data, rel


def test_rebuild_from_same_stages_is_byte_identical_also_as_tar(tiny):
    b = replace(tiny, out=tiny.out.with_name("B"))
    build(b)
    assert _files(tiny.out) == _files(b.out)
    t1, t2 = replace(tiny, out=tiny.out.with_name("A.tar"), tar=True), replace(tiny, out=tiny.out.with_name("B.tar"), tar=True)
    build(t1)
    build(t2)
    assert t1.out.read_bytes() == t2.out.read_bytes()
    assert not tiny.out.with_name("A.tar.dir").exists()
    assert mopeq_runtime.load(t1.out).manifest.validation["passed"]


def test_failing_gate_exits_nonzero_with_report_beside_and_no_bundle(tiny):
    out = tiny.out.with_name("G")
    cmd = [sys.executable, "-m", "mopeq_export", "build", "--model", str(tiny.model), "--target", "cpu",
           "--calib", str(tiny.calib), "--cache", str(tiny.cache), "--out", str(out), "--eval-windows", "4",
           "--max-ppl-ratio", "0.5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "accuracy gate failed: perplexity ratio" in r.stderr
    assert report_beside(out).is_file() and not out.exists()
    assert _leftovers(out.parent, "G") == ["G.validation.json"]


def test_ctrl_c_during_validation_leaves_nothing(tiny, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "run_gate", interrupted)
    out = tiny.out.with_name("C")
    with pytest.raises(KeyboardInterrupt):
        build(replace(tiny, out=out))
    assert _leftovers(out.parent, "C") == []


@pytest.mark.parametrize("tar", [False, True])
def test_full_disk_during_packaging_leaves_nothing(tiny, monkeypatch, tar):
    real_copy, real_tar = bundle_mod._copy, build_mod.write_tar

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def half_tar(src, dest):  # write part of the archive, then run out of space
        Path(dest).write_bytes(b"partial")
        full()

    if tar:
        monkeypatch.setattr(build_mod, "write_tar", half_tar)
    else:
        monkeypatch.setattr(bundle_mod, "_copy", lambda s, d: (real_copy(s, d), full()))
    out = tiny.out.with_name("D.tar" if tar else "D")
    with pytest.raises(MopeqError, match="disk full while writing the bundle"):
        build(replace(tiny, out=out, tar=tar))
    assert _leftovers(out.parent, "D") == []
    assert real_tar is not None


def test_memory_check_says_what_would_fit(tiny, monkeypatch):
    t = get_target("jetson-orin-nano")
    m = check_memory(t, weights_bytes=3 * 2**30, per_token=2**20, context=4096)
    assert not m.fits and m.max_context == 1024
    with pytest.raises(MopeqError, match="would fit: --context 1024 or less"):
        require_fit(m)
    with pytest.raises(MopeqError, match="weights alone are too big"):
        require_fit(check_memory(t, 5 * 2**30, 2**20, 10))
    # ~180 KB share: the weights fit (121 KB built, dense layers quantized; 170 KB as the build first estimates
    # them, dense float), the 64 KB KV cache of the full context does not
    tinyt = replace(get_target("cpu"), memory_gib=3.35e-4)
    monkeypatch.setattr(build_mod, "get_target", lambda name: tinyt)
    with pytest.raises(MopeqError, match="does not fit cpu.*would fit: --context"):
        build(replace(tiny, out=tiny.out.with_name("M")))
    assert _leftovers(tiny.out.parent, "M") == []


@pytest.mark.slow
def test_two_fresh_builds_are_byte_identical(tiny, tmp_path):
    a = replace(tiny, out=tmp_path / "X", use_cache=False)
    b = replace(tiny, out=tmp_path / "Y", use_cache=False)
    build(a)
    build(b)
    assert _files(a.out) == _files(b.out)


def test_damaged_cache_entry_is_rebuilt_not_shipped(tiny, tmp_path):
    entry = next(tiny.cache.glob("export-*"))
    data = next(p for p in entry.rglob("*.onnx.data"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the exported weights
    data.write_bytes(bytes(blob))
    said = []
    res = build(replace(tiny, out=tmp_path / "R"), say=lambda stage, status: said.append((stage, status)))
    assert ("export", f"cache entry damaged ({data.relative_to(entry).as_posix()} altered): rebuilding") in said
    assert mopeq_runtime.load(res.out).manifest.validation["passed"]
    assert _files(res.out) == _files(tiny.out)  # the rebuilt entry gives the same bundle


def test_out_rules_for_bundles(tiny, tmp_path):
    folder = tmp_path / "F"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(MopeqError, match="not an output of mopeq-export"):
        build(replace(tiny, out=folder, force=True))
    with pytest.raises(MopeqError, match="is a folder"):
        build(replace(tiny, out=folder, tar=True, force=True))
    with pytest.raises(MopeqError, match="holds a previous bundle output; pass --force"):
        build(replace(tiny, out=tiny.out))
    assert (folder / "mine.txt").read_text() == "keep"
