"""Group-wise asymmetric integer quantization primitives (PyTorch), per docs/FORMAT.md §2.

    q  = clamp(round(w / s) + z, 0, 2^b - 1)      s: float16 scale, z: integer zero point (uint8)
    w' = (q - z) * s                               computed in float32

Groups run along the input dimension K (columns); the last group may be partial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import check_bits, check_group_size, num_groups

_MIN_SCALE = 1e-6  # above float16's smallest subnormal, far below any real weight range
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # shrink factors 1.0 .. 0.5 for the clipping search


def check_width(bits: int, group_size: int) -> None:
    """The packed format's limits (packing.py is the one place they are defined)."""
    check_bits(bits)
    check_group_size(group_size)


@dataclass
class QuantizedMatrix:
    """One quantized matrix [rows, K]: codes unpacked (uint8), scales float16, zeros uint8 — per (row, group)."""

    bits: int
    group_size: int
    codes: torch.Tensor  # uint8 [rows, K]
    scales: torch.Tensor  # float16 [rows, G]
    zeros: torch.Tensor  # uint8 [rows, G]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)

    def cpu(self) -> "QuantizedMatrix":
        return QuantizedMatrix(self.bits, self.group_size, self.codes.cpu(), self.scales.cpu(), self.zeros.cpu())

    def rows(self, start: int, stop: int) -> "QuantizedMatrix":
        """Rows start:stop (the groups run along a row, so a row slice is a matrix of its own)."""
        return QuantizedMatrix(self.bits, self.group_size, self.codes[start:stop], self.scales[start:stop],
                               self.zeros[start:stop])

    @staticmethod
    def stack_rows(parts: list["QuantizedMatrix"]) -> "QuantizedMatrix":
        """The row blocks of one matrix (same width and group size) joined back, on the CPU."""
        return QuantizedMatrix(parts[0].bits, parts[0].group_size,
                               *(torch.cat([getattr(p, a).cpu() for p in parts]) for a in ("codes", "scales", "zeros")))


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[..., G] -> [..., K]: each group's value repeated over its columns (last group partial)."""
    return t[..., torch.arange(k, device=t.device) // group_size]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    k = codes.shape[-1]
    s = expand_groups(scales.float(), k, group_size)
    z = expand_groups(zeros.float(), k, group_size)
    return (codes.float() - z) * s


def _pad_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, K] -> values [..., rows, G, g] and a mask of real (non-padding) entries."""
    k = w.shape[-1]
    g = num_groups(k, group_size)
    pad = g * group_size - k
    vals = torch.nn.functional.pad(w, (0, pad)).view(*w.shape[:-1], g, group_size)
    mask = torch.nn.functional.pad(torch.ones_like(w, dtype=torch.bool), (0, pad)).view(*w.shape[:-1], g, group_size)
    return vals, mask


# an expert's width: one for its w1 and w2, or the pair (w1's, w2's). Pairs are a quantizer-side study option
# (scripts/compare_matrix_widths.py): the packed format holds one width per expert (docs/FORMAT.md), and plan
# files hold integers only (plan_io.read_plan_bits), so the build never sees a pair
Width = int | tuple[int, int]


def matrix_widths(b: Width) -> tuple[int, int]:
    """(w1's width, w2's width) of an expert's `Width`."""
    return (int(b[0]), int(b[1])) if isinstance(b, (tuple, list)) else (int(b), int(b))


def qmax_of(bits, ndim: int, device=None) -> float | torch.Tensor:
    """2^b - 1: a number for one width, or a float tensor [E, 1, ...] (ndim dims) for per-expert widths."""
    if isinstance(bits, torch.Tensor):
        q = (2 ** bits.to(torch.int64) - 1).to(torch.float32, copy=False)
        return q.to(device).view(-1, *([1] * (ndim - 1)))
    return float(2 ** bits - 1)


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, qmax) -> tuple[torch.Tensor, torch.Tensor]:
    flat = (hi - lo) < _MIN_SCALE * qmax
    # a constant group keeps zero inside its range so it is represented exactly by q or z
    lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
    scale = ((hi - lo) / qmax).clamp_min(_MIN_SCALE).half().float()  # the stored (float16) scale
    zero = torch.minimum(torch.round(-lo / scale).clamp_min(0), torch.as_tensor(qmax, dtype=lo.dtype, device=lo.device))
    return scale, zero


def _candidate_error(vals: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax, weight: torch.Tensor | None,
                     work: torch.Tensor) -> torch.Tensor:
    """Per group: sum of weight * ((clamp(round(v / s) + z, 0, qmax) - z) * s - v)^2, computed in `work`
    (a buffer shaped like vals) step by step in place: this search is the hot loop of RTN at real size."""
    s, z = scale[..., None], zero[..., None]
    torch.div(vals, s, out=work)
    work.round_().add_(z)
    if isinstance(qmax, torch.Tensor):
        torch.minimum(work.clamp_min_(0), qmax[..., None], out=work)
    else:
        work.clamp_(0, qmax)
    work.sub_(z).mul_(s).sub_(vals).square_()
    if weight is not None:
        work.mul_(weight)
    return work.sum(-1)


def choose_params(w: torch.Tensor, bits, group_size: int, col_weight: torch.Tensor | None = None,
                  clip_grid=CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-representable, as float32) and zero per (row, group), with a clipping search.

    w is [rows, K], or [E, rows, K] with `bits` one width per expert (a tensor [E]). Each candidate shrinks
    the group's [min, max] range by a factor; the one with the smallest squared error (weighted per column
    by `col_weight`, e.g. the input's second moment) wins. At 2 bits the clipping matters: the min/max range
    wastes levels on rare outliers.
    """
    vals, mask = _pad_groups(w.float(), group_size)
    qmax = qmax_of(bits, vals.dim() - 1, w.device)  # broadcasts over [..., rows, G]
    padded = w.shape[-1] % group_size != 0
    big = torch.finfo(torch.float32).max
    lo = (torch.where(mask, vals, torch.full_like(vals, big)) if padded else vals).amin(-1)
    hi = (torch.where(mask, vals, torch.full_like(vals, -big)) if padded else vals).amax(-1)
    if col_weight is not None:
        cw = _pad_groups(col_weight.expand_as(w).float(), group_size)[0]
    else:
        cw = mask.float() if padded else None  # padding carries no error
    work = torch.empty_like(vals)
    best_s, best_z, best_err = None, None, None
    for f in clip_grid:
        s, z = _params_from_range(lo * f, hi * f, qmax)
        err = _candidate_error(vals, s, z, qmax, cw, work)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best_err)
    return best_s, best_z


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits, group_size: int) -> torch.Tensor:
    k = w.shape[-1]
    s = expand_groups(scale, k, group_size)
    z = expand_groups(zero, k, group_size)
    q = torch.round(w.float() / s) + z
    return torch.minimum(q.clamp_min(0), torch.as_tensor(qmax_of(bits, w.dim(), w.device), dtype=q.dtype, device=q.device))


def rtn(w: torch.Tensor, bits: int, group_size: int, col_weight: torch.Tensor | None = None) -> QuantizedMatrix:
    """Round-to-nearest with the clipping search: the simple path, and GPTQ's fallback."""
    check_width(bits, group_size)
    scale, zero = choose_params(w, bits, group_size, col_weight)
    codes = quantize_codes(w, scale, zero, bits, group_size)
    return QuantizedMatrix(bits, group_size, codes.to(torch.uint8), scale.half(), zero.to(torch.uint8))


def quant_error(w: torch.Tensor, bits: int, group_size: int) -> float:
    """Squared Frobenius error of RTN at `bits`: the perturbation term of the second-order loss estimate."""
    return float(((rtn(w, bits, group_size).dequantize() - w.float()) ** 2).sum())
