"""Runtime perplexity of a bundle vs the PyTorch quantized model (`load_quantized`) it was exported from.

    python scripts/check_bundle_ppl.py B --data ../shared/data/text_dev.txt [--quantized QDIR] [--windows N]

Both sides see the same token windows (the bundle's tokenizer, 256 tokens each). Without --quantized the
QDIR is found in the build cache: the quantize stage whose plan and source weights match the bundle's.
Prints a table: PyTorch quantized vs bundle through mopeq_runtime, and their ratio (target: within 0.5%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def find_qdir(manifest, cache: Path) -> Path:
    for rec in sorted(cache.glob("quantize-*/qdir/quantized.json")):
        q = json.loads(rec.read_text())
        bits = {e["name"]: e["bits"] for e in q["experts"]}
        if q["model"]["weights_sha256"] == manifest.model.weights_sha256 and bits == manifest.plan["experts"]:
            return rec.parent
    sys.exit(f"no quantized checkpoint for this bundle in {cache}; pass --quantized QDIR")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--quantized", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MOPEQ_CACHE") or
                                                           Path.home() / ".cache" / "mopeq-export"))
    ap.add_argument("--windows", type=int, default=0, help="0 = every full window of the file")
    ap.add_argument("--no-kernel", action="store_true", help="run the function-body fallback instead")
    args = ap.parse_args()

    import torch

    import mopeq_runtime
    from mopeq_export.evaluate import evaluate_text, torch_forward
    from mopeq_export.quantization.loader import load_quantized
    from mopeq_export.validate import runtime_forward

    bundle = mopeq_runtime.load(args.bundle, allow_foreign_target=True, use_kernel=not args.no_kernel)
    qdir = args.quantized or find_qdir(bundle.manifest, args.cache)
    ref = load_quantized(qdir)
    ids = bundle.tokenizer.encode(args.data.read_text(encoding="utf-8"))
    n = len(ids) // 256 if not args.windows else min(args.windows, len(ids) // 256)
    windows = torch.tensor(ids[: n * 256]).view(n, 256)
    t0 = time.time()
    m = evaluate_text(torch_forward(ref), runtime_forward(bundle), windows)
    print(f"bundle {args.bundle} ({bundle.manifest.target.name}, {bundle.act_dtype}, kernel: {bundle.kernel.used}); "
          f"{m.windows} windows x 256 = {m.tokens} predicted tokens of {args.data.name}; {time.time() - t0:.0f} s")
    print(f"| model | perplexity |\n|---|---|\n| PyTorch load_quantized ({qdir.name}) | {m.ppl_ref:.4f} |\n"
          f"| bundle via mopeq_runtime | {m.ppl:.4f} |\n| ratio bundle / PyTorch | {m.ppl_ratio:.6f} "
          f"({(m.ppl_ratio - 1) * 100:+.3f}%) |\n| KL(PyTorch || bundle) | {m.kl:.2e} |\n"
          f"| top-1 agreement | {m.top1_agreement:.5f} |")
    sys.exit(0 if abs(m.ppl_ratio - 1) <= 0.005 else 1)


if __name__ == "__main__":
    main()
