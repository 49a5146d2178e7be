"""GPTQ for one matrix, given the Gram matrix of the inputs that reach it.

For a routed expert the inputs are only the tokens routed to that expert (its own ``X_e^T X_e``);
for ``w2`` they are the expert's intermediate activations. Group parameters are chosen with the same
clipping search as RTN, on the error-compensated weights as the sweep reaches each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MopeqError
from .primitives import QuantizedMatrix, check_width, choose_params, num_groups, qmax_of

_BLOCK_COLS = 128


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (static groups then)
    min_tokens: int = 64  # fewer routed tokens than this -> round-to-nearest fallback
    # weigh each column's error by its Hessian diagonal in the clipping search; measured on text-moe at
    # 2 bits it did not help (ppl x1.0935 vs x1.0900 plain), so it is off by default
    hessian_clip: bool = False


class Gram:
    """Running sum of x^T x over input rows (float64 for stable accumulation) and its row count."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.xtx += x.t() @ x
        self.n += x.shape[0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising the damping until H is positive definite."""
    k = h.shape[0]
    mean_diag = torch.diag(h).mean().clamp_min(1e-8)
    for extra in (1.0, 10.0, 100.0):
        try:
            hd = h + torch.eye(k, dtype=h.dtype, device=h.device) * damp * extra * mean_diag
            inv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise MopeqError("GPTQ: an expert's input Gram matrix is not positive definite even with 100x damping; "
                     "raise --damp or use --method rtn")


def gptq(w: torch.Tensor, gram: Gram, bits: int, group_size: int, cfg: GPTQConfig = GPTQConfig()) -> QuantizedMatrix:
    check_width(bits, group_size)
    rows, k = w.shape
    dev = w.device
    h = (gram.xtx / max(gram.n, 1)).float().to(dev)
    w = w.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    qmax = 2 ** bits - 1

    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(k, device=dev)
    group_of = torch.arange(k, device=dev) // group_size  # group of each original column
    n_groups = num_groups(k, group_size)
    scales = torch.zeros(rows, n_groups, device=dev)
    zeros = torch.zeros(rows, n_groups, device=dev)
    if cfg.act_order:  # static groups: parameters from the original weights
        scales, zeros = choose_params(w, bits, group_size, torch.diag(h) if cfg.hessian_clip else None)

    diag = torch.diag(h)[perm]
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, cfg.damp)
    codes = torch.zeros(rows, k, device=dev)
    block = max(_BLOCK_COLS, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[perm[col]])
            if not cfg.act_order and col % group_size == 0:
                # columns are in natural order: the group starts here and lies inside this block
                cw = diag[col:col + group_size] if cfg.hessian_clip else None
                s, z = choose_params(w1[:, i:i + group_size], bits, group_size, cw)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(w1[:, i] / s) + z, 0, qmax)
            codes[:, perm[col]] = q
            e = (w1[:, i] - (q - z) * s) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return QuantizedMatrix(bits, group_size, codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8))


# -- every expert of a layer at once -------------------------------------------------------------------
def _inverse_cholesky_batched(h: torch.Tensor, damp: float) -> torch.Tensor:
    """`_inverse_cholesky` for [E, K, K]: each matrix gets the smallest damping that works for it."""
    e, k, _ = h.shape
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    out = torch.empty_like(h)
    todo = torch.arange(e, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        hd = h[todo] + eye * (damp * extra * mean_diag[todo])[:, None, None]
        low, info = torch.linalg.cholesky_ex(hd)
        inv = torch.cholesky_inverse(torch.where((info == 0)[:, None, None], low, eye))
        up, info2 = torch.linalg.cholesky_ex(inv, upper=True)
        ok = (info == 0) & (info2 == 0)
        out[todo[ok]] = up[ok]
        todo = todo[~ok]
        if not len(todo):
            return out
    raise MopeqError("GPTQ: an expert's input Gram matrix is not positive definite even with 100x damping; "
                     "raise --damp or use --method rtn")


def gptq_batched(w: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, group_size: int,
                 cfg: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gptq` for E matrices at once: w [E, rows, K], h [E, K, K] (the Gram matrices already divided by
    their row counts), bits [E] (one width per matrix). Returns codes uint8 [E, rows, K], scales float16
    and zeros uint8 [E, rows, G]. The same algorithm step by step as `gptq`, which stays the reference
    (tests compare the two); batching turns a layer's thousands of column steps per expert into one
    pass of batched steps."""
    for b in bits.unique().tolist():
        check_width(int(b), group_size)
    e_count, rows, k = w.shape
    dev = w.device
    h = h.float().clone()
    w = w.float().clone()
    diag_view = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag_view == 0
    diag_view[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    qmax = qmax_of(bits, 2, dev)  # [E, 1]: broadcasts over a column [E, rows]

    diag = torch.diagonal(h, dim1=-2, dim2=-1).clone()
    perm = (torch.argsort(diag, dim=-1, descending=True) if cfg.act_order
            else torch.arange(k, device=dev).expand(e_count, k))
    group_of = torch.arange(k, device=dev) // group_size
    n_groups = num_groups(k, group_size)
    scales = torch.zeros(e_count, rows, n_groups, device=dev)
    zeros = torch.zeros(e_count, rows, n_groups, device=dev)
    if cfg.act_order:  # static groups: parameters from the original weights
        scales, zeros = choose_params(w, bits, group_size, diag[:, None, :] if cfg.hessian_clip else None)

    diag = diag.gather(1, perm)
    w = w.gather(2, perm[:, None, :].expand(e_count, rows, k))
    h = h.gather(1, perm[:, :, None].expand(e_count, k, k)).gather(2, perm[:, None, :].expand(e_count, k, k))
    hinv = _inverse_cholesky_batched(h, cfg.damp)
    codes = torch.zeros(e_count, rows, k, device=dev)
    block = max(_BLOCK_COLS, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].clone()
        err = torch.zeros_like(w1)
        hb = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if cfg.act_order:
                g = group_of[perm[:, col]][:, None, None].expand(e_count, rows, 1)
                s, z = scales.gather(2, g)[..., 0], zeros.gather(2, g)[..., 0]
            else:
                g = col // group_size
                if col % group_size == 0:
                    cw = diag[:, None, col:col + group_size] if cfg.hessian_clip else None
                    s, z = choose_params(w1[:, :, i:i + group_size], bits, group_size, cw)
                    scales[:, :, g], zeros[:, :, g] = s[..., 0], z[..., 0]
                s, z = scales[:, :, g], zeros[:, :, g]
            q = torch.minimum((torch.round(w1[:, :, i] / s) + z).clamp_min(0), qmax)
            codes.scatter_(2, perm[:, col][:, None, None].expand(e_count, rows, 1), q[..., None])
            e = (w1[:, :, i] - (q - z) * s) / hb[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * hb[:, i, i:][:, None, :]
            err[:, :, i] = e
        w[:, :, i2:] -= err @ hinv[:, i1:i2, i2:]
    return codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8)
