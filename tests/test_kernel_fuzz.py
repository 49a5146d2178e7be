"""Bounded fuzzing of the kernel's input validation: malformed shapes, indices, attributes and dtypes.

Every call must either run (output of the input's shape) or fail with an ONNX Runtime error: never crash.
`make test-asan` runs this file and test_kernel_cpu.py against the ASan/UBSan build of the library.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=int(os.environ.get("MOPEQ_FUZZ_EXAMPLES", "100")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# -- the kernel's input validation ----------------------------------------------------------------------------
import test_kernel_cpu as kernel  # noqa: E402  (skips this module when the library is not built)


@FUZZ
@given(data=st.data())
def test_malformed_kernel_calls_are_errors_not_crashes(data):
    import onnxruntime as ort

    bits = data.draw(st.lists(st.sampled_from([2, 3, 4, 8]), min_size=1, max_size=4), label="bits")
    h = data.draw(st.sampled_from([32, 64]), label="h")
    i = data.draw(st.sampled_from([32, 96]), label="i")
    t = data.draw(st.integers(1, 3), label="t")
    k = data.draw(st.integers(1, len(bits)), label="k")
    feeds = kernel.random_case(data.draw(st.integers(0, 2**16)), bits, h, i, 32, t, k, np.float32)
    attr_bits, group = list(bits), 32
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        what = data.draw(st.sampled_from(["shape", "index", "bits_attr", "group_attr", "dtype"]), label="what")
        name = data.draw(st.sampled_from(sorted(feeds)), label="input")
        a = feeds[name]
        if what == "shape" and a.ndim:
            axis = data.draw(st.integers(0, a.ndim - 1))
            n = data.draw(st.integers(0, a.shape[axis] + 2))
            shape = list(a.shape)
            shape[axis] = n
            feeds[name] = np.resize(a, shape).astype(a.dtype)
        elif what == "index":
            feeds["indices"] = np.full_like(feeds["indices"], data.draw(st.integers(-2**40, 2**40)))
        elif what == "bits_attr":
            attr_bits = data.draw(st.lists(st.integers(-1, 9), min_size=1, max_size=5))
        elif what == "group_attr":
            group = data.draw(st.sampled_from([0, -32, 16, 48, 64, 1 << 20]))
        elif what == "dtype" and a.dtype == np.float32:
            feeds[name] = a.astype(np.float64)
    try:
        sess = kernel.make_session(attr_bits, group, np.float32)
        feeds = {n: v for n, v in feeds.items()}
        out = sess.run(None, feeds)[0]
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.RuntimeException, ort.capi.onnxruntime_pybind11_state.InvalidGraph):
        return
    assert out.shape == feeds["hidden"].shape
