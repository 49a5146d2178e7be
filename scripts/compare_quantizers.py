"""The quantizers at uniform widths on text-moe, in one run: this project's RTN, GPTQ and learned rounding
(`--method signround`) against the external baselines AutoRound and GPTQModel, each installed into its own venv.

Protocol (issue 13): routed experts only (everything else float), groups of 32, asymmetric; the same
--samples x 256 calibration token windows of text_calib for every quantizer; scored against the float16 model
on the first --windows windows of 256 tokens of text_dev (perplexity ratio, KL, top-1 agreement).

    python scripts/compare_quantizers.py [--bits 2 3 4] [--methods rtn,gptq,signround,autoround,gptqmodel] [--samples 128]

AutoRound 0.16.1 runs through `scripts/autoround_quantize.py` in `--autoround-venv` (made by
scripts/autoround_env.sh when missing), GPTQModel 7.6.0 through `scripts/gptqmodel_quantize.py` in
`--gptqmodel-venv` (scripts/gptqmodel_env.sh); neither is ever a dependency of the toolchain or the runtime.
Their seconds include their own start-up (model load, torch.compile; GPTQModel's also its checkpoint's save
and reload); ours are the `quantize_layers` call. A table goes to stdout and
to --out (markdown + json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_allocations import RefAnswers, RefLogProbs  # noqa: E402

from mopeq_export.calibration import load_calibration  # noqa: E402
from mopeq_export.evaluate import text_windows  # noqa: E402
from mopeq_export.models.adapters import find_moe_layers  # noqa: E402
from mopeq_export.models.loading import load_model, load_tokenizer  # noqa: E402
from mopeq_export.quantization.pipeline import QuantizeConfig, quantize_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


# the external baselines: each quantizes in its own venv (made by its env script when missing) and writes the
# experts' dequantized weights under per-expert linear names
EXTERNAL = {"autoround": ("autoround_env.sh", "autoround_quantize.py"),
            "gptqmodel": ("gptqmodel_env.sh", "gptqmodel_quantize.py")}


def external(args, tool: str, calib, is_vlm: bool, bits: int, model) -> float:
    """Quantize with an external tool in its venv and load its experts' dequantized weights into `model`."""
    env_script, script = EXTERNAL[tool]
    venv = Path(getattr(args, f"{tool}_venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / env_script), str(venv)], check=True)
    extra = ["--iters", str(args.iters)] if tool == "autoround" else []
    with tempfile.TemporaryDirectory() as tmp:
        if is_vlm:  # the model-input batches themselves (images and prompts), labels left out
            data = Path(tmp) / "batches.pt"
            torch.save([{k: v for k, v in b.items() if k != "labels"} for b in calib.batches], data)
            extra += ["--calib-batches", str(data)]
        else:
            data = Path(tmp) / "ids.npy"
            np.save(data, torch.cat([b["input_ids"] for b in calib.batches]).numpy())
            extra += ["--calib-ids", str(data)]
        out = Path(tmp) / "experts.safetensors"
        t = time.time()
        subprocess.run([str(py), str(ROOT / "scripts" / script), "--model", args.model, "--bits", str(bits),
                        *extra, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL if not args.verbose else None,
                       stderr=subprocess.DEVNULL if not args.verbose else None)
        seconds = time.time() - t
        state = load_file(out)
    for layer in find_moe_layers(model):
        for e in range(layer.num_experts):
            p = f"{layer.experts_path}.{e}"
            w1 = torch.cat([state[f"{p}.gate_proj.weight"], state[f"{p}.up_proj.weight"]])
            layer.set_weights(e, w1, state[f"{p}.down_proj.weight"])
    return seconds


def write_table(rows: list[dict], out: Path) -> str:
    widths = sorted({r["bits"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["bits"]): r for r in rows}
    lines = ["| quantizer | " + " | ".join(f"{b} bits: ppl ratio / KL / s" for b in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for m in methods:
        cells = []
        for b in widths:
            r = cell.get((m, b))
            cells.append("-" if r is None else f"x{r['ppl_ratio']:.4f} / {r['kl']:.5f} / {r['seconds']:.0f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models/text-moe"))
    ap.add_argument("--calib", default=None, help="default: text_calib.txt, or vqa_calib.npz for a VLM")
    ap.add_argument("--data", default=None, help="default: text_dev.txt, or vqa_dev.npz for a VLM")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--methods", default="rtn,gptq,signround,autoround,gptqmodel")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=128, help="text windows or VQA samples scored (0: all)")
    ap.add_argument("--iters", type=int, default=200, help="AutoRound's iterations (ours: SignRoundConfig)")
    ap.add_argument("--autoround-venv", default=str(ROOT / "work" / "autoround-venv"))
    ap.add_argument("--gptqmodel-venv", default=str(ROOT / "work" / "gptqmodel-venv"))
    ap.add_argument("--out", default=str(ROOT / "work" / "quantizers"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    ref, info = load_model(args.model)
    if info.is_vlm and "gptqmodel" in args.methods.split(","):
        # checked before any work: GPTQModel 7.6.0 defines llava only with a Qwen2 language model (llava_qwen2)
        raise SystemExit("gptqmodel has no model definition for this vision-language model (model_type "
                         f"{ref.config.model_type!r} with a {ref.config.text_config.model_type!r} language model); "
                         "leave it out of --methods")
    tok = load_tokenizer(args.model)
    data = args.data or str(SHARED / "data" / ("vqa_dev.npz" if info.is_vlm else "text_dev.txt"))
    calib_path = args.calib or str(SHARED / "data" / ("vqa_calib.npz" if info.is_vlm else "text_calib.txt"))
    ref_lp = (RefAnswers(ref, data, tok, args.windows or None) if info.is_vlm
              else RefLogProbs(ref, text_windows(data, tok, max_windows=args.windows or None)))
    calib = load_calibration(calib_path, tok, ref.config, samples=args.samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for bits in args.bits:
        for method in args.methods.split(","):
            model, _ = load_model(args.model)
            layers = find_moe_layers(model)
            if method in EXTERNAL:
                seconds = external(args, method, calib, info.is_vlm, bits, model)
            else:
                t = time.time()
                quantize_layers(model, layers, {n: bits for l in layers for n in l.expert_names}, calib,
                                QuantizeConfig(method=method))
                seconds = time.time() - t
            row = {"method": method, "bits": bits, "seconds": seconds, "samples": args.samples, "kind": ref_lp.kind,
                   "data": Path(data).name, **ref_lp.score(model)}
            rows.append(row)
            print(f"{method:10s} {bits} bits  ppl x{row['ppl_ratio']:.4f}  kl {row['kl']:.6f}  top1 {row['top1']:.4f}"
                  f"  {seconds:.0f} s  (float16 ppl {row['ppl_ref']:.4f})", flush=True)
            write_table(rows, out)
    print(write_table(rows, out))


if __name__ == "__main__":
    main()
