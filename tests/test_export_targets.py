import pytest

from mopeq_export.errors import MopeqError
from mopeq_export.targets import ALIASES, TARGETS, get_target


def test_targets_are_consistent():
    for t in TARGETS.values():
        assert t.activation_dtype == ("float32" if t.name == "cpu" else "float16")
        assert 19 <= t.opset  # the function body needs Equal on strings and 8 <= t.ir_version <= 13  # onnxruntime-gpu 1.31 refuses IR 14
        assert (t.arch == "aarch64") == t.name.startswith("jetson")
        assert 0 < t.memory_share <= 1


def test_alias_and_unknown():
    assert get_target("jetson") is TARGETS[ALIASES["jetson"]]
    with pytest.raises(MopeqError, match="jetson-agx-orin"):
        get_target("tpu")
