"""Whole-bundle size vs held-out perplexity of cpu bundles of a model, one build per average width.

    python scripts/bundle_size_table.py --model ../shared/models/text-moe --calib ../shared/data/text_calib.txt \
        --out work/sizes --cache work/cache [--bits 2.25 2.5 2.75 3.0] [--dense-bits 4|16]

Builds (one at a time, through the stage cache) `mopeq-export build --target cpu --avg-bits B` into
OUT/cpu-B, then prints a markdown table: total bytes of every file in the bundle folder (MB = 10^6 bytes),
the gate's held-out perplexity ratio to float16 (manifest validation.metrics.ppl_ratio) and the dense
widths. A build whose gate fails (default: ratio above 1.05) writes no bundle; its row gives the size the
bundle would have had and the failed ratio. A bundle already at OUT/cpu-B is measured, not rebuilt (delete it to rebuild).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.25, 2.5, 2.75, 3.0])
    ap.add_argument("--dense-bits", type=int, default=None)
    args = ap.parse_args()

    import mopeq_runtime
    from mopeq_export.pipeline import BuildConfig, GateFailed, build

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in args.bits:
        suffix = "" if args.dense_bits in (None, 4) else f"-dense{args.dense_bits}"
        out = args.out / f"cpu-{b}{suffix}"
        if not (out / "manifest.json").is_file():
            try:
                build(BuildConfig(model=args.model, target="cpu", out=out, avg_bits=b, calib=args.calib,
                                  cache=args.cache, dense_bits=args.dense_bits))
            except GateFailed as e:  # no bundle: the row gives the size it would have had and the failed ratio
                s = e.result.summary
                rows.append((b, s["bundle_bytes"], s["metrics"]["ppl_ratio"], "gate failed, no bundle"))
                continue
        m = mopeq_runtime.load(out).manifest
        dense = m.dense.widths if m.dense else "float"
        rows.append((b, bundle_bytes(out), m.validation["metrics"]["ppl_ratio"], dense))
        print(f"built {out}", flush=True)
    print("| bundle | total MB | held-out ppl ratio | dense widths |\n|---|---|---|---|")
    for b, size, ratio, dense in rows:
        print(f"| cpu, --avg-bits {b} | {size / 1e6:.3f} | x{ratio:.4f} | {dense} |")


if __name__ == "__main__":
    main()
