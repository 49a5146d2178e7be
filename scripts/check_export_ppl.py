"""Perplexity of an exported text model through ONNX Runtime vs the PyTorch quantized model, same windows.

    python scripts/check_export_ppl.py --quantized QDIR --export ODIR [--data ../shared/data/text_dev.txt]
                                       [--no-kernel] [--max-windows N]

Windows of 256 tokens, next-token cross-entropy, exp of the mean (the project's convention). Prints both
perplexities, their ratio, mean KL and top-1 agreement of ORT against PyTorch. The export is "done" when
|ratio - 1| < 0.2%.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mopeq_export.evaluate import evaluate_text, text_windows, torch_forward
from mopeq_export.models.loading import load_tokenizer
from mopeq_export.quantization.checkpoint import read_checkpoint
from mopeq_export.quantization.loader import load_quantized
from mopeq_exporters.ort_check import Exported

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text_dev.txt"


def ort_forward(ex: Exported):
    def fwd(inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"].numpy()
        logits, _ = ex.step(ids, ex.empty_past(ids.shape[0]))
        return torch.from_numpy(np.asarray(logits, np.float32))
    return fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--no-kernel", action="store_true", help="run the function bodies (stock ORT)")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = read_checkpoint(args.quantized)
    model = load_quantized(args.quantized)
    windows = text_windows(args.data, load_tokenizer(ckpt.model.path), max_windows=args.max_windows)
    ex = Exported(args.export, kernel=not args.no_kernel, threads=args.threads)
    t0 = time.time()
    m = evaluate_text(torch_forward(model), ort_forward(ex), windows)
    path = "function bodies" if args.no_kernel else "kernel"
    print(f"{args.data.name}: {m.windows} windows, {m.tokens} tokens, ORT path: {path}, {time.time() - t0:.0f} s")
    print(f"| PyTorch load_quantized ppl | ORT ppl | ratio | mean KL | top-1 agree |")
    print(f"|---|---|---|---|---|")
    print(f"| {m.ppl_ref:.4f} | {m.ppl:.4f} | {m.ppl_ratio:.6f} | {m.kl:.2e} | {m.top1_agreement:.5f} |")
    ok = abs(m.ppl_ratio - 1) < 0.002
    print("within 0.2%" if ok else "NOT within 0.2%")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
