"""NumPy reference of the packed expert format (docs/FORMAT.md, layout v2) and of `mopeq.MoEExperts`.

Everything else (PyTorch dequantizer, ONNX function bodies, C++/CUDA kernels) is tested against this
file, so it favours plain, obviously-correct array code over speed. The layout constants below are
mirrored by `runtime/csrc/include/mopeq_format.h`; a test checks that both agree.

A block of 32 consecutive codes along K becomes `b` uint32 words:

    b=2: word i//16, bits 2*(i%16)    b=4: word i//8, bits 4*(i%8)    b=8: word i//4, bits 8*(i%4)
    b=3: the low 2 bits as b=2 in words 0-1, bit 2 in word 2 at bit i

An expert's matrix is stored in tiles of 16 rows: word j of row r at [r // 16, j, r % 16], and its scales and
zero points alike (`tile_rows`), so one 64-byte load holds the same word of 16 rows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import MopeqError, require

LAYOUT_VERSION = 2
TILE_ROWS = 16  # rows per tile of an expert matrix (FORMAT.md §4); rows must be a multiple of it
BLOCK = 32  # codes per packed block; one block of width b is exactly b uint32 words
SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256)  # what the quantizer offers; readers accept any positive multiple of 32
ACTIVATIONS = ("silu", "gelu")

# Input names of mopeq.MoEExperts after (hidden, indices, weights), in op input order (docs/OPS.md).
LAYER_TENSOR_NAMES = tuple(
    f"{m}.{part}" for m in ("w1", "w2") for part in ("q2", "q3", "q4", "q8", "scales", "zeros")
)


def num_blocks(k: int) -> int:
    return -(-k // BLOCK)


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def check_bits(bits: int) -> None:
    require(bits in SUPPORTED_BITS, f"unsupported width {bits} bits; use one of {SUPPORTED_BITS}")


def check_group_size(group_size: int) -> None:
    require(
        isinstance(group_size, (int, np.integer)) and group_size > 0 and group_size % BLOCK == 0,
        f"group size {group_size!r} is not a positive multiple of {BLOCK}; use one of {GROUP_SIZES}",
    )


def check_tile_rows(rows: int, what: str) -> None:
    require(rows > 0 and rows % TILE_ROWS == 0,
            f"{what} has {rows} rows; layout v{LAYOUT_VERSION} stores expert matrices in tiles of {TILE_ROWS} rows, so "
            f"the hidden size and twice the expert intermediate size must be multiples of {TILE_ROWS}")


def tile_rows(a: np.ndarray) -> np.ndarray:
    """[..., rows, J] -> [..., rows/16, J, 16]: element (r, j) at [r // 16, j, r % 16] (FORMAT.md §4)."""
    a = np.asarray(a)
    require(a.ndim >= 2, f"tile_rows needs [..., rows, J], got shape {a.shape}")
    rows, j = a.shape[-2:]
    check_tile_rows(rows, "a matrix")
    t = a.reshape(*a.shape[:-2], rows // TILE_ROWS, TILE_ROWS, j)
    return np.ascontiguousarray(np.swapaxes(t, -1, -2))


def untile_rows(t: np.ndarray) -> np.ndarray:
    """Inverse of tile_rows: [..., rows/16, J, 16] -> [..., rows, J]."""
    t = np.asarray(t)
    require(t.ndim >= 3 and t.shape[-1] == TILE_ROWS, f"tiled tensors are [..., rows/16, J, 16], got shape {t.shape}")
    a = np.swapaxes(t, -1, -2)
    return np.ascontiguousarray(a.reshape(*t.shape[:-3], t.shape[-3] * TILE_ROWS, t.shape[-2]))


# ---------------------------------------------------------------------------------------------
# Bit packing: one function per width, named after the format.


def _pack_fields(values: np.ndarray, width: int) -> np.ndarray:
    """[..., NB, 32] codes of `width` bits -> [..., NB, width] words, value j of a word at bit width*j."""
    per_word = 32 // width
    fields = values.astype(np.uint32).reshape(*values.shape[:-1], width, per_word)
    shifts = (width * np.arange(per_word)).astype(np.uint32)
    return np.bitwise_or.reduce(fields << shifts, axis=-1)


def _unpack_fields(words: np.ndarray, width: int) -> np.ndarray:
    """Inverse of _pack_fields: [..., NB, width] words -> [..., NB, 32] codes."""
    per_word = 32 // width
    shifts = (width * np.arange(per_word)).astype(np.uint32)
    fields = (words[..., None] >> shifts) & np.uint32((1 << width) - 1)
    return fields.reshape(*words.shape[:-1], 32).astype(np.uint8)


def pack_2bit_32(v: np.ndarray) -> np.ndarray:
    return _pack_fields(v & 0b11, 2)


def pack_3bit_32(v: np.ndarray) -> np.ndarray:
    # 2-bit plane (words 0-1) then the 1-bit plane of bit 2 (word 2): keeps every width word-aligned.
    return np.concatenate([_pack_fields(v & 0b011, 2), _pack_fields((v & 0b100) >> 2, 1)], axis=-1)


def pack_4bit_32(v: np.ndarray) -> np.ndarray:
    return _pack_fields(v & 0b1111, 4)


def pack_8bit_32(v: np.ndarray) -> np.ndarray:
    return _pack_fields(v, 8)


def unpack_2bit_32(w: np.ndarray) -> np.ndarray:
    return _unpack_fields(w, 2)


def unpack_3bit_32(w: np.ndarray) -> np.ndarray:
    return _unpack_fields(w[..., 0:2], 2) | (_unpack_fields(w[..., 2:3], 1) << 2)


def unpack_4bit_32(w: np.ndarray) -> np.ndarray:
    return _unpack_fields(w, 4)


def unpack_8bit_32(w: np.ndarray) -> np.ndarray:
    return _unpack_fields(w, 8)


PACKERS = {2: pack_2bit_32, 3: pack_3bit_32, 4: pack_4bit_32, 8: pack_8bit_32}
UNPACKERS = {2: unpack_2bit_32, 3: unpack_3bit_32, 4: unpack_4bit_32, 8: unpack_8bit_32}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., rows, K] -> uint32 words [..., rows, NB*bits]; a partial last block is padded with 0."""
    check_bits(bits)
    codes = np.asarray(codes)
    require(codes.ndim >= 2, f"codes must be [rows, K] or [E, rows, K], got shape {codes.shape}")
    require(codes.dtype.kind in "ui", f"codes must be unsigned integers, got dtype {codes.dtype}")
    require(
        codes.size == 0 or (codes.min() >= 0 and codes.max() < (1 << bits)),
        f"codes out of range for {bits} bits: found [{codes.min() if codes.size else 0}, "
        f"{codes.max() if codes.size else 0}], allowed [0, {(1 << bits) - 1}]",
    )
    k = codes.shape[-1]
    nb = num_blocks(k)
    padded = np.zeros((*codes.shape[:-1], nb * BLOCK), np.uint8)
    padded[..., :k] = codes
    words = PACKERS[bits](padded.reshape(*codes.shape[:-1], nb, BLOCK))
    return np.ascontiguousarray(words.reshape(*codes.shape[:-1], nb * bits))


def unpack_codes(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint32 words [..., rows, NB*bits] -> uint8 codes [..., rows, K] (padding dropped)."""
    check_bits(bits)
    words = np.asarray(words)
    require(words.dtype == np.uint32, f"packed codes must be uint32, got dtype {words.dtype}")
    require(words.ndim >= 2, f"packed codes must be [rows, NB*b] or [E, rows, NB*b], got {words.shape}")
    nb = num_blocks(k)
    require(
        k > 0 and words.shape[-1] == nb * bits,
        f"packed codes have {words.shape[-1]} words per row; K={k} at {bits} bits needs {nb * bits}",
    )
    codes = UNPACKERS[bits](words.reshape(*words.shape[:-1], nb, bits))
    return codes.reshape(*words.shape[:-1], nb * BLOCK)[..., :k]


def dequantize(words, scales_f16, zeros_u8, bits: int, k: int, group_size: int) -> np.ndarray:
    """Packed codes [..., rows, NB*b] + scales/zeros [..., rows, G] -> float32 [..., rows, K]: (q - z) * s."""
    check_group_size(group_size)
    codes = unpack_codes(words, bits, k)
    scales, zeros = np.asarray(scales_f16), np.asarray(zeros_u8)
    g = num_groups(k, group_size)
    want = (*codes.shape[:-1], g)
    require(scales.dtype == np.float16, f"scales must be float16, got {scales.dtype}")
    require(zeros.dtype == np.uint8, f"zeros must be uint8, got {zeros.dtype}")
    require(
        scales.shape == want and zeros.shape == want,
        f"scales {scales.shape} / zeros {zeros.shape} must be {want} (G = ceil(K={k} / g={group_size}))",
    )
    # Expand per-group parameters along K; the last group may be partial.
    col_group = np.arange(k) // group_size
    s = scales.astype(np.float32)[..., col_group]
    z = zeros.astype(np.float32)[..., col_group]
    return (codes.astype(np.float32) - z) * s


# ---------------------------------------------------------------------------------------------
# One MoE layer: experts of different widths stored by width (FORMAT.md §4).


def slot_table(expert_bits: Sequence[int]) -> np.ndarray:
    """slot[e] = number of experts e' < e with the same width: expert e's codes are q{bits[e]}[slot[e]]."""
    bits = np.asarray(expert_bits, dtype=np.int64).reshape(-1)
    for b in np.unique(bits):
        check_bits(int(b))
    slots = np.zeros(len(bits), np.int64)
    for b in SUPPORTED_BITS:
        mask = bits == b
        slots[mask] = np.arange(int(mask.sum()))
    return slots


def split_by_width(codes: Sequence[np.ndarray], expert_bits: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-expert uint8 codes [rows, K] -> {b: uint32 [E_b, rows/16, NB*b, 16]} (tiled) for every supported b
    (E_b may be 0)."""
    require(len(codes) == len(expert_bits), f"{len(codes)} experts of codes but {len(expert_bits)} widths")
    require(len(codes) > 0, "a layer needs at least one expert")
    rows, k = np.asarray(codes[0]).shape
    for e, c in enumerate(codes):
        require(np.shape(c) == (rows, k), f"expert {e} codes have shape {np.shape(c)}, expert 0 has {(rows, k)}")
    check_tile_rows(rows, "an expert matrix")
    slot_table(expert_bits)  # validates the widths
    out = {}
    for b in SUPPORTED_BITS:
        mine = [tile_rows(pack_codes(c, b)) for c, eb in zip(codes, expert_bits) if eb == b]
        out[b] = np.stack(mine) if mine else np.zeros((0, rows // TILE_ROWS, num_blocks(k) * b, TILE_ROWS), np.uint32)
    return out


def merge_by_width(packed: Mapping[int, np.ndarray], expert_bits: Sequence[int], k: int) -> list[np.ndarray]:
    """Inverse of split_by_width: {b: words} -> per-expert uint8 codes [rows, K] in expert order."""
    slots = slot_table(expert_bits)
    _check_counts(packed, expert_bits, "codes")
    return [unpack_codes(untile_rows(packed[b][s]), b, k) for b, s in zip(expert_bits, slots)]


def expert_matrix(layer: Mapping[str, np.ndarray], m: str, e: int, expert_bits: Sequence[int]):
    """Expert e's matrix m ("w1" or "w2") of a layer's tensors, untiled: (words [rows, NB*b], scales [rows, G],
    zeros [rows, G]) for `dequantize`."""
    b, s = int(expert_bits[e]), int(slot_table(expert_bits)[e])
    return (untile_rows(layer[f"{m}.q{b}"][s]), untile_rows(layer[f"{m}.scales"][e]),
            untile_rows(layer[f"{m}.zeros"][e]))


def _check_counts(packed: Mapping[int, np.ndarray], expert_bits: Sequence[int], what: str) -> None:
    bits = np.asarray(expert_bits)
    for b in SUPPORTED_BITS:
        want = int((bits == b).sum())
        have = np.shape(packed[b])[0] if b in packed else 0
        require(have == want, f"{what} at {b} bits hold {have} experts but expert_bits has {want} of width {b}")


# ---------------------------------------------------------------------------------------------
# Reference of the whole op (docs/OPS.md), float32 accumulation.


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "silu":  # x * sigmoid(x), sigmoid via tanh so large |x| cannot overflow exp
        return x * (0.5 + 0.5 * np.tanh(0.5 * x))
    # gelu, tanh approximation
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def layer_dims(layer: Mapping[str, np.ndarray], expert_bits: Sequence[int], group_size: int) -> tuple[int, int, int]:
    """Validate one layer's tensors against OPS.md and return (E, H, I)."""
    check_group_size(group_size)
    for name in LAYER_TENSOR_NAMES:
        require(name in layer, f"layer tensors lack '{name}'; expected {LAYER_TENSOR_NAMES}")
    s1, s2 = np.shape(layer["w1.scales"]), np.shape(layer["w2.scales"])
    require(len(s1) == 4 and len(s2) == 4 and s1[-1] == TILE_ROWS and s2[-1] == TILE_ROWS,
            f"scales must be [E, rows/{TILE_ROWS}, G, {TILE_ROWS}] (layout v{LAYOUT_VERSION}); got w1 {s1}, w2 {s2}")
    e, two_i = s1[0], s1[1] * TILE_ROWS
    h = s2[1] * TILE_ROWS
    require(two_i % 2 == 0 and two_i > 0, f"w1 has {two_i} rows; it must be 2*I (gate then up)")
    i = two_i // 2
    require(len(expert_bits) == e, f"expert_bits has {len(expert_bits)} entries but the scales hold {e} experts")
    slot_table(expert_bits)
    for m, rows, k in (("w1", 2 * i, h), ("w2", h, i)):
        g = num_groups(k, group_size)
        for part, dt in (("scales", np.float16), ("zeros", np.uint8)):
            t = np.asarray(layer[f"{m}.{part}"])
            want = (e, rows // TILE_ROWS, g, TILE_ROWS)
            require(t.shape == want, f"{m}.{part} has shape {t.shape}; expected {want}")
            require(t.dtype == dt, f"{m}.{part} must be {np.dtype(dt)}, got {t.dtype}")
        packed = {b: layer[f"{m}.q{b}"] for b in SUPPORTED_BITS}
        _check_counts(packed, expert_bits, f"{m} codes")
        for b in SUPPORTED_BITS:
            shape = np.shape(packed[b])
            want = (shape[0], rows // TILE_ROWS, num_blocks(k) * b, TILE_ROWS)
            require(shape == want, f"{m}.q{b} has shape {shape}; expected {want}")
    return e, h, i


def int8_activations(x: np.ndarray) -> np.ndarray:
    """The integer kernels' view of float32 activations [T, K]: per 32-value block, q = rint(x * 127 / max|x|)
    in [-127, 127] and d = max|x| / 127 (float32, the kernel's operations); returns q * d as float32."""
    x = np.asarray(x, np.float32)
    t, k = x.shape
    blocks = np.zeros((t, num_blocks(k) * BLOCK), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(t, -1, BLOCK)
    amax = np.abs(blocks).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32)
    return (q * d).reshape(t, -1)[:, :k].astype(np.float32)


def moe_experts_reference(hidden, indices, weights, layer_tensors: Mapping[str, np.ndarray],
                          expert_bits: Sequence[int], group_size: int, activation: str = "silu",
                          int8: bool = False) -> np.ndarray:
    """out[t] = sum_j weights[t,j] * expert_{indices[t,j]}(hidden[t]); returns hidden's dtype.

    int8: the integer kernels' arithmetic: each expert input (x, then act(gate) * up) seen through
    `int8_activations`, float32 accumulation as above."""
    hidden, indices, weights = np.asarray(hidden), np.asarray(indices), np.asarray(weights)
    require(activation in ACTIVATIONS, f"activation '{activation}' unknown; use one of {ACTIVATIONS}")
    e_count, h, i = layer_dims(layer_tensors, expert_bits, group_size)
    require(hidden.ndim == 2 and hidden.shape[1] == h, f"hidden must be [T, {h}], got {hidden.shape}")
    require(indices.ndim == 2 and indices.shape[0] == hidden.shape[0],
            f"indices must be [T={hidden.shape[0]}, k], got {indices.shape}")
    require(weights.shape == indices.shape, f"weights {weights.shape} must match indices {indices.shape}")
    require(indices.size == 0 or (indices.min() >= 0 and indices.max() < e_count),
            f"routing indices must lie in [0, {e_count}); found [{indices.min()}, {indices.max()}]")
    x = hidden.astype(np.float32)
    quant = int8_activations if int8 else (lambda v: v)
    x = quant(x)
    out = np.zeros((hidden.shape[0], h), np.float32)
    for e in np.unique(indices):
        b = int(expert_bits[e])
        w1 = dequantize(*expert_matrix(layer_tensors, "w1", e, expert_bits), b, h, group_size)
        w2 = dequantize(*expert_matrix(layer_tensors, "w2", e, expert_bits), b, i, group_size)
        tok, slot = np.nonzero(indices == e)
        a = x[tok] @ w1.T
        act = quant(_activation(a[:, :i], activation) * a[:, i:])
        y = act @ w2.T
        np.add.at(out, tok, weights[tok, slot].astype(np.float32)[:, None] * y)
    return out.astype(hidden.dtype)
