"""Session-wide fixtures: one stage cache and one cpu bundle of the trained text model, shared by every
test module that needs a real bundle (the C++ example, ORT-GenAI, the installed runtime)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT_MODEL, SHARED_DATA = SHARED / "models" / "text-moe", SHARED / "data"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, Arm `Features`)."""
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    line = next((ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


FLOAT_KERNEL = "scalar"  # the kernel library's exact float-activation path (MOPEQ_KERNEL name)


@pytest.fixture
def exact_kernel(monkeypatch):
    """Export-parity tests compare exported graphs with PyTorch to 1e-4 or closer: they run the kernel's exact
    float-activation path. The default integer path quantizes expert inputs to int8 (about 1 % relative error
    per layer output, bounded in tests/test_kernel_cpu.py); the acceptance tests run that default."""
    monkeypatch.setenv("MOPEQ_KERNEL", FLOAT_KERNEL)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("session-stage-cache")


@pytest.fixture(scope="session")
def text_cpu_bundle(tmp_path_factory, session_cache):
    """The cpu bundle of text-moe at --avg-bits 2.5 (minutes from cold; built once per test session)."""
    if not TEXT_MODEL.is_dir():
        pytest.skip("needs ../shared/models/text-moe")
    from mopeq_export.pipeline import BuildConfig, build

    out = tmp_path_factory.mktemp("text-cpu") / "bundle"
    build(BuildConfig(model=TEXT_MODEL, target="cpu", out=out, avg_bits=2.5, calib=SHARED_DATA / "text_calib.txt",
                      cache=session_cache))
    return out
