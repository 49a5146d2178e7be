"""Installed, not run from the checkout: the runtime's wheel in a fresh virtual environment without torch, and
the toolchain's wheel building a bundle from a folder that is not the checkout.

Slow (wheel builds compile the kernel library; the fresh environments install from the package index)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import mopeq_runtime

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
pytestmark = pytest.mark.slow

PROMPT_IDS = [11, 405, 87, 1200, 9, 33]
NEW_TOKENS = 12


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _ort_headers_env() -> dict:
    """The kernel build finds the ORT headers `make kernels` fetched (it would fetch them itself otherwise)."""
    env = dict(os.environ)
    headers = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"
    if headers.is_dir():
        env.setdefault("ORT_INCLUDE_DIR", str(headers))
    env.pop("MOPEQ_KERNEL_LIBRARY", None)
    env["MOPEQ_CUDA"] = "OFF"  # the CPU wheel: where nvcc is found, the default (AUTO) also compiles the CUDA library
    return env


@pytest.fixture(scope="module")
def runtime_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runtime-wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT / "runtime"], env=_ort_headers_env())
    (wheel,) = out.glob("mopeq_runtime-*.whl")
    return wheel


def test_runtime_wheel_carries_its_kernel_and_sources(runtime_wheel):
    import zipfile

    names = zipfile.ZipFile(runtime_wheel).namelist()
    assert "mopeq_runtime/lib/libmopeq_ops.so" in names
    assert "mopeq_runtime/csrc/CMakeLists.txt" in names and "mopeq_runtime/csrc/include/mopeq_format.h" in names
    assert not any(n.startswith(("mopeq_export/", "mopeq_exporters/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [l for l in zipfile.ZipFile(runtime_wheel).read(meta).decode().splitlines()
                if l.startswith("Requires-Dist:") and "extra ==" not in l]
    assert sorted(r.split()[1].split(">")[0].split("=")[0] for r in requires) == ["numpy", "onnxruntime", "tokenizers"]


def test_runtime_sdist_is_complete(tmp_path):
    """The source distribution a Jetson builds from: it holds the kernel sources and the header fetcher,
    and a wheel built from it (here, for this machine) carries the compiled library."""
    import tarfile
    import zipfile

    _run([sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path, ROOT / "runtime"], env=_ort_headers_env())
    (sdist,) = tmp_path.glob("mopeq_runtime-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for needed in ("csrc/CMakeLists.txt", "csrc/fetch_debian_headers.sh", "csrc/src/op.cc", "csrc/src/qgemm_i8_neon.cc",
                   "mopeq_runtime/__init__.py", "pyproject.toml"):
        assert any(n.endswith(needed) for n in names), needed
    assert not any("/lib/" in n and n.endswith(".so") for n in names), "no prebuilt binary in the sdist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "w", sdist], env=_ort_headers_env())
    (wheel,) = (tmp_path / "w").glob("mopeq_runtime-*.whl")
    assert "mopeq_runtime/lib/libmopeq_ops.so" in zipfile.ZipFile(wheel).namelist()


def test_runtime_alone_in_a_fresh_venv_generates_the_same_tokens(runtime_wheel, text_cpu_bundle, tmp_path):
    py = _fresh_venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", runtime_wheel])
    probe = ("import importlib.util, json, sys, mopeq_runtime\n"
             "m = mopeq_runtime.load(sys.argv[1])\n"
             f"g = m.generate({PROMPT_IDS}, max_new_tokens={NEW_TOKENS}, stop_on_eos=False)\n"
             "print(json.dumps({'ids': g.token_ids, 'kernel': m.uses_kernel, 'file': mopeq_runtime.__file__,\n"
             "                  'torch': importlib.util.find_spec('torch') is not None,\n"
             "                  'toolchain': importlib.util.find_spec('mopeq_export') is not None}))\n")
    r = _run([py, "-c", probe, text_cpu_bundle], cwd=tmp_path)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["torch"] and not got["toolchain"], "the runtime's environment must hold no torch and no toolchain"
    assert got["file"].startswith(str(tmp_path / "venv")) and got["kernel"]
    here = mopeq_runtime.load(text_cpu_bundle).generate(PROMPT_IDS, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    assert got["ids"] == list(here.token_ids) and len(got["ids"]) == NEW_TOKENS


def test_installed_toolchain_builds_with_held_out_gate(runtime_wheel, text_cpu_bundle, session_cache, tmp_path):
    """The toolchain's wheel (no source checkout on its path) builds text-moe's bundle; its gate ran on the
    shipped held-out text, found through the installed package. Torch and the other heavy dependencies come
    from this test environment through a path entry (the fresh venv would otherwise download torch again);
    mopeq_export and mopeq_runtime themselves come only from the two wheels."""
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, ROOT])
    (toolchain,) = wheels.glob("mopeq_export-*.whl")
    py = _fresh_venv(tmp_path / "venv")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "test_dependencies.pth").write_text(f"{deps}\n")  # a plain path: its editable finders stay inactive
    _run([py, "-m", "pip", "install", "-q", "--no-deps", toolchain, runtime_wheel])
    where = _run([py, "-c", "import mopeq_export, mopeq_runtime, mopeq_exporters; "
                           "print(mopeq_export.__file__, mopeq_runtime.__file__, mopeq_exporters.__file__)"],
                 cwd=tmp_path).stdout.split()
    assert all(w.startswith(str(site)) for w in where), where
    out = tmp_path / "bundle"
    # the session's stage cache: the installed modules hash like the checkout's, so analyze, quantize and
    # export are reused and this build validates and packages
    _run([py, "-m", "mopeq_export", "build", "--model", SHARED / "models" / "text-moe", "--target", "cpu",
          "--avg-bits", "2.5", "--calib", SHARED / "data" / "text_calib.txt", "--out", out, "--cache", session_cache],
         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    man = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "validation" / "report.json").read_text())
    assert man["validation"]["passed"] and man["kernel"]["status"] == "binary"
    assert report["data"]["is_calibration_data"] is False and report["data"]["file"] == "text_eval.txt"
