"""PyTorch reference execution of packed experts (docs/FORMAT.md), for evaluation and export.

`PackedLayer` holds one MoE layer's packed tensors as buffers (layout v2: every expert matrix in tiles of
16 rows); `moe_experts_torch` computes the op of docs/OPS.md from them, untiling one expert at a time;
`PackedLinear` is one packed row-major matrix used as an `nn.Linear` (ModuleList experts, and shared
experts/attention when those are quantized). Nothing here is optimized: it is the executable definition that
the ONNX graph and the kernels are compared with.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MopeqError
from .packing import BLOCK, LAYER_TENSOR_NAMES, TILE_ROWS, slot_table
from .primitives import dequantize as dequantize_codes


def _fields(words: torch.Tensor, width: int) -> torch.Tensor:
    """[..., W] uint32 -> [..., W * 32/width] fields of `width` bits, low bits first."""
    per = 32 // width
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * width
    w = words.to(torch.int64).unsqueeze(-1)
    return ((w >> shifts) & ((1 << width) - 1)).flatten(-2)


def unpack_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint32 [..., rows, NB*b] -> int64 codes [..., rows, K] (FORMAT.md §3)."""
    nb = words.shape[-1] // bits
    blocks = words.reshape(*words.shape[:-1], nb, bits)
    if bits == 3:
        low = _fields(blocks[..., :2], 2)
        high = _fields(blocks[..., 2:], 1)
        codes = low | (high << 2)
    else:
        codes = _fields(blocks, bits)
    return codes.reshape(*words.shape[:-1], nb * BLOCK)[..., :k]


def untile_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., rows/16, J, 16] -> [..., rows, J]: element (r, j) of a row-major matrix from [r // 16, j, r % 16]
    (FORMAT.md §4; `packing.untile_rows`)."""
    if t.dim() < 3 or t.shape[-1] != TILE_ROWS:
        raise MopeqError(f"tiled tensors are [..., rows/{TILE_ROWS}, J, {TILE_ROWS}], got shape {tuple(t.shape)}")
    return t.transpose(-1, -2).reshape(*t.shape[:-3], t.shape[-3] * TILE_ROWS, t.shape[-2])


def dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, k: int,
               group_size: int) -> torch.Tensor:
    return dequantize_codes(unpack_codes(words, bits, k), scales, zeros, group_size)


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    return nn.functional.silu(x) if name == "silu" else nn.functional.gelu(x, approximate="tanh")


def moe_experts_torch(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                      tensors: dict[str, torch.Tensor], expert_bits: list[int], group_size: int,
                      activation: str = "silu") -> torch.Tensor:
    """The op of docs/OPS.md: routed experts from packed weights (tiled, FORMAT.md §4), float32 accumulation."""
    h = hidden.shape[-1]
    i = tensors["w1.scales"].shape[1] * TILE_ROWS // 2  # w1.scales [E, 2I/16, G, 16]
    slots = slot_table(expert_bits)
    x = hidden.float()
    out = torch.zeros(hidden.shape[0], h, dtype=torch.float32, device=hidden.device)

    def matrix(m: str, e: int, b: int, s: int, k: int) -> torch.Tensor:
        return dequantize(untile_rows(tensors[f"{m}.q{b}"][s]), untile_rows(tensors[f"{m}.scales"][e]),
                          untile_rows(tensors[f"{m}.zeros"][e]), b, k, group_size)

    for e in torch.unique(indices).tolist():
        b, s = expert_bits[e], int(slots[e])
        w1 = matrix("w1", e, b, s, h)  # [2I, H]
        w2 = matrix("w2", e, b, s, i)  # [H, I]
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        a = x[tok] @ w1.t()
        y = (_act(a[:, :i], activation) * a[:, i:]) @ w2.t()
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    return out.to(hidden.dtype)


def _register(module: nn.Module, **buffers: torch.Tensor | None) -> None:
    """Packed tensors as non-persistent buffers: they move with .to(), and state_dict() stays the model's."""
    for name, t in buffers.items():
        module.register_buffer(name, t, persistent=False)


def _buffer_name(tensor_name: str) -> str:
    return tensor_name.replace(".", "_")


class PackedLayer(nn.Module):
    """One MoE layer's packed tensors (LAYER_TENSOR_NAMES) as buffers, plus the op's attributes."""

    def __init__(self, tensors: dict[str, torch.Tensor], expert_bits: list[int], group_size: int, activation: str):
        super().__init__()
        _register(self, **{_buffer_name(name): tensors[name] for name in LAYER_TENSOR_NAMES})
        self.expert_bits = [int(b) for b in expert_bits]
        self.group_size = int(group_size)
        self.activation = activation

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _buffer_name(name)) for name in LAYER_TENSOR_NAMES}

    def forward(self, hidden, indices, weights):
        return moe_experts_torch(hidden, indices, weights, self.tensors(), self.expert_bits, self.group_size,
                                 self.activation)


class PackedLinear(nn.Module):
    """A linear layer whose weight is one packed matrix [out, in] at `bits` (FORMAT.md §3)."""

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 in_features: int, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        _register(self, words=words, scales=scales, zeros=zeros, bias=bias)
        self.bits, self.in_features, self.group_size = bits, in_features, group_size
        self.out_features = scales.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.words, self.scales, self.zeros, self.bits, self.in_features, self.group_size)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class PackedEmbedding(nn.Module):
    """An embedding table quantized row by row (groups along the embedding dimension, FORMAT.md §2).

    The codes are kept unpacked (uint8 [rows, dim], `bits` <= 8): a lookup gathers the token's codes, zeros
    and scales and dequantizes only those rows, which is what the exported graph does with standard ops
    (Gather, Cast, Sub, Mul), so the table stays 1 byte per weight in the file and in memory."""

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dim: int,
                 group_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype  # of the embeddings it returns (the model's activation dtype)
        _register(self, codes=unpack_codes(words, bits, dim).to(torch.uint8), scales=scales, zeros=zeros)
        self.bits, self.embedding_dim, self.group_size = bits, dim, group_size
        self.num_embeddings = scales.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # one Gather per table in ONNX, then the rows' dequantization
        rows = dequantize_codes(*(torch.index_select(t, 0, flat) for t in (self.codes, self.scales, self.zeros)),
                                self.group_size)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)
