"""mopeq.MoEExperts three ways on fresh random layers: stock ORT through the model-local function body
(library not registered), ORT with libmopeq_ops (kernel), and the NumPy reference `moe_experts_reference`."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mopeq_export.quantization import packing as P
from mopeq_exporters.function_body import build_function
from packed_layers import random_layer
from test_kernel_cpu import LAYER_TYPES

native = pytest.importorskip("mopeq_runtime.native")


def one_node_model(expert_bits, group_size, dtype, activation, opset):
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    names = ["hidden", "indices", "weights", *P.LAYER_TENSOR_NAMES]
    types = [elem, TensorProto.INT64, elem] + LAYER_TYPES
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]
    node = helper.make_node("MoEExperts", names, ["out"], name="/model/layers.0/mlp/experts/MoEExperts",
                            domain="mopeq", expert_bits=list(expert_bits), group_size=group_size,
                            activation=activation, layout_version=P.LAYOUT_VERSION)
    graph = helper.make_graph([node], "moe", inputs, [helper.make_tensor_value_info("out", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("mopeq", 1)],
                              ir_version=9, functions=[build_function(opset)])
    return model.SerializeToString()


def run(model: bytes, feeds, kernel: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if kernel:
        so.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


CASES = [  # bits per expert, H, I, g, activation: mixed widths, empty widths (E_b = 0), odd K, partial groups;
    # H and 2I are multiples of 16 (the tiles of layout v2), I = 8 * odd puts the gate/up split inside a tile
    ([2, 3, 4, 8, 3, 2], 64, 48, 32, "silu"),
    ([4, 4, 3], 96, 40, 64, "gelu"),
    ([2, 2, 2, 2], 48, 24, 32, "silu"),
    ([8, 3, 3, 4, 2, 2, 4, 3], 160, 160, 128, "silu"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opset", [19, 21])  # 19: the lowest any target uses
@pytest.mark.usefixtures("exact_kernel")  # the function body computes in float: compared with the float path
def test_function_body_kernel_reference_agree(case, dtype, opset):
    bits, h, i, g, act = case
    rng = np.random.default_rng(hash((tuple(bits), h, opset)) % 2**32)
    layer = random_layer(rng, bits, h, i, g)
    t, k = 7, 2
    feeds = {"hidden": rng.standard_normal((t, h)).astype(dtype),
             "indices": rng.integers(0, len(bits), (t, k)).astype(np.int64),
             "weights": rng.uniform(0.05, 1.0, (t, k)).astype(dtype), **layer}
    ref = P.moe_experts_reference(feeds["hidden"], feeds["indices"], feeds["weights"], layer, bits, g, act)
    ref = ref.astype(np.float32)
    model = one_node_model(bits, g, dtype, act, opset)
    scale = np.abs(ref).max()
    tol = 1e-5 if dtype == np.float32 else 2e-3  # float16 output rounding
    try:
        kernel = run(model, feeds, kernel=True)
    except native.KernelLibraryMissing:
        kernel = None
    function = run(model, feeds, kernel=False)
    assert function.dtype == dtype
    assert np.abs(function.astype(np.float32) - ref).max() / scale < tol
    if kernel is not None:
        assert np.abs(kernel.astype(np.float32) - ref).max() / scale < tol
        assert np.abs(kernel.astype(np.float32) - function.astype(np.float32)).max() / scale < tol


def test_function_zero_tokens():
    bits, h, i, g = [2, 3, 4], 32, 32, 32
    layer = random_layer(np.random.default_rng(1), bits, h, i, g)
    feeds = {"hidden": np.zeros((0, h), np.float32), "indices": np.zeros((0, 2), np.int64),
             "weights": np.zeros((0, 2), np.float32), **layer}
    assert run(one_node_model(bits, g, np.float32, "silu", 21), feeds, kernel=False).shape == (0, h)
