"""The portable fallback of `mopeq.MoEExperts`: a model-local ONNX function made of standard ops only.

Stock ONNX Runtime (or any ONNX runtime) inlines it when our kernel library is not registered. It follows
docs/OPS.md "Portable fallback" and docs/FORMAT.md; the per-expert widths come from the node's
`expert_bits` attribute through an attribute reference, so ONE function serves every layer and plan.

    untile (FORMAT.md §4): [E, rows/16, J, 16] ──Transpose(0,1,3,2)──Reshape──► [E, rows, J] row-major
    per matrix m in (w1, w2), per width b in (2, 3, 4, 8):
      m.q{b} [E_b,rows/16,NB*b,16] uint32 ──untile──► [E_b,rows,NB*b]
          ──Unsqueeze──BitShift(>> 0,b,2b..)──BitwiseAnd(2^b-1)──Reshape──Slice[:K]
          (b = 3: 2-bit plane of words 0-1  |  (1-bit plane of word 2 << 2))           codes [E_b,rows,K]
      Concat over b (widths ascending) ──Gather(rank)──► codes in expert order [E,rows,K]
      rank[e] = #{e': bits[e'] < bits[e]} + #{e' < e: bits[e'] == bits[e]}   (= width offset + slot[e])
      W_m = (codes - untile(zeros)[..., col // g]) * untile(scales)[..., col // g]         float32

    x [T,H] ─Cast f32─MatMul(W1ᵀ)─► a [E,T,2I] ─Split─► gate, up ─► act(gate)*up ─MatMul(W2ᵀ)─► y [E,T,H]
    indices, weights ─ScatterElements(add) into zeros[T,E]─► R [T,E]
    out [T,H] = R[t,:] · y[:,t,:]  (MatMul of [T,1,E] by [T,E,H]) ─CastLike(hidden)─►

Every expert is computed for every token (E/k times the work of the kernel); experts that a token did
not pick have routing weight 0, so the sum equals the sparse definition. The body reads layout version 2
(the 16-row tiles); the layout_version attribute is accepted but cannot be checked by standard ops (the
kernel checks it). A model exported earlier carries its own function body, for its own layout.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mopeq_export.errors import MopeqError
from mopeq_export.quantization.packing import LAYER_TENSOR_NAMES, SUPPORTED_BITS, TILE_ROWS

from .onnx_op import DOMAIN, OP_TYPE

ATTRIBUTES = ("expert_bits", "group_size", "activation", "layout_version")
INPUTS = ("hidden", "indices", "weights", *(n.replace(".", "_") for n in LAYER_TENSOR_NAMES))


class _Body:
    """Collects nodes; each call adds one node and returns its (first) output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._ids = itertools.count()

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        n = next(self._ids)
        outs = [f"{op.lower()}_{n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"{op}_{n}", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=None) -> str:
        return self("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr_const(self, field: str, attr: str) -> str:
        """A Constant whose value is the calling node's attribute (e.g. value_ints <- expert_bits)."""
        n = next(self._ids)
        out = f"{attr}_{n}"
        node = helper.make_node("Constant", [], [out], name=f"Constant_{attr}")
        node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=attr,
                                                  type=_ATTR_TYPES[field]))
        self.nodes.append(node)
        return out

    def dim(self, tensor: str, axis: int) -> str:
        """Shape(tensor)[axis] as an int64 tensor of shape [1]."""
        return self("Shape", tensor, start=axis, end=axis + 1)


_ATTR_TYPES = {"value_ints": onnx.AttributeProto.INTS, "value_int": onnx.AttributeProto.INT,
               "value_string": onnx.AttributeProto.STRING}


def _untile(f: _Body, tiled: str) -> str:
    """[E, rows/16, J, 16] -> [E, rows, J]: element (r, j) of each row-major matrix from [r // 16, j, r % 16]
    (FORMAT.md §4). The target shape is explicit (no -1): E may be 0 (a width with no experts)."""
    moved = f("Transpose", tiled, perm=[0, 1, 3, 2])                  # [E, rows/16, 16, J]
    rows = f("Mul", f.dim(tiled, 1), f.const([TILE_ROWS], np.int64))
    return f("Reshape", moved, f("Concat", f.dim(tiled, 0), rows, f.dim(tiled, 2), axis=0), allowzero=1)


def _fields(f: _Body, words: str, width: int) -> str:
    """uint32 [E_b, rows, n] -> uint32 [E_b, rows, n * 32/width]: field j of word w lands at w*per + j."""
    per = 32 // width
    shifts = f.const(np.arange(per) * width, np.uint32)
    mask = f.const((1 << width) - 1, np.uint32)
    split = f("BitwiseAnd", f("BitShift", f("Unsqueeze", words, f.const([-1], np.int64)), shifts,
                              direction="RIGHT"), mask)
    # explicit target shape (no -1): a width with no experts has E_b = 0, and -1 cannot be inferred then
    new_last = f("Mul", f.dim(words, 2), f.const([per], np.int64))
    shape = f("Concat", f("Shape", words, start=0, end=2), new_last, axis=0)
    return f("Reshape", split, shape, allowzero=1)


def _unpack(f: _Body, words: str, bits: int, k: str) -> str:
    """Packed codes of one width, tiled [E_b, rows/16, NB*b, 16] -> float32 codes [E_b, rows, K] (FORMAT.md §3-4)."""
    words = _untile(f, words)
    if bits == 3:
        three = f.const([3], np.int64)
        blocks = f("Reshape", words, f("Concat", f("Shape", words, start=0, end=2),
                                       f("Div", f.dim(words, 2), three), three, axis=0), allowzero=1)
        flat = lambda t: f("Reshape", t, f("Concat", f("Shape", t, start=0, end=2),  # noqa: E731
                                          f("Mul", f.dim(t, 2), f.dim(t, 3)), axis=0), allowzero=1)
        axis3 = f.const([3], np.int64)
        low = f("Slice", blocks, f.const([0], np.int64), f.const([2], np.int64), axis3)
        high = f("Slice", blocks, f.const([2], np.int64), f.const([3], np.int64), axis3)
        low_codes = _fields(f, flat(low), 2)
        high_codes = _fields(f, flat(high), 1)
        codes = f("BitwiseOr", low_codes, f("BitShift", high_codes, f.const(2, np.uint32), direction="LEFT"))
    else:
        codes = _fields(f, words, bits)
    codes = f("Slice", codes, f.const([0], np.int64), k, f.const([2], np.int64))
    return f("Cast", codes, to=TensorProto.FLOAT)


def _expert_rank(f: _Body, bits: str) -> str:
    """Position of each expert in the width-sorted concatenation (stable sort by width)."""
    n = f("Squeeze", f.dim(bits, 0), f.const([0], np.int64))
    idx = f("Range", f.const(0, np.int64), n, f.const(1, np.int64))
    col = lambda t: f("Unsqueeze", t, f.const([1], np.int64))  # noqa: E731  [E,1]: the expert e
    row = lambda t: f("Unsqueeze", t, f.const([0], np.int64))  # noqa: E731  [1,E]: the other expert e'
    narrower = f("Less", row(bits), col(bits))
    same_before = f("And", f("Equal", row(bits), col(bits)), f("Less", row(idx), col(idx)))
    counted = f("Cast", f("Or", narrower, same_before), to=TensorProto.INT64)
    return f("ReduceSum", counted, f.const([1], np.int64), keepdims=0)


def _dequant_matrix(f: _Body, m: str, k: str, rank: str, g: str) -> str:
    """One matrix of every expert, float32 [E, rows, K] in expert order."""
    codes = f("Concat", *(_unpack(f, f"{m}_q{b}", b, k) for b in SUPPORTED_BITS), axis=0)
    codes = f("Gather", codes, rank, axis=0)
    col_group = f("Div", f("Range", f.const(0, np.int64), f("Squeeze", k, f.const([0], np.int64)),
                           f.const(1, np.int64)), g)
    scales = f("Gather", f("Cast", _untile(f, f"{m}_scales"), to=TensorProto.FLOAT), col_group, axis=2)
    zeros = f("Gather", f("Cast", _untile(f, f"{m}_zeros"), to=TensorProto.FLOAT), col_group, axis=2)
    return f("Mul", f("Sub", codes, zeros), scales)


def _activation(f: _Body, x: str, name: str) -> str:
    """silu or gelu(tanh), chosen at run time by comparing the string attribute: both are cheap."""
    silu = f("Mul", x, f("Sigmoid", x))
    cube = f("Mul", f("Mul", x, x), x)
    inner = f("Mul", f("Add", x, f("Mul", cube, f.const(0.044715, np.float32))),
              f.const(0.7978845608028654, np.float32))
    gelu = f("Mul", f("Mul", x, f.const(0.5, np.float32)), f("Add", f("Tanh", inner), f.const(1.0, np.float32)))
    return f("Where", f("Equal", name, f.const("gelu", object)), gelu, silu)


def build_function(opset: int) -> onnx.FunctionProto:
    """The FunctionProto `mopeq.MoEExperts` (docs/OPS.md "Portable fallback") for a model at `opset` >= 19.

    19 because the activation is chosen with Equal on the string attribute (string Equal is opset 19)."""
    if opset < 19:
        raise MopeqError(f"the portable function body needs opset >= 19 (got {opset})")
    f = _Body()
    bits = f.attr_const("value_ints", "expert_bits")
    g = f.attr_const("value_int", "group_size")
    act = f.attr_const("value_string", "activation")
    h = f.dim("hidden", 1)
    # w1 holds gate then up: 2I rows, in w1_scales [E, 2I/16, G, 16]
    i = f("Div", f("Mul", f.dim("w1_scales", 1), f.const([TILE_ROWS], np.int64)), f.const([2], np.int64))
    rank = _expert_rank(f, bits)
    w1 = _dequant_matrix(f, "w1", h, rank, g)          # [E, 2I, H]
    w2 = _dequant_matrix(f, "w2", i, rank, g)          # [E, H, I]

    x = f("Cast", "hidden", to=TensorProto.FLOAT)
    a = f("MatMul", x, f("Transpose", w1, perm=[0, 2, 1]))          # [E, T, 2I]
    gate, up = f("Split", a, axis=2, num_outputs=2, outputs=2)
    y = f("MatMul", f("Mul", _activation(f, gate, act), up), f("Transpose", w2, perm=[0, 2, 1]))  # [E,T,H]

    t = f.dim("indices", 0)
    e = f.dim(bits, 0)
    dense = f("ConstantOfShape", f("Concat", t, e, axis=0), value=numpy_helper.from_array(np.zeros(1, np.float32)))
    routing = f("ScatterElements", dense, "indices", f("Cast", "weights", to=TensorProto.FLOAT), axis=1,
                reduction="add")                                     # [T, E]; duplicates would add up
    out = f("MatMul", f("Unsqueeze", routing, f.const([1], np.int64)), f("Transpose", y, perm=[1, 0, 2]))
    out = f("Squeeze", out, f.const([1], np.int64))                  # [T, H]
    f.nodes.append(helper.make_node("CastLike", [out, "hidden"], ["out"], name="CastLike_out"))

    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), ["out"], f.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string="Portable fallback of mopeq.MoEExperts (docs/OPS.md): dequantize all experts, dense compute.")
