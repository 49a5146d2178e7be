"""Nothing a user owns is deleted, nothing partial is left, nothing unverified runs (docs/BUNDLE.md, README)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import mopeq_runtime
from fake_export import make_fake_bundle
from mopeq_export import cli
from mopeq_export.errors import MopeqError
from mopeq_export.fsutil import OUTPUT_MARKER, check_out, staged_dir, staged_file
from mopeq_runtime.errors import BundleError, InputError
from tiny_checkpoint import save_tiny_qwen2_moe

LIB = Path(__file__).resolve().parents[1] / "runtime" / "mopeq_runtime" / "lib" / "libmopeq_ops.so"


def main(argv: list[str], capsys) -> tuple[int, str]:
    """The real entry point (its error handling included), in-process: (exit code, stderr)."""
    old = sys.argv
    sys.argv = ["mopeq-export", *map(str, argv)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code, capsys.readouterr().err


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# -- output folders --------------------------------------------------------------------------------------
def test_a_folder_the_tool_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(MopeqError, match="not an output of mopeq-export"):
            with staged_dir(mine, "analyze", force=force) as st:
                (st / "sensitivity.json").write_text("{}")
    assert tree(mine) == {"notes.txt": b"keep me"} and leftovers(tmp_path) == []


def test_previous_output_is_replaced_only_with_force_and_only_by_its_own_kind(tmp_path):
    out = tmp_path / "sens"
    with staged_dir(out, "analyze") as st:
        (st / "a").write_text("1")
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "analyze"
    with pytest.raises(MopeqError, match="pass --force"):
        check_out(out, "analyze")
    with pytest.raises(MopeqError, match="is a `analyze` output"):
        check_out(out, "quantize", force=True)
    with staged_dir(out, "analyze", force=True) as st:
        (st / "b").write_text("2")
    assert sorted(tree(out)) == [OUTPUT_MARKER, "b"] and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_dir(empty, "quantize") as st:  # an empty folder holds nothing to lose
        (st / "x").write_text("1")
    assert (empty / "x").is_file()


def test_symlinks_and_inputs_are_never_written(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "data").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(MopeqError, match="symbolic link"):
        check_out(link, "analyze", force=True)
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for out in (model, model / "sub" / "q", tmp_path):  # equal to, inside, or containing an input
        with pytest.raises(MopeqError, match="overlaps the input"):
            check_out(out, "quantize", force=True, inputs=(model,))
    with pytest.raises(MopeqError, match="overlaps the input"):
        check_out(tmp_path / "plan.json", "file", force=True, inputs=(tmp_path / "plan.json",), file=True)
    assert (target / "data").read_text() == "x"


def test_file_outputs_refuse_folders_and_existing_files_and_leave_no_partial(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    with pytest.raises(MopeqError, match="is a folder"):
        with staged_file(folder, force=True) as tmp:
            tmp.write_text("x")
    existing = tmp_path / "plan.json"
    existing.write_text("mine")
    with pytest.raises(MopeqError, match="already exists; pass --force"):
        with staged_file(existing, force=False) as tmp:
            tmp.write_text("new")
    assert existing.read_text() == "mine" and leftovers(tmp_path) == []


def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out", "export") as st:
            (st / "f").write_text("1")
        with staged_file(tmp_path / "file.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o644


def test_stale_partials_of_killed_runs_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half").write_text("x")
    alive = tmp_path / f".out.partial-{os.getppid()}-def"  # a live process's staging folder stays
    alive.mkdir()
    with staged_dir(tmp_path / "out", "analyze") as st:
        (st / "x").write_text("1")
    assert not stale.exists() and alive.exists()


def test_sigterm_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    code = f"""
import os, signal, sys, time
from mopeq_export import cli
from mopeq_export.fsutil import staged_dir

@cli.app.command("selftest-term")
def _t():
    with staged_dir({str(out)!r}, "analyze") as st:
        (st / "half.json").write_text("{{}}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

sys.argv = ["mopeq-export", "selftest-term"]
cli.main()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and "terminated" in r.stderr, r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


# -- the CLI: one-line errors, exit 2, the user's files intact --------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_qwen2_moe(tmp_path_factory.mktemp("safety") / "model")


def _plan(tmp_path: Path, model: Path, **experts_override) -> Path:
    from mopeq_export.models.adapters import find_moe_layers
    from mopeq_export.models.loading import model_info
    from mopeq_export.models.onload import skeleton

    names = [n for l in find_moe_layers(skeleton(model)) for n in l.expert_names]
    plan = {"kind": "mopeq.bitplan", "experts": {n: 3 for n in names}, "avg_bits": 3.0,
            "model": {"weights_sha256": model_info(model).weights_sha256}}
    plan["experts"].update(experts_override)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    return p


def test_quantize_into_the_model_folder_is_refused_and_the_model_kept(tiny_model, tmp_path, capsys):
    before = tree(tiny_model)
    plan = _plan(tmp_path, tiny_model)
    for out in (tiny_model, tiny_model / "q"):
        code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", out, "--method", "rtn",
                          "--force"], capsys)
        assert code == 2 and "overlaps the input" in err and "Traceback" not in err
    assert tree(tiny_model) == before


def test_out_dot_in_a_project_folder_is_refused(tiny_model, tmp_path, capsys, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    code, err = main(["analyze", "--model", tiny_model, "--out", ".", "--samples", "2", "--force"], capsys)
    assert code == 2 and "not an output of mopeq-export" in err
    assert tree(project) == {"main.py": b"print('mine')"}


def test_quantize_balance_flags_reach_the_stage_and_bad_values_are_refused(tiny_model, tmp_path, capsys):
    """--balance-tokens / --balance-samples are QuantizeConfig's expert-balanced calibration: recorded as given,
    with the spare candidate tokens it added per layer; a negative count is refused before anything is written."""
    plan = _plan(tmp_path, tiny_model)
    code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "q", "--method", "gptq",
                      "--samples", "2", "--seq-len", "32", "--balance-tokens", "100000", "--balance-samples", "3"],
                     capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert rec["config"]["balance_tokens"] == 100000 and rec["config"]["balance_samples"] == 3
    code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "q0", "--method", "gptq",
                      "--samples", "2", "--seq-len", "32"], capsys)
    assert code == 0, err
    off = {e["name"]: e["tokens"] for e in json.loads((tmp_path / "q0" / "quantized.json").read_text())["experts"]}
    on = {e["name"]: e["tokens"] for e in rec["experts"]}
    assert all(on[n] >= off[n] for n in off) and sum(on.values()) > sum(off.values())  # the spare tokens arrived
    code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "q2", "--method", "gptq",
                      "--samples", "2", "--seq-len", "32", "--balance-tokens", "-1"], capsys)
    assert code == 2 and "expert-balanced calibration needs" in err and not (tmp_path / "q2").exists()


@pytest.mark.parametrize("widths,match", [({"x": 2.5}, "must be a JSON integer"), ({"x": "3"}, "must be a JSON integer"),
                                          ({"x": True}, "must be a JSON integer")])
def test_plans_with_non_integer_widths_are_refused(tiny_model, tmp_path, capsys, widths, match):
    plan = _plan(tmp_path, tiny_model)
    d = json.loads(plan.read_text())
    first = next(iter(d["experts"]))
    d["experts"][first] = widths["x"]
    plan.write_text(json.dumps(d))
    code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "q", "--method", "rtn"],
                     capsys)
    assert code == 2 and match in err and not (tmp_path / "q").exists()


def test_other_records_as_plan_and_bad_group_size_are_refused(tiny_model, tmp_path, capsys):
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"kind": "mopeq.sensitivity", "experts": {"a": 2}}))
    code, err = main(["quantize", "--model", tiny_model, "--plan", sens, "--out", tmp_path / "q", "--method", "rtn"],
                     capsys)
    assert code == 2 and "is not a bit plan" in err
    plan = _plan(tmp_path, tiny_model)
    code, err = main(["quantize", "--model", tiny_model, "--plan", plan, "--out", tmp_path / "q", "--method", "rtn",
                      "--group-size", "4096"], capsys)
    assert code == 2 and "is not offered" in err


def test_os_errors_become_one_line(tmp_path, capsys, monkeypatch):
    b = make_fake_bundle(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr("mopeq_export.sensitivity.load_report", full)
    code, err = main(["plan", "--sensitivity", b / "manifest.json", "--out", tmp_path / "p.json"], capsys)
    assert code == 2 and "No space left on device" in err and "free some space" in err and "Traceback" not in err
    monkeypatch.setattr("mopeq_export.sensitivity.load_report",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    code, err = main(["plan", "--sensitivity", b / "manifest.json", "--out", tmp_path / "p.json"], capsys)
    assert code == 2 and "read-only" in err


def test_plan_and_evaluate_refuse_a_folder_as_out(tiny_model, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    code, err = main(["plan", "--sensitivity", tmp_path / "none.json", "--out", folder], capsys)
    assert code == 2 and "is a folder" in err
    code, err = main(["evaluate", "--model", tiny_model, "--quantized", tmp_path / "q", "--data",
                      tiny_model / "config.json", "--out", folder], capsys)
    assert code == 2 and "is a folder" in err and leftovers(tmp_path) == []


def test_evaluate_refuses_data_of_the_wrong_kind(tiny_model, tmp_path, capsys):
    npz = tmp_path / "v.npz"
    np.savez(npz, a=np.zeros(1))
    code, err = main(["evaluate", "--model", tiny_model, "--quantized", tmp_path / "q", "--data", npz], capsys)
    assert code == 2 and "VQA (image-text) data but the model is a text model" in err
    binary = tmp_path / "b.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    from mopeq_export.evaluate import text_windows
    from mopeq_export.models.loading import load_tokenizer

    with pytest.raises(MopeqError, match="not UTF-8 text"):
        text_windows(binary, load_tokenizer(tiny_model))


def test_a_dangling_weights_link_is_one_line(tiny_model, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    code, err = main(["analyze", "--model", m, "--out", tmp_path / "s"], capsys)
    assert code == 2 and "broken link" in err


def test_build_context_zero_is_refused(tiny_model, tmp_path, capsys):
    code, err = main(["build", "--model", tiny_model, "--target", "cpu", "--out", tmp_path / "b", "--context", "0",
                      "--cache", tmp_path / "c"], capsys)
    assert code == 2 and "--context 0 is outside" in err


# -- the runtime ---------------------------------------------------------------------------------------------
def test_run_refuses_bad_sampling_and_lengths(tmp_path, capsys):
    b = make_fake_bundle(tmp_path)
    for flags, match in ((["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0"),
                         (["--temperature", "nan"], "finite temperature"), (["--temperature", "inf"], "finite temperature")):
        code, err = main(["run", b, "--prompt", "The", *flags], capsys)
        assert code == 2 and match in err and "Traceback" not in err
    m = mopeq_runtime.load(b)
    with pytest.raises(InputError, match="integers"):
        m.generate([1.7, 2.2], max_new_tokens=1)
    with pytest.raises(InputError, match="integers"):
        m.forward(np.array([[1.5]]))
    with pytest.raises(InputError, match="batch >= 1"):
        m.forward(np.zeros((0, 3), np.int64))


def _load_in_child(bundle: Path, kernel_library: Path | None = None) -> subprocess.CompletedProcess:
    extra = f", kernel_library={str(kernel_library)!r}" if kernel_library else ""
    code = (f"import mopeq_runtime\ntry:\n    mopeq_runtime.load({str(bundle)!r}{extra})\n"
            "except mopeq_runtime.BundleError as e:\n    print('refused:', e)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_truncated_kernel_library_is_an_error_not_a_crash(tmp_path):
    if not LIB.is_file():
        pytest.skip("kernel library not built (make kernels)")
    cut = tmp_path / "libmopeq_ops.so"
    cut.write_bytes(LIB.read_bytes()[: LIB.stat().st_size // 2])
    r = _load_in_child(make_fake_bundle(tmp_path / "a"), kernel_library=cut)  # a device-built library
    assert r.returncode == 0 and "refused:" in r.stdout and "truncated" in r.stdout, (r.returncode, r.stderr)
    r = _load_in_child(make_fake_bundle(tmp_path / "b", kernel_library=cut))  # in the bundle, its hash re-recorded
    assert r.returncode == 0 and "refused:" in r.stdout and "truncated" in r.stdout, (r.returncode, r.stderr)


def test_unvalidated_bundles_are_refused_unless_allowed(tmp_path, capsys):
    b = make_fake_bundle(tmp_path, validation={"status": "pending"})
    with pytest.raises(BundleError, match="never passed the accuracy gate"):
        mopeq_runtime.load(b)
    assert mopeq_runtime.load(b, allow_unvalidated=True).generate("The", max_new_tokens=1).prompt_tokens > 0
    code, err = main(["verify", b], capsys)
    assert code == 2 and "never passed" in err
    assert main(["verify", b, "--allow-unvalidated"], capsys)[0] == 0


def test_inspect_and_verify_exit_nonzero_on_tampering(tmp_path, capsys):
    b = make_fake_bundle(tmp_path)
    assert main(["inspect", b], capsys)[0] == 0 and main(["verify", b], capsys)[0] == 0
    (b / "tokenizer.json").write_text("{}")
    code, err = main(["inspect", b], capsys)
    assert code == 2 and "tokenizer.json" in err
    code, err = main(["verify", b], capsys)
    assert code == 2 and "tokenizer.json" in err


def test_manifest_without_graphs_is_one_line(tmp_path, capsys):
    b = make_fake_bundle(tmp_path)
    d = json.loads((b / "manifest.json").read_text())
    d["graphs"] = []
    (b / "manifest.json").write_text(json.dumps(d))
    code, err = main(["run", b, "--prompt", "x"], capsys)
    assert code == 2 and "malformed" in err and "Traceback" not in err


# -- signatures ------------------------------------------------------------------------------------------------
def test_signed_bundle_verifies_and_tampered_or_unsigned_is_refused(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", "--out", keys / "release"], capsys)[0] == 0
    assert stat.S_IMODE((keys / "release.key").stat().st_mode) == 0o600
    assert main(["keygen", "--out", keys / "other"], capsys)[0] == 0
    b = make_fake_bundle(tmp_path / "a")
    pub, other = keys / "release.pub", keys / "other.pub"
    code, err = main(["verify", b, "--key", pub], capsys)
    assert code == 2 and "not signed" in err  # unsigned, keys given
    with pytest.raises(BundleError, match="not signed"):
        mopeq_runtime.load(b, trusted_keys=[pub])
    assert main(["sign", b, "--key", keys / "release.key"], capsys)[0] == 0
    assert main(["verify", b, "--key", pub], capsys)[0] == 0
    assert main(["verify", b, "--key", other, "--key", pub], capsys)[0] == 0  # any one trusted key
    assert mopeq_runtime.load(b, trusted_keys=[pub.read_bytes()]).generate("The", max_new_tokens=1)
    code, err = main(["verify", b, "--key", other], capsys)
    assert code == 2 and "does not verify with any trusted key" in err
    # the manifest edited (gate result, eos id, ...) and re-hashed consistently: the signature catches it
    d = json.loads((b / "manifest.json").read_text())
    d["tokenizer"]["eos_id"] = (d["tokenizer"]["eos_id"] or 0) + 1
    (b / "manifest.json").write_text(json.dumps(d, indent=2) + "\n")
    with pytest.raises(BundleError, match="does not verify"):
        mopeq_runtime.load(b, trusted_keys=[pub])
    assert mopeq_runtime.load(b).manifest.tokenizer.eos_id == d["tokenizer"]["eos_id"]  # without keys: no signature check (documented)
    # a signature file that is garbage
    (b / "manifest.sig").write_text("not json")
    with pytest.raises(BundleError, match="malformed"):
        mopeq_runtime.load(b, trusted_keys=[pub])


def test_build_signs_and_rejects_a_bad_key_before_working(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    code, err = main(["build", "--model", tiny_model, "--target", "cpu", "--out", tmp_path / "b",
                      "--cache", tmp_path / "c", "--sign-key", bad], capsys)
    assert code == 2 and "not an unencrypted PEM private key" in err and not (tmp_path / "c").exists()


# -- archives ---------------------------------------------------------------------------------------------------
def _tar(src: Path, dest: Path, extra: dict[str, bytes] | None = None, mode="w:gz") -> Path:
    import io

    with tarfile.open(dest, mode) as tf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                tf.add(p, p.relative_to(src).as_posix())
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return dest


def test_archive_members_are_checked_before_anything_is_written(tmp_path, monkeypatch):
    b = make_fake_bundle(tmp_path / "a")
    good = _tar(b, tmp_path / "good.tar.gz")
    assert mopeq_runtime.load(good).generate("The", max_new_tokens=1).prompt_tokens > 0
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    bomb = _tar(b, tmp_path / "bomb.tar.gz", {"padding.bin": bytes(50 << 20)})  # 50 MB of zeros: ~50 KB packed
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="padding.bin is not listed"):
        mopeq_runtime.load(bomb)
    assert list(scratch.iterdir()) == []  # nothing was unpacked
    d = json.loads((b / "manifest.json").read_text())
    big = next(f for f in d["files"] if f["path"].endswith(".onnx"))
    swapped = _tar(b, tmp_path / "swapped.tar", {}, mode="w")
    with tarfile.open(swapped, "a") as tf:  # a later member of the same name, of another size
        info = tarfile.TarInfo(big["path"])
        info.size = big["size"] + 10
        import io

        tf.addfile(info, io.BytesIO(bytes(big["size"] + 10)))
    with pytest.raises(BundleError, match="repeated names"):
        mopeq_runtime.load(swapped)
    assert list(scratch.iterdir()) == []


def test_a_single_probe_analysis_writes_a_valid_record(tiny_model, tmp_path, capsys):
    code, err = main(["analyze", "--model", tiny_model, "--out", tmp_path / "s", "--probes", "1", "--samples", "4",
                      "--batch-size", "2", "--seq-len", "16"], capsys)
    assert code == 0, err
    d = json.loads((tmp_path / "s" / "sensitivity.json").read_text())  # strict JSON: no Infinity
    routed = [e for e in d["experts"] if not e["no_tokens"]]
    assert d["probes"] == 1 and routed and all(e["hessian_trace_stderr"] is None for e in routed)
    from mopeq_export.allocation import PlanConfig, plan_from_file

    plan, _ = plan_from_file(tmp_path / "s" / "sensitivity.json", PlanConfig(method="budget", avg_bits=3.0))
    assert len(plan.experts) == len(d["experts"])
