"""Learned rounding and clipping for routed experts: signed-gradient descent on the quantization's output error.

Each matrix gets per-weight rounding offsets V in [-0.5, 0.5] and per-group shrink factors alpha (of the
group's max) and beta (of its min) in [0.5, 1]:

    lo = beta * min(w_g),  hi = alpha * max(w_g),  s = (hi - lo) / qmax,  z = clamp(round(-lo / s), 0, qmax)
    q  = clamp(round(w / s + V) + z, 0, qmax),  w' = (q - z) * s

V, alpha and beta minimise a squared output error on minibatches of calibration tokens by signed gradient
steps (rounding through the straight-through estimator), with a learning rate that decays linearly to zero: the
SignRound algorithm (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs", 2023), with both matrices of each expert optimised together. Two objectives:

    signround_layer    (the default) all experts of a layer on the layer's routing-weighted output, against a
                       target that can carry the float model's output (delta; quantization/pipeline.py)
    signround_experts  each expert on its own output ||expert(X_e; w1', w2') - expert(X_e; w1, w2)||^2

Two study options, off by default (docs/RESULTS.md "Eleventh session"): a wider or narrower bound of V
(`SignRoundConfig.v_range`) and a step scaled per bit of width (`lr_per_bit`).

The start is round-to-nearest with the clipping search's factor, and the result is kept only where it lowers
the loss on all calibration tokens; otherwise that start is. The codes, scales and zeros are the packed
format's (docs/FORMAT.md §2): nothing downstream changes. Every expert of a call is optimised at once
(batched matrix products over [E, ...]), and the signed step makes each expert's update independent of how
its loss is scaled against the others'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .primitives import (_MIN_SCALE, CLIP_GRID, QuantizedMatrix, Width, _candidate_error, _pad_groups,
                         _params_from_range, matrix_widths, qmax_of)


@dataclass(frozen=True)
class SignRoundConfig:
    # measured on text-moe at 2.25/2.5/3 bits (docs/RESULTS.md): 150 steps within run-to-run noise of 200,
    # 100 about 3% higher KL
    iters: int = 150
    lr: float | None = None  # None: 1 / iters, for the offsets and the clipping factors alike
    batch_tokens: int = 128  # tokens per expert per step (measured: 128 no worse than 256 at 2 bits, faster)
    seed: int = 0
    # weigh each token's squared error by its routing weight squared (the expert's output enters the layer's
    # output times that weight)
    routing_weighted: bool = False
    # "layer": all experts of a layer on the layer's output (signround_layer); "expert": each expert on its
    # own output (signround_experts)
    scope: str = "layer"
    # with scope "layer": the target is the float model's layer output (a second, float stream of hidden
    # states through the layers), so the experts also offset the error of the layers before them
    float_targets: bool = True
    # the bound of the rounding offsets V: 0.5 reaches the two grid points around w / s (SignRound); a larger bound
    # lets a code move further (a study option; V's step grows with it so that the bound is reachable)
    v_range: float = 0.5
    # the step of an expert at b bits is lr * lr_per_bit ** (b - 2): 1 gives every width the same step
    lr_per_bit: float = 1.0


def _per_matrix(bits: list[Width]) -> tuple[list[int], list[int]]:
    """Per-expert widths -> (w1's widths, w2's widths)."""
    pairs = [matrix_widths(b) for b in bits]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _FakeQuant(torch.autograd.Function):
    """(clamp(round(w / s + v) + z, 0, qmax) - z) * s with the straight-through rounding, its gradients in v,
    s and z written out: the same values and gradients as autograd through those operations (including
    clamp's and minimum's at the bounds: 1 at 0, 1/2 at qmax), in about half the passes over the weights,
    which is most of a step's time at small token counts. s, z, qmax broadcast against w."""

    @staticmethod
    def forward(ctx, w, v, s, z, qmax):
        ws = w / s
        t = torch.round(ws + v).add_(z)
        # d q / d t of clamp_min(0) then minimum(., qmax)
        m = (t >= 0).float().mul_((t < qmax).float()).add_((t == qmax).float(), alpha=0.5)
        qz = torch.minimum(t.clamp_min_(0), qmax).sub_(z)
        ctx.save_for_backward(ws, m, qz, s)
        return qz * s

    @staticmethod
    def backward(ctx, g):
        ws, m, qz, s = ctx.saved_tensors
        gm = g * m
        gs = (g * qz).sub_(gm * ws).sum_to_size(s.shape)  # direct (q - z) and through w / s
        gz = (gm - g).mul_(s).sum_to_size(s.shape)  # through t, minus the direct -s
        return None, gm.mul_(s), gs, gz, None


class _Learned:
    """One batch of matrices [E, rows, K] at widths bits [E], with their learnable V, alpha, beta."""

    def __init__(self, w: torch.Tensor, bits: torch.Tensor, group_size: int, v_range: float = 0.5):
        self.w, self.group_size, self.v_range = w.float(), group_size, v_range
        self.k = w.shape[-1]
        vals, mask = _pad_groups(self.w, group_size)
        big = torch.finfo(torch.float32).max
        self.lo = torch.where(mask, vals, torch.full_like(vals, big)).amin(-1)  # [E, rows, G]
        self.hi = torch.where(mask, vals, torch.full_like(vals, -big)).amax(-1)
        self.qmax = qmax_of(bits, 3, w.device)  # [E, 1, 1]
        f = _best_clip(vals, mask, self.lo, self.hi, self.qmax)
        self.alpha = f.clone().requires_grad_(True)
        self.beta = f.clone().requires_grad_(True)
        self.v = torch.zeros_like(self.w, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def _scale_zero(self, hard: bool):
        lo, hi = self.lo * self.beta, self.hi * self.alpha
        flat = (hi - lo) < _MIN_SCALE * self.qmax
        lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
        hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
        s = ((hi - lo) / self.qmax).clamp_min(_MIN_SCALE)
        if hard:
            s = s.half().float()
        rz = torch.round if hard else _ste_round
        z = torch.minimum(rz(-lo / s).clamp_min(0), self.qmax)
        return s, z

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., torch.arange(self.k, device=t.device) // self.group_size]

    def forward(self) -> torch.Tensor:
        """The dequantized weights, differentiable in V, alpha and beta."""
        s, z = self._scale_zero(hard=False)
        if self.k % self.group_size == 0:  # whole groups: broadcast over a [.., G, g] view, no gather
            shape = (*self.w.shape[:-1], self.k // self.group_size, self.group_size)
            return _FakeQuant.apply(self.w.view(shape), self.v.view(shape), s[..., None], z[..., None],
                                    self.qmax[..., None]).view(self.w.shape)
        return _FakeQuant.apply(self.w, self.v, self._expand(s), self._expand(z), self.qmax)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-self.v_range, self.v_range)
        self.alpha.clamp_(0.5, 1.0)
        self.beta.clamp_(0.5, 1.0)

    def dequantize(self, exported) -> torch.Tensor:
        """The weights of `export()`'s (codes, scales, zeros)."""
        codes, s, z = exported
        return (codes.float() - self._expand(z.float())) * self._expand(s.float())

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes uint8 [E, rows, K], scales float16 and zeros uint8 [E, rows, G] of the current parameters."""
        s, z = self._scale_zero(hard=True)
        q = torch.minimum((torch.round(self.w / self._expand(s) + self.v) + self._expand(z)).clamp_min(0), self.qmax)
        return q.to(torch.uint8), s.half(), z.to(torch.uint8)


def _best_clip(vals, mask, lo, hi, qmax) -> torch.Tensor:
    """Per group, the clipping search's shrink factor (primitives.choose_params' grid, unweighted)."""
    best_f = torch.ones_like(lo)
    best_err = None
    weight, work = mask.float(), torch.empty_like(vals)
    for f in CLIP_GRID:
        s, z = _params_from_range(lo * f, hi * f, qmax)
        err = _candidate_error(vals, s, z, qmax, weight, work)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
            best_err = torch.minimum(err, best_err)
    return best_f


def _descend(m1: _Learned, m2: _Learned, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             cfg: SignRoundConfig) -> None:
    """cfg.iters signed-gradient steps on loss_of(w1', w2') (each call draws its own minibatch), the step
    decaying linearly from lr to zero, the parameters clamped to their ranges after each."""
    params = m1.params() + m2.params()
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    # V's step scaled with its bound (1 at SignRound's 0.5), and every parameter's by its matrix's width ([E, 1, 1]);
    # none at the defaults
    scale = [None] * 6 if (cfg.v_range, cfg.lr_per_bit) == (0.5, 1.0) else \
        [k * cfg.lr_per_bit ** (torch.log2(m.qmax + 1) - 2) for m in (m1, m2) for k in (cfg.v_range / 0.5, 1.0, 1.0)]
    for step in range(cfg.iters):
        grads = torch.autograd.grad(loss_of(m1.forward(), m2.forward()), params, allow_unused=True)
        lr = lr0 * (1.0 - step / cfg.iters)
        with torch.no_grad():
            for p, g, k in zip(params, grads, scale):
                if g is not None:
                    p.sub_((lr if k is None else lr * k) * torch.sign(g))
        m1.clamp_()
        m2.clamp_()


def _expert_out(x, w1, w2, inter: int, act: Callable) -> torch.Tensor:
    """x [E, n, H], w1 [E, 2I, H], w2 [E, H, I] -> [E, n, H]."""
    a = torch.bmm(x, w1.transpose(1, 2))
    return torch.bmm(act(a[..., :inter]) * a[..., inter:], w2.transpose(1, 2))


def signround_experts(w1: torch.Tensor, w2: torch.Tensor, xs: list[torch.Tensor], bits: list[Width], group_size: int,
                      act: Callable, cfg: SignRoundConfig = SignRoundConfig(),
                      rs: list[torch.Tensor] | None = None
                      ) -> list[tuple[QuantizedMatrix, QuantizedMatrix, float, float]]:
    """Learned rounding for E experts: w1 [E, 2I, H], w2 [E, H, I], xs their routed inputs (each [n_e, H],
    n_e >= 1). Returns per expert (q1, q2, output error of the result, output error of the start), the errors
    relative (||Y' - Y|| / ||Y||) on all of the expert's routed tokens."""
    dev = w1.device
    e_count, inter = w1.shape[0], w2.shape[-1]
    b1, b2 = _per_matrix(bits)
    m1 = _Learned(w1, torch.tensor(b1, device=dev), group_size, cfg.v_range)
    m2 = _Learned(w2, torch.tensor(b2, device=dev), group_size, cfg.v_range)
    w1f, w2f = w1.float(), w2.float()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    def full_errors(q1, q2) -> list[float]:
        out = []
        with torch.no_grad():
            for e, x in enumerate(xs):
                def sq(rows, e=e, x=x):  # [2]: squared error and squared reference norm of these rows
                    ref = _expert_out(x[rows][None], w1f[e:e + 1], w2f[e:e + 1], inter, act)
                    got = _expert_out(x[rows][None], q1[e:e + 1], q2[e:e + 1], inter, act)
                    return torch.stack([((got - ref) ** 2).sum(), (ref ** 2).sum()])[None]
                err, ref = in_row_chunks(x.shape[0], x.device, sq).sum(0)
                out.append(float(err.sqrt() / ref.sqrt().clamp_min(1e-12)))
        return out

    def loss_of(q1, q2):
        idx = torch.stack([torch.randint(0, x.shape[0], (cfg.batch_tokens,), generator=gen, device=dev) for x in xs])
        xb = torch.stack([x[i] for x, i in zip(xs, idx)])  # [E, B, H]
        with torch.no_grad():
            ref = _expert_out(xb, w1f, w2f, inter, act)
        sq = (_expert_out(xb, q1, q2, inter, act) - ref) ** 2
        if cfg.routing_weighted and rs is not None:
            sq = sq * torch.stack([r[i] for r, i in zip(rs, idx)])[..., None] ** 2
        return sq.sum()

    start = [m1.export(), m2.export()]
    _descend(m1, m2, loss_of, cfg)
    learned = [m1.export(), m2.export()]
    err_new = full_errors(m1.dequantize(learned[0]), m2.dequantize(learned[1]))
    err_old = full_errors(m1.dequantize(start[0]), m2.dequantize(start[1]))
    out = []
    for e in range(e_count):
        pick = learned if err_new[e] <= err_old[e] else start
        q1 = QuantizedMatrix(b1[e], group_size, *(t[e] for t in pick[0]))
        q2 = QuantizedMatrix(b2[e], group_size, *(t[e] for t in pick[1]))
        out.append((q1, q2, min(err_new[e], err_old[e]), err_old[e]))
    return out


def routed_sum(x: torch.Tensor, idx: torch.Tensor, rw: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               act: Callable) -> torch.Tensor:
    """sum_j rw_j E_j(x) per token: x [n, H], idx/rw [n, k] (an index of -1 is a slot outside this call),
    w1 [E, 2I, H], w2 [E, H, I] -> [n, H]. The (token, expert) pairs are dispatched into one padded
    [E, m, H] batch: one batched product per matrix, differentiable in w1 and w2."""
    dev, (n, k), e_count = x.device, idx.shape, w1.shape[0]
    tok = torch.arange(n, device=dev).repeat_interleave(k)
    exp, wt = idx.reshape(-1), rw.reshape(-1)
    valid = exp >= 0
    tok, exp, wt = tok[valid], exp[valid], wt[valid]
    order = torch.argsort(exp, stable=True)
    tok, exp, wt = tok[order], exp[order], wt[order]
    counts = torch.bincount(exp, minlength=e_count)
    pos = torch.arange(len(exp), device=dev) - (torch.cumsum(counts, 0) - counts)[exp]
    xp = x.new_zeros(e_count, int(counts.max()) if len(exp) else 0, x.shape[1])
    xp[exp, pos] = x[tok]
    y = _expert_out(xp, w1, w2, w2.shape[-1], act)[exp, pos] * wt[:, None]
    return x.new_zeros(n, x.shape[1]).index_add(0, tok, y)


def in_row_chunks(n: int, dev, fn, rows_per: int = 4096) -> torch.Tensor:
    return torch.cat([fn(rows) for rows in torch.arange(n, device=dev).split(rows_per)])


def signround_layer(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, rw: torch.Tensor,
                    delta: torch.Tensor | None, bits: list[Width], group_size: int, act: Callable,
                    cfg: SignRoundConfig = SignRoundConfig()) -> tuple[list[tuple[QuantizedMatrix, QuantizedMatrix]], dict]:
    """Learned rounding for E experts of one MoE layer on the layer's own output.

    x [N, H] the tokens entering the experts, idx/rw [N, k] their routing (-1: an expert outside this call,
    see `quantize_layer`'s chunks); the loss of a token is ||sum_j rw_j (E_j'(x) - E_j(x)) - delta||^2: the
    change the quantized experts make to the layer's output, against `delta` [N, H] (the float model's layer
    output minus this model's with float experts: the error the layers before introduced, which the experts
    then also learn to offset) or zero. Each step draws about `batch_tokens` tokens per expert. Experts no
    token reaches keep the start. Returns the matrices and {"loss_start", "loss_learned"} (mean squared,
    over every token)."""
    dev = w1.device
    e_count = w1.shape[0]
    n = idx.shape[0]
    b1, b2 = _per_matrix(bits)
    m1 = _Learned(w1, torch.tensor(b1, device=dev), group_size, cfg.v_range)
    m2 = _Learned(w2, torch.tensor(b2, device=dev), group_size, cfg.v_range)
    w1f, w2f = w1.float(), w2.float()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    hits = max(float((idx >= 0).sum()) / max(n, 1), 1.0)  # routed slots per token in this call
    per_step = max(1, min(n, int(cfg.batch_tokens * e_count / hits)))

    # the target of every token, once: the float experts' routed sum plus delta
    with torch.no_grad():
        target = in_row_chunks(n, dev, lambda r: routed_sum(x[r], idx[r], rw[r], w1f, w2f, act))
        if delta is not None:
            target += delta

    def full_loss(q1, q2) -> float:
        with torch.no_grad():
            return float(in_row_chunks(n, dev, lambda r: ((routed_sum(x[r], idx[r], rw[r], q1, q2, act) - target[r]) ** 2)
                                    .sum(-1)).sum()) / max(n, 1)

    def loss_of(q1, q2):
        rows = torch.randint(0, n, (per_step,), generator=gen, device=dev)
        return ((routed_sum(x[rows], idx[rows], rw[rows], q1, q2, act) - target[rows]) ** 2).sum()

    start = [m1.export(), m2.export()]
    _descend(m1, m2, loss_of, cfg)
    learned = [m1.export(), m2.export()]
    loss_learned = full_loss(m1.dequantize(learned[0]), m2.dequantize(learned[1]))
    loss_start = full_loss(m1.dequantize(start[0]), m2.dequantize(start[1]))
    pick = learned if loss_learned <= loss_start else start
    mats = [(QuantizedMatrix(b1[e], group_size, *(t[e] for t in pick[0])),
             QuantizedMatrix(b2[e], group_size, *(t[e] for t in pick[1]))) for e in range(e_count)]
    return mats, {"loss_start": loss_start, "loss_learned": loss_learned}
