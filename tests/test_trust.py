"""What a load, `verify`, `sign` and `--force` guarantee under attack (docs/BUNDLE.md, "What a load guarantees";
README "Outputs"): outputs recognised by the tool's own record, one writer per output, files used through the
descriptors they were checked from, the bundle's values checked against each other and its graphs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import mopeq_runtime
import mopeq_runtime.manifest
from fake_export import make_fake_bundle
from mopeq_export.errors import MopeqError
from mopeq_export.fsutil import (OUTPUT_MARKER, check_out, output_lock, require_free_space, sha256_file, staged_dir)
from mopeq_runtime.errors import BundleError
from test_safety import LIB, main, tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rehash(bundle: Path, edit=None) -> dict:
    """Rewrite manifest.json after `edit(manifest dict)`, with every file's size and hash re-recorded (what an
    attacker who can write the folder does)."""
    d = json.loads((bundle / "manifest.json").read_text())
    if edit:
        edit(d)
    for f in d["files"]:
        p = bundle / f["path"]
        if p.is_file():
            f["size"], f["sha256"] = p.stat().st_size, sha256_file(p)
    (bundle / "manifest.json").write_text(json.dumps(d, indent=2) + "\n")
    return d


# -- --force: the tool's own record, exactly ---------------------------------------------------------------
def test_force_never_takes_a_stub_manifest_for_a_bundle(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "mopeq.bundle"}\n')
    (out / "important.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(MopeqError, match="not a complete bundle manifest"):
        with staged_dir(out, "bundle", force=True) as st:
            (st / "x").write_text("1")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, err = main(["build", "--model", model, "--target", "cpu", "--out", out, "--force"], capsys)
    assert code == 2 and "not a complete bundle manifest" in err
    assert tree(out) == before


def test_force_refuses_a_previous_bundle_holding_a_users_file_and_replaces_exactly_a_clean_one(tmp_path):
    b = make_fake_bundle(tmp_path / "a")
    (b / "NOTES.txt").write_text("mine")
    before = tree(b)
    with pytest.raises(MopeqError, match=r"NOTES\.txt \(not written by the tool\)"):
        with staged_dir(b, "bundle", force=True) as st:
            (st / "new").write_text("1")
    assert tree(b) == before
    (b / "NOTES.txt").unlink()
    (b / "tokenizer.json").write_text("{}")  # a recorded file changed since the build: not the tool's any more
    with pytest.raises(MopeqError, match=r"tokenizer\.json \(changed since the tool wrote it\)"):
        check_out(b, "bundle", force=True)
    shutil.copy(tmp_path / "a" / "model" / "tokenizer.json", b / "tokenizer.json")
    (b / "extra").mkdir()  # an unknown empty folder is not the tool's either
    with pytest.raises(MopeqError, match=r"folder extra/"):
        check_out(b, "bundle", force=True)
    (b / "extra").rmdir()
    with staged_dir(b, "bundle", force=True) as st:
        (st / "new").write_text("1")
    assert tree(b) == {"new": b"1"} and not [p for p in tmp_path.joinpath("a").iterdir() if ".old-" in p.name]


def test_other_outputs_record_their_files_and_force_keeps_foreign_ones(tmp_path):
    out = tmp_path / "sens"
    with staged_dir(out, "analyze") as st:
        (st / "sensitivity.json").write_text("{}")
        (st / "sub").mkdir()
        (st / "sub" / "plot.png").write_bytes(b"png")
    rec = json.loads((out / OUTPUT_MARKER).read_text())
    assert rec["kind"] == "analyze" and sorted(rec["files"]) == ["sensitivity.json", "sub/plot.png"]
    (out / "sub" / "mine.txt").write_text("keep")
    with pytest.raises(MopeqError, match=r"sub/mine\.txt"):
        check_out(out, "analyze", force=True)
    (out / "sub" / "mine.txt").unlink()
    (out / OUTPUT_MARKER).write_text(json.dumps({"kind": "analyze", "tool": "mopeq-export"}))  # no file list
    with pytest.raises(MopeqError, match="no valid file list"):
        check_out(out, "analyze", force=True)


def test_a_record_naming_files_outside_its_folder_is_not_the_tools(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text(json.dumps({"kind": "analyze", "tool": "mopeq-export", "files": {
        "../victim.txt": [victim.stat().st_size, sha256_file(victim)]}}))
    with pytest.raises(MopeqError, match="no valid file list"):
        with staged_dir(out, "analyze", force=True) as st:
            (st / "x").write_text("1")
    assert victim.read_text() == "mine"


# -- one writer per output ------------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from mopeq_export.fsutil import output_lock
with output_lock(Path(sys.argv[1]).resolve()):
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
"""


def _hold(dest: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"ready-{dest.name}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(dest), str(ready), str(seconds)])
    for _ in range(300):
        if ready.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the lock-holding process did not start")


def test_a_second_writer_of_the_same_out_refuses_naming_the_first(tmp_path, capsys):
    out = tmp_path / "bundle"
    holder = _hold(out, 30, tmp_path)
    try:
        with pytest.raises(MopeqError, match=rf"another mopeq-export \(pid {holder.pid}\) is writing"):
            with staged_dir(out, "bundle") as st:
                (st / "x").write_text("1")
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text("{}")
        code, err = main(["build", "--model", model, "--target", "cpu", "--out", out], capsys)
        assert code == 2 and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    with staged_dir(out, "bundle") as st:  # the lock of a killed holder does not block anyone
        (st / "x").write_text("1")
    assert tree(out) == {"x": b"1"} and not (tmp_path / ".bundle.lock").exists()


def test_builds_sharing_a_cache_wait_for_an_entry_then_use_it(tmp_path):
    from mopeq_export.pipeline import StageCache

    said = []
    cache = StageCache(tmp_path / "cache", lambda stage, msg: said.append(msg))
    made = []

    def make(st: Path) -> None:
        made.append(1)
        (st / "plan.json").write_text("{}")

    # find the entry's folder name the way get() does, then let another process hold its lock for a while
    first, _ = cache.get("plan", {"k": 1}, make)
    shutil.rmtree(first)
    holder = _hold(first, 1.5, tmp_path)
    try:
        again, _ = cache.get("plan", {"k": 1}, make)
    finally:
        holder.wait()
    assert again == first and len(made) == 2
    assert any(m.startswith(f"waiting for another mopeq-export (pid {holder.pid})") for m in said)


# -- loads under a writer flipping files -----------------------------------------------------------------------
FOREIGN = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void foreign() {
  const char* p = std::getenv("MOPEQ_FOREIGN_MARKER");
  if (p) { FILE* f = std::fopen(p, "a"); if (f) { std::fputs("ran\n", f); std::fclose(f); } }
}
"""

FLIP = """
import os, random, sys, time
pairs = [(sys.argv[i], sys.argv[i + 1], sys.argv[i + 2]) for i in range(2, len(sys.argv), 3)]
stop = sys.argv[1]
k = 0
while not os.path.exists(stop):
    for target, a, b in pairs:
        src = a if k % 2 else b
        tmp = target + ".flip"
        with open(src, "rb") as f, open(tmp, "wb") as g:
            g.write(f.read())
        os.replace(tmp, target)
    k += 1
    time.sleep(random.choice((0.0002, 0.0002, 0.02)))  # bursts of flips, and quiet spells a load can fit in
"""


@pytest.fixture(scope="module")
def foreign_library(tmp_path_factory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the foreign library")
    d = tmp_path_factory.mktemp("foreign")
    (d / "foreign.cc").write_text(FOREIGN)
    subprocess.run([cxx, "-shared", "-fPIC", "-o", str(d / "libforeign.so"), str(d / "foreign.cc")], check=True)
    return d / "libforeign.so"


@pytest.mark.parametrize("flip", ["library", "manifest+library"])
def test_signed_loads_under_a_flipping_writer_never_run_foreign_code_nor_use_unsigned_content(
        tmp_path, foreign_library, flip, capsys):
    if not LIB.is_file():
        pytest.skip("kernel library not built (make kernels)")
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", "--out", keys / "k"], capsys)[0] == 0
    b = make_fake_bundle(tmp_path / "a", kernel_library=LIB)
    assert main(["sign", b, "--key", keys / "k.key"], capsys)[0] == 0
    lib = b / "lib" / LIB.name
    genuine_manifest = (b / "manifest.json").read_bytes()
    spare = tmp_path / "spare"
    spare.mkdir()
    shutil.copy(lib, spare / "genuine.so")
    shutil.copy(foreign_library, spare / "foreign.so")
    shutil.copy(b / "manifest.json", spare / "genuine.json")
    forged = json.loads(genuine_manifest)
    entry = next(f for f in forged["files"] if f["path"] == f"lib/{LIB.name}")
    entry["size"], entry["sha256"] = foreign_library.stat().st_size, sha256_file(foreign_library)
    (spare / "forged.json").write_text(json.dumps(forged, indent=2) + "\n")
    pairs = [str(lib), str(spare / "genuine.so"), str(spare / "foreign.so")]
    if flip == "manifest+library":
        pairs += [str(b / "manifest.json"), str(spare / "genuine.json"), str(spare / "forged.json")]
    marker = tmp_path / "foreign-ran"
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", FLIP, str(stop), *pairs])
    ok = refused = 0
    try:  # fresh processes: dlopen() reuses a library already loaded under the same name, hiding a swap
        for _ in range(20):
            r = subprocess.run([sys.executable, "-c", LOADS, str(b), str(keys / "k.pub"), str(spare / "genuine.json"),
                                "10"], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "MOPEQ_FOREIGN_MARKER": str(marker)})
            assert r.returncode == 0, r.stderr[-2000:]
            got = json.loads(r.stdout.splitlines()[-1])
            ok, refused = ok + got["ok"], refused + got["refused"]
    finally:
        stop.write_text("")
        writer.wait(timeout=30)
    print(f"{flip}: {ok} loads, {refused} refused")
    assert not marker.exists(), "the foreign library's constructor ran"
    assert ok + refused == 200 and refused > 0  # the writer did interfere
    assert ok > 0 or flip == "manifest+library"


LOADS = """
import json, sys
import mopeq_runtime
import mopeq_runtime.manifest
from mopeq_runtime.manifest import parse_manifest
bundle, key, genuine, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
want = parse_manifest(open(genuine, "rb").read(), "genuine")
ok = refused = 0
for _ in range(n):
    try:
        m = mopeq_runtime.load(bundle, trusted_keys=[key], threads=1)
    except mopeq_runtime.BundleError:
        refused += 1
        continue
    assert m.kernel.used, m.kernel.reason
    assert m.manifest == want, "a load used a manifest other than the signed one"
    ok += 1
print(json.dumps({"ok": ok, "refused": refused}))
"""


def test_a_file_written_in_place_during_a_load_is_refused(tmp_path):
    from mopeq_runtime.files import BundleFiles

    b = make_fake_bundle(tmp_path / "a")
    files = BundleFiles(b, str(b))
    try:
        d = json.loads((b / "manifest.json").read_text())
        tok = next(f for f in d["files"] if f["path"] == "tokenizer.json")
        files.hold("tokenizer.json", tok["size"], tok["sha256"])
        time.sleep(0.01)
        with open(b / "tokenizer.json", "r+b") as f:  # same inode, same size, new bytes
            f.write(b" ")
        with pytest.raises(BundleError, match="was modified while the bundle was loading"):
            files.check_unchanged()
    finally:
        files.close()


def test_links_inside_a_bundle_are_refused(tmp_path):
    b = make_fake_bundle(tmp_path / "a")
    real = tmp_path / "elsewhere.json"
    shutil.move(b / "tokenizer.json", real)
    (b / "tokenizer.json").symlink_to(real)
    with pytest.raises(BundleError, match="symbolic link"):
        mopeq_runtime.load(b)


# -- the bundle's own values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model"].update(vocab=10_000_000), "logits' width"),
    (lambda d: d["tokenizer"].update(eos_id=1_000_000_000), "tokenizer.eos_id"),
    (lambda d: d["target"].update(context_length=-5), "target.context_length = -5"),
    (lambda d: d["model"].update(kv_cache=[[3, 4, 2, 4]]), "heads is 2, the manifest says 3"),
    (lambda d: d["target"].update(activation_dtype="float16"), "is float32, the target's activations are float16"),
])
def test_manifest_values_disagreeing_with_each_other_or_the_graphs_are_refused(tmp_path, capsys, edit, match):
    b = make_fake_bundle(tmp_path / "a")
    rehash(b, edit)
    with pytest.raises(BundleError, match=match):
        mopeq_runtime.load(b)
    code, err = main(["verify", b], capsys)
    assert code == 2 and "Traceback" not in err


def test_genai_config_naming_a_path_outside_the_bundle_is_refused_everywhere(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", "--out", keys / "k"], capsys)[0] == 0
    b = make_fake_bundle(tmp_path / "a", kernel_library=LIB if LIB.is_file() else None)
    cfg = json.loads((b / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["custom_ops_library"] = "../../evil/libevil.so"
    (b / "genai_config.json").write_text(json.dumps(cfg))
    rehash(b)
    for argv in (["verify", b], ["inspect", b], ["sign", b, "--key", keys / "k.key"]):
        code, err = main(argv, capsys)
        assert code == 2 and "custom_ops_library" in err and "Traceback" not in err, (argv, err)
    assert not (b / "manifest.sig").exists()
    with pytest.raises(BundleError, match="every path it names must be a file of the bundle"):
        mopeq_runtime.load(b)
    cfg["model"]["decoder"]["session_options"].pop("custom_ops_library")
    cfg["model"]["decoder"]["filename"] = "other.onnx"
    (b / "genai_config.json").write_text(json.dumps(cfg))
    rehash(b)
    with pytest.raises(BundleError, match="genai_config.json names"):
        mopeq_runtime.load(b)


def test_an_archive_of_many_folder_members_is_refused_before_unpacking(tmp_path, monkeypatch):
    b = make_fake_bundle(tmp_path / "a")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    dest = tmp_path / "folders.tar"
    with tarfile.open(dest, "w") as tf:
        for p in sorted(b.rglob("*")):
            if p.is_file():
                tf.add(p, p.relative_to(b).as_posix())
        for i in range(20_000):
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    with pytest.raises(BundleError, match="members"):
        mopeq_runtime.load(dest)
    one = tmp_path / "one.tar"
    with tarfile.open(one, "w") as tf:
        for p in sorted(b.rglob("*")):
            if p.is_file():
                tf.add(p, p.relative_to(b).as_posix())
        info = tarfile.TarInfo("stray")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    with pytest.raises(BundleError, match="folder stray/ holds no file"):
        mopeq_runtime.load(one)
    assert list(scratch.iterdir()) == []


def test_an_extra_folder_in_a_bundle_is_refused(tmp_path, capsys):
    b = make_fake_bundle(tmp_path / "a")
    (b / "empty").mkdir()
    with pytest.raises(BundleError, match="folders its manifest does not account for"):
        mopeq_runtime.load(b)
    code, err = main(["verify", b], capsys)
    assert code == 2 and "empty" in err


# -- tracebacks and messages -------------------------------------------------------------------------------------
def test_keygen_with_an_empty_name_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", ".", "keys/.."):
        code, err = main(["keygen", "--out", out], capsys)
        assert code == 2 and "not a key name" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_signature_without_key_id_is_malformed_not_a_traceback(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["keygen", "--out", keys / "k"], capsys)[0] == 0
    b = make_fake_bundle(tmp_path / "a")
    assert main(["sign", b, "--key", keys / "k.key"], capsys)[0] == 0
    sig = json.loads((b / "manifest.sig").read_text())
    del sig["key_id"]
    (b / "manifest.sig").write_text(json.dumps(sig))
    for argv in (["verify", b], ["verify", b, "--key", keys / "k.pub"]):
        code, err = main(argv, capsys)
        assert code == 2 and "malformed" in err and "key_id" in err and "Traceback" not in err, err


def test_a_folder_or_a_device_as_key_says_so(tmp_path, capsys):
    b = make_fake_bundle(tmp_path / "a")
    for key, said in ((tmp_path, "is a folder"), (Path("/dev/zero"), "not a regular file")):
        code, err = main(["verify", b, "--key", key], capsys)
        assert code == 2 and said in err and "not found" not in err, err
        code, err = main(["sign", b, "--key", key], capsys)
        assert code == 2 and said in err, err


def test_read_only_and_small_sizes_are_said_as_such(tmp_path, monkeypatch):
    import mopeq_export.fsutil as fsutil

    class RO:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(fsutil.os, "access", lambda *a, **k: False)
    monkeypatch.setattr(fsutil.os, "statvfs", lambda p: RO())
    with pytest.raises(MopeqError, match="read-only file system") as e:
        require_free_space(tmp_path / "out", 1 << 20, "the sensitivity file")
    assert "GiB" not in str(e.value)
    with pytest.raises(MopeqError, match="read-only"):
        check_out(tmp_path / "out", "analyze")
    monkeypatch.undo()
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1500))
    with pytest.raises(MopeqError, match=r"needs about 5\.50 KiB but .* has 1\.46 KiB free"):
        require_free_space(tmp_path, 5 * 1024, "the plan")


def test_verify_of_an_archive_names_the_archive(tmp_path, capsys):
    b = make_fake_bundle(tmp_path / "a")
    t = tmp_path / "b.tar"
    with tarfile.open(t, "w") as tf:
        for p in sorted(b.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                if p.name == "tokenizer.json":
                    data = data[:-2] + (b"  " if data[-2:] != b"  " else b"\n\n")  # same size, other bytes
                info = tarfile.TarInfo(p.relative_to(b).as_posix())
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    code, err = main(["verify", t], capsys)
    assert code == 2 and str(t) in err and "mopeq-bundle-" not in err, err


def test_inspect_of_an_unvalidated_leftover_exits_nonzero(tmp_path, capsys):
    b = make_fake_bundle(tmp_path / "a", validation={"status": "pending"})
    code, err = main(["inspect", b], capsys)
    assert code == 2 and "never passed the accuracy gate" in err
    assert main(["inspect", b, "--allow-unvalidated"], capsys)[0] == 0


def test_the_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    out = tmp_path / "o"
    errors = []
    with output_lock(out):
        with output_lock(out):  # the same thread: nested use (build -> staged_dir) is fine
            pass

        def other():
            try:
                with output_lock(out):
                    pass
            except MopeqError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors and "is writing" in errors[0]
    assert not (tmp_path / ".o.lock").exists()


# -- found by review: reuse of library names, paths outside, races of removal, odd values --------------------------
RELOAD = """
import sys
import mopeq_runtime
a = mopeq_runtime.load(sys.argv[1])
assert a.kernel.used, a.kernel.reason
mopeq_runtime.load(sys.argv[2])  # its library's constructor must run: its own bytes, not a's copy
"""


def test_a_second_bundle_in_the_same_process_runs_its_own_library(tmp_path, foreign_library):
    if not LIB.is_file():
        pytest.skip("kernel library not built (make kernels)")
    a = make_fake_bundle(tmp_path / "a", kernel_library=LIB)
    b = make_fake_bundle(tmp_path / "b", kernel_library=foreign_library)
    marker = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-c", RELOAD, str(a), str(b)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MOPEQ_FOREIGN_MARKER": str(marker)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.exists(), "the second bundle ran the first bundle's library"


def test_paths_outside_the_bundle_are_refused_even_without_hashes(tmp_path):
    b = make_fake_bundle(tmp_path / "a")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(b / "tokenizer.json", outside / "tokenizer.json")
    for edit in (lambda d: d["tokenizer"].update(file="../outside/tokenizer.json"),
                 lambda d: d["tokenizer"].update(file=str(outside / "tokenizer.json")),
                 lambda d: d["graphs"][0].update(data_files=["decoder.onnx.data", "sub/decoder.onnx.data"])):
        c = tmp_path / "c"
        shutil.rmtree(c, ignore_errors=True)
        shutil.copytree(b, c)
        rehash(c, edit)
        with pytest.raises(BundleError, match="not a path inside the bundle|does not list its hash|beside"):
            mopeq_runtime.load(c, verify=False)


def test_replacing_never_follows_a_link_swapped_in_after_the_check(tmp_path):
    from mopeq_export.fsutil import output_record, remove_recorded

    out = tmp_path / "out"
    with staged_dir(out, "analyze") as st:
        (st / "sub").mkdir()
        (st / "sub" / "a.txt").write_text("ours")
        (st / "b.txt").write_text("ours too")
    rec, _ = output_record(out)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.txt").write_text("ours")  # same bytes as the recorded file, elsewhere
    shutil.rmtree(out / "sub")
    (out / "sub").symlink_to(victim)  # swapped in between the check and the removal
    (out / "b.txt").write_text("changed")  # and a recorded file changed meanwhile
    kept = remove_recorded(out, rec)
    assert (victim / "a.txt").read_text() == "ours" and (out / "b.txt").read_text() == "changed"
    assert "b.txt" in kept and "sub" in kept


def test_outputs_into_an_empty_folder_and_a_cache_behind_a_link_leave_nothing_behind(tmp_path):
    from mopeq_export.pipeline import StageCache

    empty = tmp_path / "E"
    empty.mkdir()
    with staged_dir(empty, "analyze") as st:
        (st / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E"]
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cache = StageCache(tmp_path / "link" / ".." / "link" / "c", lambda *a: None)
    entry, _ = cache.get("plan", {"k": 2}, lambda st: (st / "plan.json").write_text("{}"))
    assert (entry / "plan.json").is_file()
    again, _ = cache.get("plan", {"k": 2}, lambda st: pytest.fail("a complete entry is used, not remade"))
    assert again == entry


def test_a_bundle_reached_through_a_link_loads(tmp_path, capsys):
    b = make_fake_bundle(tmp_path / "a")
    current = tmp_path / "current"
    current.symlink_to(b)
    assert mopeq_runtime.load(current).generate("The", max_new_tokens=1).prompt_tokens > 0
    assert main(["verify", current], capsys)[0] == 0


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 100000 + "]" * 100000])  # a huge number, deep nesting
def test_absurd_manifest_values_are_one_line(tmp_path, capsys, value):
    import re

    b = make_fake_bundle(tmp_path / "a")
    text = re.sub(r'"vocab": \d+', '"vocab": ' + value, (b / "manifest.json").read_text(), count=1)
    (b / "manifest.json").write_text(text)
    with pytest.raises(BundleError):
        mopeq_runtime.load(b)
    code, err = main(["verify", b], capsys)
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("edit, ok", [
    (lambda c: c["model"]["decoder"]["inputs"].update(past_key_names="past_key_values.%d.%s"), False),
    (lambda c: c["model"].update(decoder="x"), False),
    (lambda c: c["model"].update(eos_token_id=[0, 1]), True),
])
def test_genai_configs_of_odd_shapes_are_judged_not_crashed_on(tmp_path, edit, ok):
    b = make_fake_bundle(tmp_path / "a")
    cfg = json.loads((b / "genai_config.json").read_text())
    edit(cfg)
    (b / "genai_config.json").write_text(json.dumps(cfg))
    rehash(b)
    if ok:
        mopeq_runtime.load(b)
    else:
        with pytest.raises(BundleError, match="genai_config.json"):
            mopeq_runtime.load(b)


def test_messages_with_brackets_are_printed_as_they_are(tmp_path, capsys):
    odd = tmp_path / "x[/bold]"
    code, err = main(["verify", odd], capsys)
    assert code == 2 and "x[/bold]" in err and "Traceback" not in err


def test_a_hash_table_being_written_by_another_build_costs_only_a_rehash(tmp_path):
    from mopeq_export.fsutil import cached_sha256

    data = tmp_path / "weights.bin"
    data.write_bytes(b"x" * 1000)
    table = tmp_path / "hashes.json"
    holder = _hold(table, 30, tmp_path)
    try:
        assert cached_sha256(data, table) == sha256_file(data)  # the table is busy: hashed, not cached, no error
    finally:
        holder.kill()
        holder.wait()
    assert cached_sha256(data, table) == sha256_file(data) and table.is_file()
