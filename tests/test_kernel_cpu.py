"""libmopeq_ops (runtime/csrc) against the NumPy reference of mopeq.MoEExperts, through ONNX Runtime.

Each SIMD path is forced with MOPEQ_KERNEL, which the kernel reads on every call.
"""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mopeq_export.quantization import packing as P
from conftest import cpu_flags
from packed_layers import random_layer

native = pytest.importorskip("mopeq_runtime.native")
try:
    LIB = str(native.library_path())
except native.KernelLibraryMissing as e:
    pytest.skip(str(e), allow_module_level=True)


FLAGS = cpu_flags()
_AVX2 = {"avx2", "fma", "f16c"} <= FLAGS
_AVX512 = _AVX2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= FLAGS
FLOAT_PATHS = {"scalar": True}  # exact float activations: the reference
INT8_PATHS = {"i8-scalar": True, "i8-avx2": _AVX2, "i8-avx512vnni": _AVX512 and {"avx512_vnni", "avx512vbmi", "gfni"} <= FLAGS}
SUPPORTED = {**FLOAT_PATHS, **INT8_PATHS, "auto": True}  # auto: the best integer path of this CPU


LAYER_TYPES = ([TensorProto.UINT32] * 4 + [TensorProto.FLOAT16, TensorProto.UINT8]) * 2  # w1 then w2


def make_session(expert_bits, group_size, dtype, activation="silu", layout_version=P.LAYOUT_VERSION):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    names = ["hidden", "indices", "weights", *P.LAYER_TENSOR_NAMES]
    types = [elem, TensorProto.INT64, elem] + LAYER_TYPES
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]
    node = helper.make_node(
        "MoEExperts", names, ["out"], name="/model/layers.0/moe/Experts", domain="mopeq",
        expert_bits=list(expert_bits), group_size=group_size, activation=activation,
        layout_version=layout_version)
    graph = helper.make_graph([node], "moe", inputs, [helper.make_tensor_value_info("out", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mopeq", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])



def random_case(seed, expert_bits, h, i, g, t, k, dtype):
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, expert_bits, h, i, g)
    feeds = {
        "hidden": rng.standard_normal((t, h)).astype(dtype),
        "indices": rng.integers(0, len(expert_bits), (t, k)).astype(np.int64),
        "weights": rng.uniform(0.05, 1.0, (t, k)).astype(dtype),
        **layer,
    }
    return feeds


def check_close(got, want, dtype, tol32=1e-4):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(np.abs(want.astype(np.float32)).max())
    tol = tol32 if dtype == np.float32 else 2e-3  # float16: one rounding of the output, ~2^-11 relative
    err = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max())
    assert scale > 0 and err <= tol * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


CASES = [  # expert_bits, H, I, group_size, T, k, activation; H and 2I multiples of 16 (layout v2's tiles), K = 104
    # or 112 ends in a partial block, I = 104 puts the gate/up split inside a tile
    ([2, 2, 2], 160, 104, 32, 1, 2, "silu"),
    ([3, 3, 3, 3], 192, 160, 64, 37, 3, "gelu"),
    ([4, 4], 112, 192, 128, 1, 1, "silu"),
    ([8, 8, 8], 160, 64, 32, 37, 2, "silu"),
    ([2, 3, 4, 8, 4, 3, 2, 4], 192, 104, 64, 37, 8, "silu"),   # every width in one layer
    ([4, 2, 4, 2, 4], 160, 160, 128, 1, 5, "gelu"),           # q3 and q8 absent (E_b = 0)
    ([3, 4, 2, 3, 4, 2, 3, 8, 4, 2], 112, 104, 32, 37, 4, "silu"),
    ([4, 3, 2, 4, 3, 2, 4, 3], 2048 // 8, 192, 128, 5, 7, "silu"),
]


@pytest.mark.parametrize("path", [*SUPPORTED])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(monkeypatch, path, dtype, case):
    """Float paths against the float reference; integer paths against the reference of their arithmetic (the
    same int8 activations): both differ from theirs only by float32 summation order (an int8 code may flip
    where act(gate) * up, computed in float32 by both, lands within rounding of a half step)."""
    bits, h, i, g, t, k, act = CASES[case]
    if not SUPPORTED[path]:
        pytest.skip(f"this CPU lacks {path} (test_forcing_a_missing_path_is_an_error covers the dispatch)")
    monkeypatch.setenv("MOPEQ_KERNEL", path)
    feeds = random_case(1000 + case, bits, h, i, g, t, k, dtype)
    int8 = path not in FLOAT_PATHS
    want = P.moe_experts_reference(feeds["hidden"], feeds["indices"], feeds["weights"],
                                   {n: feeds[n] for n in P.LAYER_TENSOR_NAMES}, bits, g, act, int8=int8)
    got = make_session(bits, g, dtype, act).run(None, feeds)[0]
    check_close(got, want, dtype, tol32=1e-3 if int8 else 1e-4)


def float64_reference(feeds, bits, g, act):
    """mopeq.MoEExperts in float64 from the dequantized weights (the yardstick of the integer paths' error)."""
    x, idx, wts = feeds["hidden"].astype(np.float64), feeds["indices"], feeds["weights"].astype(np.float64)
    h = x.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t]):
            b = bits[e]
            w1 = P.dequantize(*P.expert_matrix(feeds, "w1", e, bits), b, h, g).astype(np.float64)  # untiled
            i = w1.shape[0] // 2
            w2 = P.dequantize(*P.expert_matrix(feeds, "w2", e, bits), b, i, g).astype(np.float64)
            a = w1 @ x[t]
            gate = a[:i] / (1 + np.exp(-a[:i])) if act == "silu" else P._activation(a[:i], act)
            out[t] += wts[t, j] * (w2 @ (gate * a[i:]))
    return out


# Relative RMS error of the integer paths against float64 on these random layers, by width: measured mean / max
# over 6 seeds 0.0127 / 0.0176 (2 bits), 0.0123 / 0.0156 (3), 0.0112 / 0.0131 (4), 0.0117 / 0.0133 (8); the
# float paths 5e-7. Bounds: the maximum with a 1.5x margin. (The int8 activations cause it; on text-moe the
# held-out perplexity moves by far less, docs/KERNELS.md.)
INT8_ERROR_BOUND = {2: 0.027, 3: 0.024, 4: 0.02, 8: 0.02}


@pytest.mark.parametrize("path", [p for p in INT8_PATHS])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_error_against_float64_is_bounded(monkeypatch, path, bits):
    if not SUPPORTED[path]:
        pytest.skip(f"this CPU lacks {path}")
    monkeypatch.setenv("MOPEQ_KERNEL", path)
    layer_bits, g, seed = [bits] * 6, 32, int(np.random.SeedSequence().entropy % 2**31)  # fresh inputs each run
    feeds = random_case(seed, layer_bits, 256, 192, g, 5, 3, np.float32)
    want = float64_reference(feeds, layer_bits, g, "silu")
    got = make_session(layer_bits, g, np.float32).run(None, feeds)[0].astype(np.float64)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= INT8_ERROR_BOUND[bits], f"{path} {bits}-bit, seed {seed}: relative RMS error {rel:.4f} vs float64"


def test_threads_do_not_change_results(monkeypatch):
    bits = [2, 3, 4, 8, 4, 3]
    feeds = random_case(7, bits, 192, 160, 64, 37, 4, np.float32)
    sess = make_session(bits, 64, np.float32)
    monkeypatch.setenv("MOPEQ_NUM_THREADS", "1")
    one = sess.run(None, feeds)[0]
    monkeypatch.setenv("MOPEQ_NUM_THREADS", "2")
    np.testing.assert_array_equal(sess.run(None, feeds)[0], one)


def test_unknown_kernel_path_is_an_error(monkeypatch):
    monkeypatch.setenv("MOPEQ_KERNEL", "sse9")
    feeds = random_case(3, [2, 4], 64, 32, 32, 1, 1, np.float32)
    with pytest.raises(Exception, match="MOPEQ_KERNEL must be one of"):
        make_session([2, 4], 32, np.float32).run(None, feeds)


@pytest.mark.parametrize("path", [p for p, ok in SUPPORTED.items() if not ok])
def test_forcing_a_missing_path_is_an_error(monkeypatch, path):
    monkeypatch.setenv("MOPEQ_KERNEL", path)
    feeds = random_case(3, [2, 4], 64, 32, 32, 1, 1, np.float32)
    with pytest.raises(Exception, match="does not support"):
        make_session([2, 4], 32, np.float32).run(None, feeds)


BITS = [2, 4, 3, 4]


def malformed(kind):
    feeds = random_case(11, BITS, 96, 64, 32, 3, 2, np.float32)
    if kind == "index_high":
        feeds["indices"][1, 1] = len(BITS)
    elif kind == "index_negative":
        feeds["indices"][0, 0] = -1
    elif kind == "wrong_E_b":
        feeds["w1.q4"] = np.concatenate([feeds["w1.q4"], feeds["w1.q4"][:1]])
    elif kind == "scales_shape":
        feeds["w2.scales"] = feeds["w2.scales"][:, :, :1].copy()
    elif kind == "zeros_shape":
        feeds["w1.zeros"] = feeds["w1.zeros"][:3].copy()
    elif kind == "untiled_scales":  # layout v1's [E, rows, G]
        feeds["w1.scales"] = P.untile_rows(feeds["w1.scales"])
    elif kind == "code_words":
        feeds["w2.q2"] = feeds["w2.q2"][:, :, :1].copy()
    elif kind == "hidden_rank":
        feeds["hidden"] = feeds["hidden"][None]
    elif kind == "weights_shape":
        feeds["weights"] = feeds["weights"][:, :1].copy()
    return feeds


@pytest.mark.parametrize("kind,message", [
    ("index_high", r"indices\[1, 1\] = 4 is outside \[0, 4\)"),
    ("index_negative", r"indices\[0, 0\] = -1"),
    ("wrong_E_b", r"w1.q4 has shape \[3, 8, 12, 16\], expected \[2, 8, 12, 16\]"),  # [E_b, 2I/16, NB*b, 16]
    ("scales_shape", r"w2.scales has shape"),
    ("zeros_shape", r"w1.zeros has shape"),
    ("untiled_scales", r"w1.scales"),
    ("code_words", r"w2.q2 has shape"),
    ("hidden_rank", r"hidden must be \[T, H\]"),
    ("weights_shape", r"weights has shape"),
])
def test_malformed_inputs_are_errors(kind, message):
    sess = make_session(BITS, 32, np.float32)
    with pytest.raises(Exception, match=message):
        sess.run(None, malformed(kind))
    sess.run(None, malformed("none"))  # the session is still usable afterwards


@pytest.mark.parametrize("bits,group_size,layout,message", [
    (BITS, 48, 2, "group_size 48 is not a positive multiple of 32"),
    (BITS, 0, 2, "group_size 0"),
    (BITS, 32, 1, "layout_version 1 is not supported"),  # a model exported before the 16-row tiles
    ([2, 5, 4, 4], 32, 2, "expert_bits holds width 5"),
    ([2, 4, 3], 32, 2, "expert_bits lists 3 experts but w1.scales holds 4"),
])
def test_malformed_attributes_are_errors(bits, group_size, layout, message):
    with pytest.raises(Exception, match=message):
        make_session(bits, group_size, np.float32, layout_version=layout).run(None, malformed("none"))


def test_runtime_import_stays_lean():
    code = "import sys, mopeq_runtime.native; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
