"""Stage "validate": the accuracy gate. The bundle, run THROUGH THE RUNTIME (mopeq_runtime, ONNX Runtime),
against the float16 original in PyTorch, on evaluation data.

Text: perplexity ratio (gate), KL(float16 || bundle), top-1 agreement. VLM: VQA exact-match retention (gate),
answer-token KL and agreement. The metric code is `evaluate.py`'s; this module only supplies runtime-backed
callables, the thresholds, the verdict and the report (+ a plot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MopeqError
from .evaluate import evaluate_text, evaluate_vqa, text_windows, torch_forward, torch_generate
from .fsutil import sha256_file

REPORT_SCHEMA = 1


@dataclass(frozen=True)
class GateConfig:
    max_ppl_ratio: float = 1.05  # text: bundle perplexity / float16 perplexity
    min_vqa_retention: float = 0.985  # VLM: bundle exact match / float16 exact match
    max_windows: int | None = 128  # text windows of 256 tokens (None: all); paired metrics converge fast
    max_samples: int | None = None  # VQA samples (None: all)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateReport:
    kind: str  # "text" | "vqa"
    passed: bool
    failures: tuple[str, ...]  # one line per failed threshold
    metrics: dict
    gate: GateConfig
    data: dict  # {"file": name, "sha256": ..., "is_calibration_data": bool}
    per_window_ppl: tuple[tuple[float, float], ...] = ()  # text: (float16, bundle) per window, for the plot

    def to_json(self) -> dict:
        d = asdict(self)
        d["per_window_ppl"] = [list(p) for p in self.per_window_ppl]
        return {"schema_version": REPORT_SCHEMA, "kind": "mopeq.validation", **d}


def _r(x: float) -> float:
    return float(f"{x:.6g}")  # fixed precision: the report is part of the byte-identical bundle


# -- runtime-backed callables (the `candidate` side of evaluate.py) -----------------------------------
def runtime_forward(model):
    """evaluate.Forward over a mopeq_runtime model: torch inputs -> torch logits [B, T, V]."""
    def fwd(inputs: dict) -> torch.Tensor:
        pv = inputs.get("pixel_values")
        logits, _ = model.forward(inputs["input_ids"].numpy(), None, None if pv is None else pv.numpy())
        return torch.from_numpy(logits)
    return fwd


def runtime_generate(model, eos_id: int):
    """evaluate.Generate over the runtime: batched greedy decoding with the KV cache, cut at EOS."""
    def gen(inputs: dict, max_new: int) -> list[list[int]]:
        ids = inputs["input_ids"].numpy()
        pv = inputs.get("pixel_values")
        logits, past = model.forward(ids, None, None if pv is None else pv.numpy())
        out = [[] for _ in range(len(ids))]
        done = np.zeros(len(ids), bool)
        for step in range(max_new):
            tok = logits[:, -1].argmax(-1)
            for i, t in enumerate(tok):
                if not done[i]:
                    done[i] = t == eos_id
                    if not done[i]:
                        out[i].append(int(t))
            if done.all() or step == max_new - 1:
                break
            logits, past = model.forward(tok[:, None].astype(np.int64), past)
        return out
    return gen


class _PerWindow:
    """Wraps a Forward to keep each window's mean next-token NLL (for the plot)."""

    def __init__(self, fwd):
        self.fwd, self.nll = fwd, []

    def __call__(self, inputs: dict) -> torch.Tensor:
        logits = self.fwd(inputs)
        ids = inputs["input_ids"]
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        self.nll += (-lp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)).tolist()
        return logits


# -- the gate -------------------------------------------------------------------------------------------
def _verdict(kind: str, m: dict, gate: GateConfig) -> tuple[str, ...]:
    if kind == "text" and m["ppl_ratio"] > gate.max_ppl_ratio:
        return (f"perplexity ratio {m['ppl_ratio']:.4f} > {gate.max_ppl_ratio} "
                f"(float16 {m['ppl_ref']:.3f}, bundle {m['ppl']:.3f})",)
    if kind == "vqa" and m["accuracy_retention"] < gate.min_vqa_retention:
        return (f"VQA retention {m['accuracy_retention']:.4f} < {gate.min_vqa_retention} "
                f"(float16 {m['accuracy_ref']:.4f}, bundle {m['accuracy']:.4f})",)
    return ()


def run_gate(ref_model, bundle_model, tokenizer, data: Path, gate: GateConfig, *, is_calibration: bool = False,
             seq_len: int = 256, progress=None) -> GateReport:
    """Compare the runtime bundle with the PyTorch float16 reference on `data`."""
    data = Path(data)
    if not data.exists():
        raise MopeqError(f"evaluation data not found: {data}")
    info = {"file": data.name, "sha256": sha256_file(data) if data.is_file() else None,
            "is_calibration_data": is_calibration}
    is_vlm = bundle_model.manifest.model.is_vlm
    if is_vlm:
        eos = tokenizer.eos_token_id
        m = evaluate_vqa(torch_forward(ref_model), runtime_forward(bundle_model), torch_generate(ref_model, eos),
                         runtime_generate(bundle_model, eos), data, tokenizer, ref_model.config,
                         max_samples=gate.max_samples).to_json()
        kind, per_window = "vqa", ()
    else:
        seq_len = min(seq_len, bundle_model.context_length)
        windows = text_windows(data, tokenizer, seq_len=seq_len, max_windows=gate.max_windows)
        ref, cand = _PerWindow(torch_forward(ref_model)), _PerWindow(runtime_forward(bundle_model))
        m = evaluate_text(ref, cand, windows, progress=progress).to_json()
        kind = "text"
        per_window = tuple((_r(np.exp(a)), _r(np.exp(b))) for a, b in zip(ref.nll, cand.nll))
    metrics = {k: (_r(v) if isinstance(v, float) else v) for k, v in m.items()}
    failures = _verdict(kind, metrics, gate)
    return GateReport(kind, not failures, failures, metrics, gate, info, per_window)


def plot_report(report: GateReport, path: Path) -> None:
    """Text: per-window perplexity, float16 vs bundle. VQA: exact match per task. Deterministic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    if report.kind == "text":
        ref, got = np.array(report.per_window_ppl).T
        ax.scatter(ref, got, s=8)
        lim = [min(ref.min(), got.min()), max(ref.max(), got.max())]
        ax.plot(lim, lim, "k--", lw=0.8, label="equal")
        ax.plot(lim, [x * report.gate.max_ppl_ratio for x in lim], "r:", lw=0.8,
                label=f"gate x{report.gate.max_ppl_ratio}")
        ax.set_xlabel("float16 perplexity (window)")
        ax.set_ylabel("bundle perplexity (window)")
        ax.set_title(f"ratio {report.metrics['ppl_ratio']:.4f}, KL {report.metrics['kl']:.4f}")
        ax.legend()
    else:
        tasks = sorted(report.metrics["per_task"])
        x = np.arange(len(tasks))
        ax.bar(x - 0.2, [report.metrics["per_task"][t]["ref"] for t in tasks], 0.4, label="float16")
        ax.bar(x + 0.2, [report.metrics["per_task"][t]["quant"] for t in tasks], 0.4, label="bundle")
        ax.set_xticks(x, tasks)
        ax.set_ylabel("exact match")
        ax.set_title(f"retention {report.metrics['accuracy_retention']:.4f}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})  # no version string: same bytes on every build
    plt.close(fig)
