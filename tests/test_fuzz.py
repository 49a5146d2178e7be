"""Bounded fuzzing of the bundle loader: manifest and file mutations (the kernel's: test_kernel_fuzz.py).

Every outcome must be either a normal result or the project's one error type: never another exception.
Example counts are fixed (MOPEQ_FUZZ_EXAMPLES, default 100) and the runs derandomized, so the suite's time
stays bounded and a failure reproduces.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mopeq_runtime
from fake_export import make_fake_bundle
from mopeq_runtime.errors import MopeqError

FUZZ = settings(max_examples=int(os.environ.get("MOPEQ_FUZZ_EXAMPLES", "100")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x[:4]):
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(max_size=6), c, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_fake_bundle(tmp_path_factory.mktemp("fuzz"))


def _copy(src: Path, tmp: Path) -> Path:
    dest = tmp / "b"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    return dest


def _load_and_generate(b: Path, **kw):
    try:
        m = mopeq_runtime.load(b, **kw)
        m.generate([1, 2], max_new_tokens=2)
    except MopeqError:
        pass  # a clear refusal is the expected outcome for most mutations


@FUZZ
@given(data=st.data())
def test_manifest_mutations_load_or_refuse_cleanly(pristine, tmp_path, data):
    b = _copy(pristine, tmp_path)
    d = json.loads((b / "manifest.json").read_text())
    paths = [p for p in _paths(d) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values, label="value")
    (b / "manifest.json").write_text(json.dumps(d))
    _load_and_generate(b)
    _load_and_generate(b, verify=False)  # the typed records still refuse what they cannot use


@FUZZ
@given(data=st.data())
def test_file_mutations_load_or_refuse_cleanly(pristine, tmp_path, data):
    b = _copy(pristine, tmp_path)
    files = sorted(p for p in b.rglob("*") if p.is_file())
    f = data.draw(st.sampled_from(files), label="file")
    blob = bytearray(f.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "empty"]), label="how")
    if how == "truncate" and blob:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip" and blob:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:
        blob = bytearray()
    f.write_bytes(bytes(blob))
    _load_and_generate(b)
