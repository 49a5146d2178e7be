#!/usr/bin/env python
"""Predictor validation: how well does each per-(expert, width) sensitivity predictor rank the TRUE loss
increase of quantizing one routed expert alone? (issue "Quality per byte").

Truth (held-out text only, evaluation_data/text_eval.txt): for every routed expert e and width b, quantize
only e with RTN (group 32, the clipping search of quantization.primitives.rtn, i.e. exactly the
quantization whose error `analyze` records; or, with --truth-quantizer signround, the build's learned
rounding of e alone on its layer's output), measure on W fixed windows of 256 tokens (float32, --device)
two truths: the mean next-token KL(float || quantized), and the mean next-token NLL minus the float
model's; restore e. (The NLL increase of one expert is mostly noise: it has a first-order term of either
sign; the KL is second order and what the Gauss-Newton predictors estimate.) Decoder-layer inputs of the float model are
cached per batch, so an expert of layer L re-runs layers L.. only (checked against a full forward).

Predictors (all from the sensitivity report or from CALIBRATION data; never the held-out text):
  trace_x_err    Tr(H_e)/n_e * err_e(b): the per-expert term of allocation._predicted_loss (budget plan)
  trace_x_werr   Tr(H_e) * mean_e' err_e'(b)/n_e': the width's model-mean RTN error per weight in place of
                 the expert's own (added after the first two runs: within a width `trace` alone ranked better
                 than trace_x_err there; validated on --window-offset windows and on the in-context truth)
  trace          Tr(H_e) alone (what kmeans clusters)
  freq_x_err     routing frequency * err_e(b)
  frequency      routing frequency alone
  wnorm_x_err    weight_norm_trace * err_e(b) (the data-free MoPEQ-code signal times the error)
  err            ||W_e - Q_b(W_e)||_F^2 alone
  gn_output      NEW (chosen before any measurement as THE new predictor): 0.5 * d^T G d, d the exact
                 perturbation of the MoE block output that quantizing e causes on its routed calibration
                 tokens (router weight g_t times f_q(x_t) - f(x_t)), G the Gauss-Newton matrix of the mean
                 calibration cross-entropy w.r.t. the experts' output at that layer (all tokens, cross-token
                 terms included), estimated with Rademacher probes in logit space:
                 d^T G d = E_u (v_u . d)^2, v_u = J^T A u / sqrt(N) (one backward per probe for every
                 expert and width at once).
  variants of it, reported for the record:
  out_err        sum_t g_t^2 ||f_q(x_t) - f(x_t)||^2 / N (output error, no downstream weighting)
  out_err_gniso  sum_t g_t^2 ||df_t||^2 * Tr(G_tt)/H (per-token isotropic downstream weight)
  gn_tokdiag     0.5 * sum_t (v_t . d_t)^2 (G's per-token diagonal blocks only)
  taylor2        grad^T d + 0.5 d^T G d (first-order term from the true calibration loss gradient)

In-context truth (on unless --no-context): what the budget knapsack actually trades. For each pair of
adjacent widths lo < hi, every expert is set to lo (the truth quantizer's weights), the decoder-layer inputs
of that quantized model are cached, and each expert alone is raised to hi: its measured gain is
KL(all at lo) - KL(all at lo, e at hi) on the same windows. A predictor's marginal pred(lo) - pred(hi)
(or its value, for the width-independent ones) is ranked against that gain.

Statistics: Spearman and Kendall (tau-b) of each predictor against the measured increase, per width and
pooled over widths, with bootstrap 95% intervals (resampling experts AND held-out windows jointly; the
windows-only interval is in the JSON). Noise: a no-op "quantization" (weights re-written unchanged),
the per-expert standard error over windows, and the split-half (even/odd windows) rank reliability of the
measurement itself, the ceiling any predictor can reach.

    python scripts/bench_predictor.py --sens S --windows 128 --bits 2,3,4 --device cuda --out docs/predictor.json

The JSON also holds every expert's prediction at every width ("predictions"), which
scripts/compare_allocations.py --predictions turns into budget plans.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from mopeq_export.calibration import labelled_predictions, load_calibration, model_inputs, to_device
from mopeq_export.evaluate import text_windows
from mopeq_export.models.adapters import decoder_stack, find_moe_layers
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.quantization.primitives import rtn
from mopeq_export.sensitivity import load_report

PRIMARY_NEW = "gn_output"
ORDER = ["trace_x_err", "trace_x_werr", "trace", "freq_x_err", "frequency", "wnorm_x_err", "err",
         "gn_output", "out_err", "out_err_gniso", "gn_tokdiag", "taylor2"]


# -- model pieces -----------------------------------------------------------------------------------
def expert_fn(layer, x, w1, w2):
    i = layer.intermediate_size
    h = x @ w1.t()
    return (layer.act(h[:, :i]) * h[:, i:]) @ w2.t()


class Cached:
    """Float model's decoder-layer inputs (and the layers' other arguments) per held-out batch.

    ref_logp: the reference log-probabilities per batch for the KL truth; None, the default, takes this
    model's own (the float model's when `model` is float)."""

    def __init__(self, model, windows: torch.Tensor, batch: int, ref_logp: list[torch.Tensor] | None = None):
        self.model = model
        own = ref_logp is None
        self.ref_logp = [] if own else ref_logp  # log-probabilities per batch (float16)
        _, self.stack = decoder_stack(model)
        self.batches = list(windows.split(batch))
        self.inputs, self.kwargs = [], []
        for ids in self.batches:
            got, kw = [], {}

            def pre(_m, args, kwargs):
                got.append(args[0] if args else kwargs["hidden_states"])
                if not kw:
                    kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

            hs = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in self.stack]
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
            finally:
                for h in hs:
                    h.remove()
            self.inputs.append([g.detach() for g in got])
            self.kwargs.append(kw)
            if own:
                self.ref_logp.append(torch.log_softmax(logits[:, :-1].float(), -1).half())
        self.base, self.base_kl = self.nll_from(0)

    def head(self, h):
        return self.model.lm_head(self.model.model.norm(h))

    @staticmethod
    def window_nll(logits, ids):
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)  # [B] mean NLL per window

    @torch.no_grad()
    def nll_from(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Per window: mean next-token NLL, and mean KL(float || this model) over its positions."""
        nll, kl = [], []
        for ids, hs, kw, ref in zip(self.batches, self.inputs, self.kwargs, self.ref_logp):
            h = hs[start]
            for layer in self.stack[start:]:
                h = layer(h, **kw)
                h = h[0] if isinstance(h, tuple) else h
            logits = self.head(h)
            nll.append(self.window_nll(logits, ids))
            lq, lr = torch.log_softmax(logits[:, :-1].float(), -1), ref.float()
            kl.append((lr.exp() * (lr - lq)).sum(-1).double().mean(-1))
        return torch.cat(nll).cpu().numpy(), torch.cat(kl).cpu().numpy()

    @torch.no_grad()
    def nll_full(self) -> np.ndarray:
        return torch.cat([self.window_nll(self.model(input_ids=ids, use_cache=False).logits, ids)
                          for ids in self.batches]).cpu().numpy()


def signround_alone(model, layers, tok, a, bits) -> dict[int, list]:
    """The signround truth's weights: every expert e at every width b learned ALONE (the rest of the model
    float) by the build's learned rounding on its layer's output, on the float model's routed calibration
    tokens of its layer (--truth-samples windows of the calibration text, as the build's quantize stage reads
    them); the target is the float layer output, so delta is zero."""
    from mopeq_export.quantization.pipeline import Routed
    from mopeq_export.quantization.signround import SignRoundConfig, signround_experts

    calib = load_calibration(a.calib, tok, model.config, samples=a.truth_samples, seq_len=256)
    got = {li: ([], [], []) for li in range(len(layers))}
    hooks = []
    for li, layer in enumerate(layers):
        def hook(x, idx, w, li=li):
            got[li][0].append(x.detach().reshape(-1, x.shape[-1]).float())
            got[li][1].append(idx.detach().reshape(got[li][0][-1].shape[0], -1))
            got[li][2].append(w.detach().reshape(got[li][0][-1].shape[0], -1).float())
        hooks.append(layer.register_routing_hook(hook))
    try:
        with torch.no_grad():
            for batch in calib.batches:  # full windows: no padding to drop
                model(**{k: v.to(a.device) for k, v in model_inputs(batch).items()}, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # one expert alone in its layer on the layer's output: the loss of a token is ||g_t (E'(x_t) - E(x_t))||^2,
    # the expert-scope objective with routing weights, so the experts of a layer learn in one batched call
    # (independently: each one's loss involves only itself)
    cfg = SignRoundConfig(scope="expert", routing_weighted=True)
    out = {b: [] for b in bits}
    for li, layer in enumerate(layers):
        r = Routed(*(torch.cat(t) for t in got[li]))
        w1 = torch.stack([layer.get_w1(e) for e in range(layer.num_experts)])
        w2 = torch.stack([layer.get_w2(e) for e in range(layer.num_experts)])
        inputs = [r.of(e) for e in range(layer.num_experts)]
        live = [e for e, (x, _) in enumerate(inputs) if x.shape[0]]
        for b in bits:
            done = dict(zip(live, signround_experts(w1[live], w2[live], [inputs[e][0] for e in live], [b] * len(live),
                                                    a.group_size, layer.act, cfg, [inputs[e][1] for e in live])))
            for e in range(layer.num_experts):
                q1, q2 = done[e][:2] if e in done else (rtn(w1[e], b, a.group_size), rtn(w2[e], b, a.group_size))
                out[b].append((q1.dequantize().to(a.device), q2.dequantize().to(a.device)))
    return out


# -- predictors from calibration data -----------------------------------------------------------------
def calibration_predictors(model, layers, calib, quantized, probes_per_batch: int, seed: int):
    """Accumulate the output-perturbation predictors over the calibration batches (see module docstring)."""
    n_e = sum(layer.num_experts for layer in layers)
    keys = ("out_err", "out_err_gniso", "gn_tokdiag", "dGd", "first")
    acc = {k: {b: np.zeros(n_e) for b in quantized} for k in keys}
    gen = torch.Generator().manual_seed(seed)
    total_preds = 0
    nb = len(calib.batches)
    dev = next(model.parameters()).device
    for batch in calib.batches:
        batch = to_device(batch, dev)
        routed, zs = {}, []

        def route_cb(li):
            def cb(hidden, idx, w):
                routed[li] = (hidden.detach().reshape(-1, hidden.shape[-1]), idx.detach(), w.detach().float())
            return cb

        def out_hook(_m, _a, out):
            z = torch.zeros_like(out, requires_grad=True)
            zs.append(z)
            return out + z

        hooks = [layer.register_routing_hook(route_cb(li)) for li, layer in enumerate(layers)]
        hooks += [layer.experts.register_forward_hook(out_hook) for layer in layers]
        try:
            with torch.enable_grad():
                logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
        finally:
            for h in hooks:
                h.remove()
        keep = labelled_predictions(batch)
        lab_logits, labels = logits[keep], batch["labels"][:, 1:][keep]
        n = lab_logits.shape[0]
        total_preds += n
        loss = torch.nn.functional.cross_entropy(lab_logits, labels)
        grads = [g.detach() for g in torch.autograd.grad(loss, zs, retain_graph=True)]
        p = lab_logits.detach().double().softmax(-1)
        vs = []
        for _ in range(probes_per_batch):
            u = (torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1).to(dev)
            sp = p.sqrt()
            w = ((sp * u - p * (sp * u).sum(-1, keepdim=True)) / math.sqrt(n)).float()
            vs.append([v.detach() for v in torch.autograd.grad(lab_logits, zs, grad_outputs=w, retain_graph=True)])
        del logits, lab_logits, loss
        i0 = 0
        for li, layer in enumerate(layers):
            hidden, idx, wts = routed[li]
            H = hidden.shape[-1]
            vl = torch.stack([v[li] for v in vs])  # [P, T, H]
            gtr = (vl ** 2).sum(-1).mean(0)  # [T] estimate of Tr(G_tt)
            for e in range(layer.num_experts):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                x, g = hidden[tok].float(), wts[tok, slot][:, None]
                with torch.no_grad():
                    f = expert_fn(layer, x, layer.get_w1(e), layer.get_w2(e))
                    for b, q in quantized.items():
                        w1q, w2q = q[i0 + e]
                        d = (expert_fn(layer, x, w1q, w2q) - f) * g  # [n_t, H] block-output perturbation
                        d2 = (d ** 2).sum(-1)
                        acc["out_err"][b][i0 + e] += float(d2.sum()) / nb
                        acc["out_err_gniso"][b][i0 + e] += float((d2 * gtr[tok]).sum()) / H / nb
                        proj = (vl[:, tok] * d[None]).sum(-1)  # [P, n_t]
                        acc["gn_tokdiag"][b][i0 + e] += float((proj ** 2).sum(-1).mean()) / nb
                        acc["dGd"][b][i0 + e] += float((proj.sum(-1) ** 2).mean()) / nb
                        acc["first"][b][i0 + e] += float((grads[li][tok] * d).sum()) / nb
            i0 += layer.num_experts
    out = {b: {} for b in quantized}
    for b in quantized:
        out[b]["gn_output"] = 0.5 * acc["dGd"][b]
        out[b]["out_err"] = acc["out_err"][b] / (total_preds / nb)  # per predicted token, like the loss
        out[b]["out_err_gniso"] = acc["out_err_gniso"][b]
        out[b]["gn_tokdiag"] = 0.5 * acc["gn_tokdiag"][b]
        out[b]["taylor2"] = acc["first"][b] + 0.5 * acc["dGd"][b]
        out[b]["first_order"] = acc["first"][b]
    return out


# -- statistics -------------------------------------------------------------------------------------
def corr(x, y):
    s = spearmanr(x, y).statistic
    k = kendalltau(x, y).statistic
    return float(s), float(k)


def bootstrap(pred, per_window, rng, reps: int, experts: bool):
    """pred [N], per_window [N, W] loss increases -> (spearman CI, kendall CI)."""
    n, w = per_window.shape
    ss, ks = [], []
    for _ in range(reps):
        cols = rng.integers(0, w, w)
        rows = rng.integers(0, n, n) if experts else np.arange(n)
        y = per_window[rows][:, cols].mean(1)
        s, k = corr(pred[rows], y)
        ss.append(s)
        ks.append(k)
    q = lambda a: [float(np.nanpercentile(a, 2.5)), float(np.nanpercentile(a, 97.5))]  # noqa: E731
    return q(ss), q(ks)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="../shared/models/text-moe")
    ap.add_argument("--sens", default="/tmp/pred/sens/sensitivity.json")
    ap.add_argument("--calib", default="../shared/data/text_calib.txt")
    ap.add_argument("--eval", default="evaluation_data/text_eval.txt")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window-offset", type=int, default=0,
                    help="shift every held-out window index by this much (1..3 at 128 windows: a disjoint set)")
    ap.add_argument("--no-context", dest="context", action="store_false",
                    help="skip the in-context truth (every expert at lo, one raised to hi)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--probes-per-batch", type=int, default=8)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    ap.add_argument("--truth-budget", type=float, default=None, help="stop measuring after this many seconds")
    ap.add_argument("--limit", type=int, default=None, help="only the first N experts (smoke test)")
    ap.add_argument("--truth-quantizer", default="rtn", choices=("rtn", "signround"),
                    help="how the measured expert is quantized: rtn (what the report's err_e(b) measures) or "
                         "signround (the build's learned rounding, alone in its layer on the layer's output)")
    ap.add_argument("--truth-samples", type=int, default=128, help="signround truth: calibration windows")
    ap.add_argument("--out", default="docs/predictor.json")
    ap.add_argument("--restats", action="store_true", help="recompute only the statistics from OUT.state.pkl")
    a = ap.parse_args()
    if a.restats:
        import pickle
        state = pickle.loads(Path(a.out + ".state.pkl").read_bytes())
        return stats(a, load_report(a.sens), state, sorted(state["preds"]), ORDER, time.perf_counter())
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bits = [int(b) for b in a.bits.split(",")]

    report = load_report(a.sens)
    model, _ = load_model(a.model, dtype=torch.float32, device=a.device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(a.model)
    layers = find_moe_layers(model)
    names = [n for layer in layers for n in layer.expert_names]
    recs = {e.name: e for e in report.experts}
    assert [r for r in names if r not in recs] == [], "sensitivity report is for another model"
    experts = [recs[n] for n in names]

    # quantized weights, once (the same RTN the report's err_e(b) measures)
    quantized = {b: [] for b in bits}
    err_check = []
    for layer in layers:  # one batched RTN call per layer, matrix and width ([E, rows, K], as analyze does)
        w1 = torch.stack([layer.get_w1(e) for e in range(layer.num_experts)])
        w2 = torch.stack([layer.get_w2(e) for e in range(layer.num_experts)])
        for b in bits:
            q1, q2 = rtn(w1, b, a.group_size).dequantize(), rtn(w2, b, a.group_size).dequantize()
            for e in range(layer.num_experts):
                quantized[b].append((q1[e], q2[e]))
                err = float(((q1[e] - w1[e]) ** 2).sum(dtype=torch.float64) + ((q2[e] - w2[e]) ** 2).sum(dtype=torch.float64))
                rep = recs[layer.expert_name(e)].quant_error[b]
                err_check.append(abs(err - rep) / max(rep, 1e-30))
    print(f"[{time.perf_counter() - t0:.0f}s] quantized {len(names)} experts x {bits}: max rel. diff to the report's err_e(b) {max(err_check):.2e}")

    # held-out windows, spread evenly over the file (fixed by --windows only)
    allw = text_windows(a.eval, tok, 256)
    pick = np.unique(np.clip(np.linspace(0, len(allw) - 1, a.windows).round().astype(int) + a.window_offset,
                             0, len(allw) - 1))
    windows = allw[pick].to(a.device)
    t1 = time.perf_counter()
    cache = Cached(model, windows, a.batch)
    base = cache.base
    print(f"float NLL {base.mean():.4f} on {len(windows)} windows x 256 (of {len(allw)}); cache {time.perf_counter() - t1:.1f}s")

    # checks: the cached path equals a full forward; a no-op rewrite changes nothing
    L0 = layers[1]
    e0 = 0
    w1, w2 = L0.get_w1(e0), L0.get_w2(e0)
    L0.set_weights(e0, *quantized[bits[0]][16 + e0])
    start = L0.layer
    cached_nll, full_nll = cache.nll_from(start)[0], cache.nll_full()
    L0.set_weights(e0, w1, w2)
    check_full = float(np.abs(cached_nll - full_nll).max())
    noop = []
    for li in (len(layers) - 1,):
        L = layers[li]
        L.set_weights(3, L.get_w1(3), L.get_w2(3))
        noop.append(float(np.abs(cache.nll_from(L.layer)[0] - base).max()))
    print(f"cached-vs-full max |dNLL| {check_full:.2e}; no-op max |dNLL| {max(noop):.2e}")

    # calibration-side predictors
    t3 = time.perf_counter()
    info = report.calibration
    calib = load_calibration(a.calib, tok, model.config, samples=info.samples - info.coverage_samples, seq_len=info.seq_len,
                             batch_size=report.estimator.batch_size)
    new = calibration_predictors(model, layers, calib, quantized, a.probes_per_batch, seed=0)
    t_pred = time.perf_counter() - t3

    print(f"[{time.perf_counter() - t0:.0f}s] calibration predictors done", flush=True)

    # truth
    t2 = time.perf_counter()
    truth_q = quantized
    if a.truth_quantizer == "signround":
        truth_q = signround_alone(model, layers, tok, a, bits)
        print(f"[{time.perf_counter() - t0:.0f}s] learned rounding of every expert alone: "
              f"{time.perf_counter() - t2:.0f}s", flush=True)
        t2 = time.perf_counter()
    # expert-major order (expert 0 of every layer, then expert 1, ...) so a time budget leaves a sample
    # spread over all layers; the experts measured are then a prefix of this fixed order, not a choice
    offs = np.cumsum([0] + [layer.num_experts for layer in layers])
    order_idx = [int(offs[li] + e) for e in range(max(l.num_experts for l in layers))
                 for li, l in enumerate(layers) if e < l.num_experts][: a.limit or len(names)]
    per_window = {b: np.full((len(names), len(windows)), np.nan) for b in bits}
    per_window_kl = {b: np.full((len(names), len(windows)), np.nan) for b in bits}
    done = []
    for i in order_idx:
        li = int(np.searchsorted(offs, i, side="right") - 1)
        layer, e = layers[li], int(i - offs[li])
        w1, w2 = layer.get_w1(e), layer.get_w2(e)
        for b in bits:
            layer.set_weights(e, *truth_q[b][i])
            nll, kl = cache.nll_from(layer.layer)
            per_window[b][i], per_window_kl[b][i] = nll - base, kl
        layer.set_weights(e, w1, w2)
        done.append(i)
        if len(done) % 6 == 0:
            print(f"  measured {len(done)}/{len(order_idx)} experts, {time.perf_counter() - t2:.0f}s", flush=True)
        if a.truth_budget and time.perf_counter() - t2 > a.truth_budget:
            print(f"  truth budget reached after {len(done)} experts", flush=True)
            break
    done = sorted(done)
    count = len(done)
    context = {}
    if a.context and len(bits) > 1:
        t4 = time.perf_counter()
        context = context_truth(model, layers, windows, a.batch, cache, truth_q, bits, done)
        print(f"[{time.perf_counter() - t0:.0f}s] in-context truth: {time.perf_counter() - t4:.0f}s", flush=True)
    per_window = {b: per_window[b][done] for b in bits}
    per_window_kl = {b: per_window_kl[b][done] for b in bits}
    t_truth = time.perf_counter() - t2

    tr = np.array([0.0 if x.no_tokens else max(x.hessian_trace, 0.0) for x in experts])
    preds = {b: {} for b in bits}
    for b in bits:
        err = np.array([x.quant_error[b] for x in experts])
        params = np.array([x.params for x in experts], dtype=np.float64)
        preds[b]["trace_x_err"] = tr / params * err
        preds[b]["trace_x_werr"] = tr * float(np.mean(err / params))
        preds[b]["trace"] = tr
        preds[b]["freq_x_err"] = np.array([x.frequency for x in experts]) * err
        preds[b]["frequency"] = np.array([x.frequency for x in experts])
        preds[b]["wnorm_x_err"] = np.array([x.weight_norm_trace for x in experts]) * err
        preds[b]["err"] = err
        preds[b].update(new[b])
    # every expert's prediction at every width, for allocations built on a predictor
    # (scripts/compare_allocations.py --predictions)
    all_preds = {k: {str(b): preds[b][k].tolist() for b in bits} for k in ORDER}
    for b in bits:
        preds[b] = {k: v[done] for k, v in preds[b].items()}
    order = ORDER

    import pickle
    state = dict(context=context, per_window=per_window, per_window_kl=per_window_kl, all_preds=all_preds, preds=preds, base=base, check_full=check_full, noop=noop,
                 err_check=err_check, done=done, t_truth=t_truth, t_pred=t_pred, pick=pick, count=count, names=names,
                 nwin=len(windows), float_nll=float(base.mean()), t_before_stats=time.perf_counter() - t0)
    Path(a.out + ".state.pkl").write_bytes(pickle.dumps(state))
    stats(a, report, state, bits, order, time.perf_counter())


def context_truth(model, layers, windows, batch, cache, truth_q, bits, done) -> dict[str, np.ndarray]:
    """The in-context truth (module docstring): {"lo->hi": gain [measured experts, windows]}."""
    saved = [(layer.get_w1(e).clone(), layer.get_w2(e).clone()) for layer in layers for e in range(layer.num_experts)]
    where = [(layer, e) for layer in layers for e in range(layer.num_experts)]
    out = {}
    try:
        for lo, hi in zip(bits[:-1], bits[1:]):
            for i, (layer, e) in enumerate(where):
                layer.set_weights(e, *truth_q[lo][i])
            ctx = Cached(model, windows, batch, ref_logp=cache.ref_logp)  # KL against the float model
            kl0 = ctx.base_kl
            gain = np.full((len(where), len(windows)), np.nan)
            for i in done:
                layer, e = where[i]
                layer.set_weights(e, *truth_q[hi][i])
                gain[i] = kl0 - ctx.nll_from(layer.layer)[1]
                layer.set_weights(e, *truth_q[lo][i])
            out[f"{lo}->{hi}"] = gain[done]
            print(f"  context {lo}->{hi}: KL with every expert at {lo} bits {kl0.mean():.5f}", flush=True)
            del ctx
    finally:
        for (layer, e), w in zip(where, saved):
            layer.set_weights(e, *w)
    return out


def marginals(preds, bits, order) -> dict[str, dict[str, np.ndarray]]:
    """Each predictor's predicted gain of lo -> hi: pred(lo) - pred(hi), or pred itself where it does not
    depend on the width (trace, frequency: they rank experts the same at every step)."""
    out = {}
    for lo, hi in zip(bits[:-1], bits[1:]):
        out[f"{lo}->{hi}"] = {k: (preds[lo][k] if np.array_equal(preds[lo][k], preds[hi][k])
                                  else preds[lo][k] - preds[hi][k]) for k in order}
    return out


def truth_stats(per_window, preds, bits, order, boot: int, rng, fmt: str = "{}bit") -> tuple[dict, dict]:
    """Rank correlations of every predictor with one truth (per_window[b]: [experts, windows])."""
    groups = {fmt.format(b): [b] for b in bits}
    groups["pooled"] = bits
    results, noise = {}, {}
    for gname, gb in groups.items():
        pw = np.concatenate([per_window[b] for b in gb])
        y = pw.mean(1)
        se = pw.std(1, ddof=1) / math.sqrt(pw.shape[1])
        half = corr(pw[:, 0::2].mean(1), pw[:, 1::2].mean(1))[0]
        noise[gname] = {"median_delta": float(np.median(y)), "median_rel_stderr": float(np.median(se / np.abs(y))),
                        "split_half_spearman": half,
                        "spearman_brown": 2 * half / (1 + half) if half > -1 else float("nan")}
        results[gname] = {}
        for k in order:
            x = np.concatenate([preds[b][k] for b in gb])
            sp, kt = corr(x, y)
            sci, kci = bootstrap(x, pw, rng, boot, experts=True)
            swi, kwi = bootstrap(x, pw, rng, max(boot // 4, 100), experts=False)
            results[gname][k] = {"spearman": sp, "spearman_ci": sci, "kendall": kt, "kendall_ci": kci,
                                 "spearman_ci_windows_only": swi, "kendall_ci_windows_only": kwi}
    return results, noise


def markdown(results: dict, order) -> str:
    groups = list(results)
    head = "| predictor | " + " | ".join(f"{g} Spearman [95% CI] | {g} Kendall" for g in groups) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(groups))]
    for k in order:
        row = [f"`{k}`" + (" (new)" if k == PRIMARY_NEW else "")]
        for g in groups:
            r = results[g][k]
            row += [f"{r['spearman']:.3f} [{r['spearman_ci'][0]:.2f}, {r['spearman_ci'][1]:.2f}]",
                    f"{r['kendall']:.3f} [{r['kendall_ci'][0]:.2f}, {r['kendall_ci'][1]:.2f}]"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def stats(a, report, state, bits, order, t0):
    preds, count, names = state["preds"], state["count"], state["names"]
    check_full, noop, err_check = state["check_full"], state["noop"], state["err_check"]
    t_truth, t_pred, pick = state["t_truth"], state["t_pred"], state["pick"]
    info = report.calibration
    rng = np.random.default_rng(0)
    truths = {"kl": state["per_window_kl"], "nll": state["per_window"]}
    if state.get("context"):
        truths["context_kl"] = state["context"]
    titles = {"kl": "held-out KL(float || quantized)", "nll": "held-out NLL increase",
              "context_kl": "in context: held-out KL gain of raising one expert lo -> hi, every other at lo"}
    results, noise, tables = {}, {}, {}
    for name, pw in truths.items():
        if name == "context_kl":
            results[name], noise[name] = truth_stats(pw, marginals(preds, bits, order), list(pw), order,
                                                     a.boot, rng, fmt="{}")
        else:
            results[name], noise[name] = truth_stats(pw, preds, bits, order, a.boot, rng)
        tables[name] = markdown(results[name], order)
        print(f"truth: {titles[name]}")
        print(tables[name])
        for g, nz in noise[name].items():
            print(f"  {g}: median {nz['median_delta']:.2e}, median rel. stderr over windows "
                  f"{nz['median_rel_stderr']:.2f}, split-half Spearman {nz['split_half_spearman']:.3f}")
    runtime = state["t_before_stats"] + time.perf_counter() - t0
    print(f"runtime {runtime:.0f}s (truth {t_truth:.0f}s, calibration predictors {t_pred:.0f}s)")

    doc = {
        "kind": "mopeq.predictor_validation", "model": a.model, "sensitivity": a.sens,
        "sensitivity_settings": {"curvature": report.estimator.curvature, "probes": report.probes,
                                 "calib_samples": info.samples, "seq_len": info.seq_len},
        "quantization": (f"RTN (clipping search), group {a.group_size}, one expert at a time"
                         if getattr(a, "truth_quantizer", "rtn") == "rtn" else
                         f"learned rounding (SignRoundConfig defaults; one expert alone on its layer's output: the "
                         f"routing-weighted expert objective, float target), {a.truth_samples} calibration "
                         f"windows, group {a.group_size}, one expert at a time"),
        "widths": bits, "experts": count, "heldout": {"file": a.eval, "windows": state["nwin"], "seq_len": 256,
                                                       "window_indices": pick.tolist(), "float_nll": state["float_nll"]},
        "new_predictor": PRIMARY_NEW, "probes_per_batch": a.probes_per_batch, "bootstrap": a.boot,
        "checks": {"cached_vs_full_max_abs_dnll": check_full, "noop_max_abs_dnll": max(noop),
                   "err_vs_report_max_rel": max(err_check)},
        "truths": {"kl": "mean next-token KL(float || quantized) on the held-out windows",
                   "nll": "mean next-token NLL of the quantized model minus the float model's",
                   "context_kl": "in context: KL(every expert at lo) - KL(the same, this expert at hi), held out"},
        "noise": noise, "results": results, "table_markdown": tables,
        "runtime_s": {"total": round(runtime, 1), "truth": round(t_truth, 1), "predictors": round(t_pred, 1)},
        "threads": a.threads, "device": getattr(a, "device", "cpu"),
        "truth_mean_dnll": {str(b): state["per_window"][b].mean(1).tolist() for b in bits},
        "truth_mean_kl": {str(b): state["per_window_kl"][b].mean(1).tolist() for b in bits},
        "truth_context_gain": {k: v.mean(1).tolist() for k, v in (state.get("context") or {}).items()},
        "expert_names": [names[i] for i in state["done"]],
        "all_expert_names": names,
        "predictions": state["all_preds"],  # every expert (all_expert_names order) at every width
    }
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
