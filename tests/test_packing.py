"""The NumPy reference of docs/FORMAT.md: worked example, exact round trips, validation, op reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mopeq_export.errors import MopeqError
from mopeq_export.quantization import packing as P
from packed_layers import random_layer


def hexwords(words):
    return [f"0x{int(w):08X}" for w in np.asarray(words).reshape(-1)]


def test_worked_example():
    """Pins FORMAT.md §7 word for word."""
    i = np.arange(32, dtype=np.uint8)[None]
    assert hexwords(P.pack_codes(i % 4, 2)) == ["0xE4E4E4E4"] * 2
    assert hexwords(P.pack_codes(i % 8, 3)) == ["0xE4E4E4E4", "0xE4E4E4E4", "0xF0F0F0F0"]
    assert hexwords(P.pack_codes(i % 16, 4)) == ["0x76543210", "0xFEDCBA98"] * 2
    assert hexwords(P.pack_codes(np.array([[3, 0, 1, 2, 3]], np.uint8), 2)) == ["0x00000393", "0x00000000"]
    assert hexwords(P.pack_codes(np.array([[5, 3, 7, 1, 6]], np.uint8), 3)) == [
        "0x0000027D", "0x00000000", "0x00000015"]
    scale = np.array([[0.25]], np.float16)
    assert scale.view(np.uint16)[0, 0] == 0x3400
    w = P.dequantize(P.pack_codes(i % 16, 4), scale, np.array([[8]], np.uint8), 4, 32, 32)
    assert w[0, 13] == np.float32(1.25)


def test_tile_example():
    """Pins FORMAT.md §7 "Tiles" and the offsets of §4: an expert's 2-bit matrix of 32 rows and K = 64 (NB = 2,
    4 words a row) is [2, 4, 16] words; row 17's word 3 (values 48-63) is [1, 3, 1], flat word index 113."""
    rng = np.random.default_rng(17)
    codes = rng.integers(0, 4, (32, 64), dtype=np.uint8)
    words = P.pack_codes(codes, 2)
    assert words.shape == (32, 4)
    tiled = P.tile_rows(words)
    assert tiled.shape == (2, 4, 16) and tiled.dtype == np.uint32 and tiled.flags.c_contiguous
    word = int(sum(int(c) << (2 * n) for n, c in enumerate(codes[17, 48:64])))  # §3: value i at bits 2*(i % 16)
    assert tiled[1, 3, 1] == words[17, 3] == word
    assert tiled.reshape(-1)[113] == word and (1 * 4 + 3) * 16 + 1 == 113
    # §4: byte offset of word j of row r inside an expert's codes, and of an expert inside its width's tensor
    r, j, nbb = 17, 3, P.num_blocks(64) * 2
    offset = ((r // 16) * nbb + j) * 64 + (r % 16) * 4
    assert offset == 113 * 4 and tiled.tobytes()[offset:offset + 4] == np.uint32(word).tobytes()
    other = rng.integers(0, 4, (32, 64), dtype=np.uint8)
    packed = P.split_by_width([other, codes], [2, 2])  # expert 1 is slot 1 of q2
    assert packed[2].shape == (2, 2, 4, 16)
    slot_offset = 1 * 32 * nbb * 4
    assert packed[2].tobytes()[slot_offset + offset:slot_offset + offset + 4] == np.uint32(word).tobytes()
    np.testing.assert_array_equal(P.untile_rows(tiled), words)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=2), st.integers(1, 4), st.integers(1, 40), st.randoms())
def test_tile_untile_round_trip(lead, tiles, j, rnd):
    """tile_rows puts element (r, j) at [r // 16, j, r % 16] for any leading dims (E, possibly 0) and dtype."""
    rng = np.random.default_rng(rnd.randint(0, 2**32))
    rows = tiles * P.TILE_ROWS
    for dtype in (np.uint32, np.float16, np.uint8):
        a = rng.integers(0, 200, (*lead, rows, j)).astype(dtype)
        t = P.tile_rows(a)
        assert t.shape == (*lead, tiles, j, P.TILE_ROWS) and t.dtype == dtype
        np.testing.assert_array_equal(P.untile_rows(t), a)
        for r in (0, 1, 15, 16, rows - 1):
            if r < rows:
                np.testing.assert_array_equal(t[..., r // 16, :, r % 16], a[..., r, :])


def test_rows_not_multiple_of_16_are_refused():
    for rows in (1, 8, 20, 33):
        with pytest.raises(MopeqError, match=f"{rows} rows.*tiles of 16 rows.*multiples of 16"):
            P.tile_rows(np.zeros((rows, 4), np.uint32))
        with pytest.raises(MopeqError, match=f"{rows} rows.*multiples of 16"):
            P.split_by_width([np.zeros((rows, 40), np.uint8)], [2])
    with pytest.raises(MopeqError, match="0 rows"):
        P.check_tile_rows(0, "a matrix")
    with pytest.raises(MopeqError, match=r"\[\.\.\., rows/16, J, 16\]"):
        P.untile_rows(np.zeros((2, 4, 8), np.uint32))  # last axis is not a tile of 16 rows
    P.check_tile_rows(48, "a matrix")  # a multiple of 16 passes


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(P.SUPPORTED_BITS))
    shape = draw(st.tuples(st.integers(1, 5), st.integers(1, 200)))
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 3)), *shape)  # leading expert dim, possibly 0
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return codes, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_round_trip_exact(cb):
    codes, bits = cb
    k = codes.shape[-1]
    words = P.pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (*codes.shape[:-1], P.num_blocks(k) * bits)
    np.testing.assert_array_equal(P.unpack_codes(words, bits, k), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_bits())
def test_padding_is_zero(cb):
    codes, bits = cb
    k = codes.shape[-1]
    full = P.unpack_codes(P.pack_codes(codes, bits), bits, P.num_blocks(k) * P.BLOCK)
    assert not full[..., k:].any()


@settings(max_examples=100, deadline=None)
@given(codes_and_bits(), st.sampled_from(P.GROUP_SIZES), st.randoms())
def test_dequantize_matches_naive_loop(cb, g, rnd):
    codes, bits = cb
    codes = codes.reshape(-1, codes.shape[-1])
    rows, k = codes.shape
    G = P.num_groups(k, g)
    rng = np.random.default_rng(rnd.randint(0, 2**32))
    scales = rng.uniform(-2, 2, (rows, G)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, (rows, G), dtype=np.uint8)
    got = P.dequantize(P.pack_codes(codes, bits), scales, zeros, bits, k, g)
    for r in range(rows):
        for c in range(k):
            want = (np.float32(codes[r, c]) - np.float32(zeros[r, c // g])) * np.float32(scales[r, c // g])
            assert got[r, c] == want


def test_bad_inputs_raise():
    ok = np.zeros((2, 40), np.uint8)
    with pytest.raises(MopeqError, match="unsupported width 5"):
        P.pack_codes(ok, 5)
    with pytest.raises(MopeqError, match="out of range for 2 bits"):
        P.pack_codes(np.full((1, 3), 4, np.uint8), 2)
    with pytest.raises(MopeqError, match="must be uint32"):
        P.unpack_codes(np.zeros((2, 4), np.int32), 2, 40)
    with pytest.raises(MopeqError, match="needs 6"):
        P.unpack_codes(np.zeros((2, 4), np.uint32), 3, 40)
    words = P.pack_codes(ok, 4)
    with pytest.raises(MopeqError, match="positive multiple of 32"):
        P.dequantize(words, np.zeros((2, 1), np.float16), np.zeros((2, 1), np.uint8), 4, 40, 48)
    with pytest.raises(MopeqError, match="must be"):
        P.dequantize(words, np.zeros((2, 1), np.float16), np.zeros((2, 1), np.uint8), 4, 40, 32)
    with pytest.raises(MopeqError, match="float16"):
        P.dequantize(words, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), 4, 40, 32)


def test_slot_table_and_split_merge():
    bits = [4, 2, 4, 3, 2, 2, 4]
    np.testing.assert_array_equal(P.slot_table(bits), [0, 0, 1, 0, 1, 2, 2])
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 1 << b, (32, 70), dtype=np.uint8) for b in bits]
    packed = P.split_by_width(codes, bits)  # tiled: [E_b, rows/16, NB*b, 16]
    assert {b: v.shape for b, v in packed.items()} == {
        2: (3, 2, 6, 16), 3: (1, 2, 9, 16), 4: (3, 2, 12, 16), 8: (0, 2, 24, 16)}
    for e, (b, s) in enumerate(zip(bits, P.slot_table(bits))):  # expert e's words, tiled per FORMAT.md §4
        np.testing.assert_array_equal(packed[b][s], P.tile_rows(P.pack_codes(codes[e], b)))
    for a, b in zip(P.merge_by_width(packed, bits, 70), codes):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(MopeqError, match="unsupported width"):
        P.slot_table([4, 5])
    with pytest.raises(MopeqError, match="hold 2 experts"):
        P.merge_by_width({**packed, 2: packed[2][:2]}, bits, 70)



@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_reference_matches_per_token_loop(activation):
    rng = np.random.default_rng(1)
    bits, h, i, g, t, k = [2, 3, 4, 8, 3], 80, 40, 32, 5, 2  # K = 80 and 40: partial blocks and groups
    layer = random_layer(rng, bits, h, i, g)
    x = rng.standard_normal((t, h)).astype(np.float32)
    idx = rng.integers(0, len(bits), (t, k))
    wts = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
    got = P.moe_experts_reference(x, idx, wts, layer, bits, g, activation)
    slots = P.slot_table(bits)
    want = np.zeros_like(got)
    for tt in range(t):
        for j in range(k):
            e = idx[tt, j]
            b, s = bits[e], slots[e]
            def matrix(m, kk):  # expert e's row-major matrix m from the tiled tensors
                u = P.untile_rows
                return P.dequantize(u(layer[f"{m}.q{b}"][s]), u(layer[f"{m}.scales"][e]), u(layer[f"{m}.zeros"][e]),
                                    b, kk, g)

            w1, w2 = matrix("w1", h), matrix("w2", i)
            a = w1 @ x[tt]
            gate = a[:i]
            act = gate / (1 + np.exp(-gate)) if activation == "silu" else \
                0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
            want[tt] += wts[tt, j] * (w2 @ (act * a[i:]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reference_rejects_bad_layer():
    rng = np.random.default_rng(2)
    bits = [2, 4]
    layer = random_layer(rng, bits, 64, 32, 32)
    x = np.ones((1, 64), np.float32)
    idx, w = np.array([[0, 1]]), np.ones((1, 2), np.float32)
    with pytest.raises(MopeqError, match=r"\[0, 2\)"):
        P.moe_experts_reference(x, np.array([[0, 2]]), w, layer, bits, 32)
    with pytest.raises(MopeqError, match="expert_bits has 3"):
        P.moe_experts_reference(x, idx, w, layer, [2, 4, 4], 32)
    with pytest.raises(MopeqError, match="hold 1 experts"):
        P.moe_experts_reference(x, idx, w, layer, [4, 4], 32)
    with pytest.raises(MopeqError, match="w1.scales has shape"):
        P.moe_experts_reference(x, idx, w, layer, bits, 64)
    untiled = {**layer, **{f"{m}.{p}": P.untile_rows(layer[f"{m}.{p}"]) for m in ("w1", "w2")
                           for p in ("scales", "zeros")}}  # layout v1's [E, rows, G]
    with pytest.raises(MopeqError, match=r"scales must be \[E, rows/16, G, 16\] \(layout v2\)"):
        P.moe_experts_reference(x, idx, w, untiled, bits, 32)
    v1_codes = {**layer, "w2.q2": P.untile_rows(layer["w2.q2"])}
    with pytest.raises(MopeqError, match="w2.q2 has shape"):
        P.moe_experts_reference(x, idx, w, v1_codes, bits, 32)
    with pytest.raises(MopeqError, match="activation"):
        P.moe_experts_reference(x, idx, w, layer, bits, 32, "relu")


def test_cpp_header_matches_python_constants():
    """runtime/csrc/include/mopeq_format.h is the C++ copy of the layout constants (FORMAT.md §6)."""
    import re
    from pathlib import Path

    header = (Path(__file__).parents[1] / "runtime/csrc/include/mopeq_format.h").read_text()

    def ints(pattern):
        return tuple(int(v) for v in re.findall(r"\d+", re.search(pattern, header).group(1)))

    assert ints(r"#define MOPEQ_LAYOUT_VERSION (\d+)") == (P.LAYOUT_VERSION,)
    assert ints(r"kBlock = (\d+);") == (P.BLOCK,)
    assert ints(r"kTileRows = (\d+);") == (P.TILE_ROWS,)
    assert ints(r"kSupportedBits\[\] = \{([^}]*)\}") == P.SUPPORTED_BITS
    assert ints(r"kGroupSizes\[\] = \{([^}]*)\}") == P.GROUP_SIZES
