"""The C++ embedding example (examples/cpp): built with CMake, run on a real cpu bundle of text-moe, its greedy
token ids equal mopeq_runtime's for the same prompt ids and length; a damaged bundle file stops it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
PROMPTS = ["The os module", "def main():\n"]  # the trained model continues the first for long, stops the second at EOS
MAX_NEW = 48

pytestmark = pytest.mark.slow


def _env() -> dict:
    # The app must find ONNX Runtime through its RPATH, and be the wheel's ORT that mopeq_runtime uses here.
    return {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "ORT_ROOT")}


@pytest.fixture(scope="module")
def cpp_app(tmp_path_factory) -> Path:
    compilers = [c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)]
    if shutil.which("cmake") is None or not compilers:
        pytest.skip("building examples/cpp needs cmake and a C++17 compiler (none found on PATH)")
    build = tmp_path_factory.mktemp("cpp-example")
    for cmd in (["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DMOPEQ_PYTHON={sys.executable}"],
                ["cmake", "--build", str(build), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    app = build / "mopeq_cpp_generate"
    assert app.is_file()
    return app


def _run(app: Path, bundle: Path, ids: list[int], *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(app), str(bundle), "--ids", ",".join(map(str, ids)), "--max-new-tokens", str(MAX_NEW), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def python_model(text_cpu_bundle):
    import mopeq_runtime

    return mopeq_runtime.load(text_cpu_bundle)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cpp_greedy_tokens_equal_the_python_runtime(cpp_app, text_cpu_bundle, python_model, prompt):
    ids = python_model.tokenizer.encode(prompt)
    want = python_model.generate(ids, max_new_tokens=MAX_NEW, temperature=0)  # greedy, KV cache, stops at EOS
    r = _run(cpp_app, text_cpu_bundle, ids)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == list(want.token_ids)
    assert r.stdout.count("\n") == 1  # one line
    assert f"stop: {want.stop_reason}" in r.stderr
    assert python_model.kernel.used and "mopeq.MoEExperts runs in lib/libmopeq_ops.so" in r.stderr


def test_cpp_with_a_kernel_library_from_outside_the_bundle(cpp_app, text_cpu_bundle, python_model):
    """--kernel-library (a Jetson bundle's kernel built on the device): here the source tree's `make kernels` build."""
    from mopeq_runtime import native

    lib = native.packaged_library()
    if not lib.is_file():
        pytest.skip(f"no kernel library at {lib} (make kernels)")
    ids = python_model.tokenizer.encode(PROMPTS[0])
    r = _run(cpp_app, text_cpu_bundle, ids, "--kernel-library", str(lib))
    assert r.returncode == 0, r.stderr
    assert f"mopeq.MoEExperts runs in {lib}" in r.stderr
    assert [int(t) for t in r.stdout.split()] == list(python_model.generate(ids, max_new_tokens=MAX_NEW).token_ids)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["graph", "external data", "kernel library"])
def test_cpp_refuses_a_damaged_bundle(cpp_app, text_cpu_bundle, tmp_path, what):
    bad = tmp_path / "bundle"
    shutil.copytree(text_cpu_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    decoder = next(g for g in manifest["graphs"] if g["name"] == "decoder")
    if what == "kernel library":  # truncated: caught by its size before anything is loaded
        victim = manifest["kernel"]["library"]
        (bad / victim).write_bytes((bad / victim).read_bytes()[:4096])
        expect = f"bundle file {victim} has 4096 bytes"
    else:
        victim = decoder["file"] if what == "graph" else decoder["data_files"][0]
        _flip_middle_byte(bad / victim)
        expect = f"bundle file {victim} does not match its sha256 in the manifest"
    r = _run(cpp_app, bad, [1, 2, 3])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and expect in r.stderr, r.stderr


def test_cpp_device_cuda_is_refused_with_the_reason_where_it_cannot_run(cpp_app, text_cpu_bundle):
    """--device cuda: the CPU bundle's library has no CUDA op (refused before any session); a malformed device is
    a usage error. (The CUDA session itself runs only on a GPU machine with onnxruntime-gpu.)"""
    r = _run(cpp_app, text_cpu_bundle, [1, 2, 3], "--device", "cuda:0")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("error: ") and "has no CUDA op" in r.stderr, r.stderr
    r = _run(cpp_app, text_cpu_bundle, [1, 2, 3], "--device", "gpu")
    assert r.returncode == 2 and "--device must be cpu, cuda or cuda:N" in r.stderr, r.stderr
