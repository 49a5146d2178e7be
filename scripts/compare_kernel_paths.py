"""Held-out perplexity of one bundle through the runtime under several kernel paths (MOPEQ_KERNEL), same windows.

    python scripts/compare_kernel_paths.py BUNDLE [--data ../shared/data/text_dev.txt] [--windows 0]
        [--paths auto,scalar] [--kernel-library runtime/mopeq_runtime/lib/libmopeq_ops.so]

The first path is compared with the second (the integer path against the exact float-activation path by
default): the issue's bar is a perplexity move of at most 0.2 %. Windows of 256 tokens of the bundle's own
tokenizer, each one forward pass (prefill), so the prefill tiles of the kernel are what runs. --kernel-library
runs a freshly built library instead of the bundle's copy (kernel development).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import mopeq_runtime

SHARED = Path(__file__).resolve().parents[2] / "shared"
WINDOW = 256


def perplexity(model, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits, _ = model.forward(np.array([w]))
        z = logits[0, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    return float(np.exp(nll / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "text_dev.txt")
    ap.add_argument("--windows", type=int, default=0, help="first N windows (0 = all)")
    ap.add_argument("--paths", default="auto,scalar")
    ap.add_argument("--kernel-library", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = mopeq_runtime.load(args.bundle, threads=args.threads, kernel_library=args.kernel_library,
                               require_kernel=True)
    ids = model.tokenizer.encode(args.data.read_text())
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    windows = windows[:args.windows] if args.windows else windows
    rows = []
    for path in args.paths.split(","):
        os.environ["MOPEQ_KERNEL"] = path  # the kernel reads it on every call
        t0 = time.perf_counter()
        rows.append((path, perplexity(model, windows), time.perf_counter() - t0))
    base = rows[1][1] if len(rows) > 1 else rows[0][1]
    print(f"{args.bundle.name}: {len(windows)} windows of {WINDOW} tokens of {args.data.name}")
    print("| kernel path | perplexity | vs " + (rows[1][0] if len(rows) > 1 else rows[0][0]) + " | seconds |")
    print("|---|---|---|---|")
    for path, ppl, sec in rows:
        print(f"| {path} | {ppl:.6f} | {ppl / base - 1:+.4%} | {sec:.0f} |")


if __name__ == "__main__":
    main()
