"""Every compiled kernel path against its reference with no ONNX Runtime in between: the kernel self-test
(runtime/csrc/tests/kernel_selftest.cc, fresh random inputs each run) built for this machine and run once per
path the CPU has, and cross-built for aarch64 and run under qemu-user (NEON paths) where the cross toolchain
and qemu are installed (`make setup` installs them on Debian/Ubuntu as root)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from test_kernel_cpu import SUPPORTED

ROOT = Path(__file__).resolve().parents[1]
ORT_HEADERS = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    build = tmp_path_factory.mktemp("selftest")
    subprocess.run(["cmake", "-S", ROOT / "runtime" / "csrc", "-B", build, "-DMOPEQ_BUILD_SELFTEST=ON",
                    "-DMOPEQ_CUDA=OFF", f"-DORT_INCLUDE_DIR={ORT_HEADERS}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build, "--target", "kernel_selftest", "-j", "2"], check=True, capture_output=True)
    return build / "kernel_selftest"


@pytest.mark.parametrize("path", [p for p in SUPPORTED if p != "auto"])
def test_kernel_selftest(selftest, path):
    if not SUPPORTED[path]:
        pytest.skip(f"this CPU lacks {path}")
    run = subprocess.run([selftest], env={"MOPEQ_KERNEL": path}, capture_output=True, text=True)
    assert run.returncode == 0 and f"{path}: ok" in run.stdout, run.stdout + run.stderr


def test_aarch64_paths_under_qemu():
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)")
    run = subprocess.run(["bash", ROOT / "scripts" / "check_kernels_aarch64.sh"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for path in ("i8-neon", "i8-scalar", "scalar"):
        assert f"{path}: ok" in run.stdout, run.stdout
