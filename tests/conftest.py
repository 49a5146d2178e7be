"""Session-wide fixtures: one stage cache and one cpu bundle of the trained text model, shared by every
test module that needs a real bundle (the C++ example, ORT-GenAI, the installed runtime)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT_MODEL, SHARED_DATA = SHARED / "models" / "text-moe", SHARED / "data"


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
