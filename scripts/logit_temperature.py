"""Diagnostic: a QDIR's held-out perplexity ratio and KL to float16 when its logits are scaled by a temperature.

    python scripts/logit_temperature.py QDIR [--model ../shared/models/text-moe] [--eval evaluation_data/text_eval.txt]

Shows how far the perplexity ratio moves with the logits' scale alone (docs/RESULTS.md "Seventh session"). The
sums are evaluate.py's (`_Acc`), the windows the build gate's first 128.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mopeq_export.evaluate import _Acc, text_windows
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.quantization.loader import load_quantized

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURES = (0.9, 0.95, 1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("qdir")
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/text-moe"))
    ap.add_argument("--eval", default=str(ROOT / "evaluation_data/text_eval.txt"))
    ap.add_argument("--windows", type=int, default=128)
    a = ap.parse_args()
    ref, _ = load_model(a.model, device=torch.device("cpu"), dtype=torch.float32)
    cand = load_quantized(a.qdir, a.model, device=torch.device("cpu"), dtype=torch.float32)
    windows = text_windows(a.eval, load_tokenizer(a.model), max_windows=a.windows)
    accs = {t: _Acc() for t in TEMPERATURES}
    with torch.no_grad():
        for batch in windows.split(8):
            targets = torch.cat([batch[:, 1:], torch.full((batch.shape[0], 1), -100)], 1)
            lr, lq = ref(input_ids=batch).logits.float(), cand(input_ids=batch).logits.float()
            for t, acc in accs.items():
                acc.add(lr, lq * t, targets)
    for t, acc in accs.items():
        print(f"t={t:<5} ppl ratio {np.exp((acc.nll - acc.nll_ref) / acc.n):.4f}  KL {acc.kl / acc.n:.5f}")


if __name__ == "__main__":
    main()
