"""Run GPTQModel (the second external baseline, in its own venv: scripts/gptqmodel_env.sh) on a model's routed
experts.

Not part of the toolchain: it imports only torch, transformers, safetensors and gptqmodel. The calibration
token ids come from the caller (the same windows the project's quantizer sees); the routed experts are
quantized at one width with asymmetric groups (GPTQModel's own defaults otherwise: its GPTQ with
group-aware activation ordering and its damping), everything else is left float (attention, shared experts,
router and lm_head are excluded through GPTQModel's negative `dynamic` rules). GPTQModel writes its packed
checkpoint to a scratch folder; that checkpoint is loaded back on the CPU and each quantized expert linear is
dequantized by its own `dequantize_weight()`, so what is scored is what GPTQModel's kernels compute with. The
dequantized weights go to one safetensors file under per-expert linear names
(`...experts.{e}.gate_proj.weight`), for `scripts/compare_quantizers.py` to load and score.

    work/gptqmodel-venv/bin/python scripts/gptqmodel_quantize.py --model M --calib-ids ids.npy --bits 2 --out w.safetensors
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

# modules left float: everything but the routed experts' linears
KEEP_FLOAT = (r"-:.*self_attn.*", r"-:.*shared_expert.*", r"-:.*mlp\.gate$", r"-:lm_head")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib-ids", required=True, help=".npy int array [samples, seq_len]")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # GPTQModel's CPU pool defaults to half the cores, and its model loader asks for two of them: at least 2
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    model_dir, out_path = os.path.abspath(args.model), os.path.abspath(args.out)
    torch.manual_seed(0)
    ids = torch.from_numpy(np.load(args.calib_ids)).long()
    calib = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(ids.shape[0])]
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False,
                          dynamic={p: {} for p in KEEP_FLOAT})
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # GPTQModel writes its logs/ into the working directory
        t0 = time.time()
        model = GPTQModel.load(model_dir, qcfg, device="cpu", dtype=torch.float32)
        model.quantize(calib, batch_size=1)
        seconds = time.time() - t0
        model.save(os.path.join(tmp, "q"))
        del model
        qmodel = GPTQModel.load(os.path.join(tmp, "q"), device="cpu", backend=BACKEND.TORCH)
        state, others = {}, []
        with torch.no_grad():
            for name, mod in qmodel.model.named_modules():
                if hasattr(mod, "dequantize_weight"):
                    if ".experts." not in name:
                        others.append(name)
                        continue
                    state[f"{name}.weight"] = mod.dequantize_weight().T.float().contiguous()  # [in, out] -> [out, in]
    if not state or others:
        raise SystemExit(f"gptqmodel_quantize: {len(state)} expert linears quantized, and {len(others)} others "
                         f"({others[:3]}): the protocol quantizes the routed experts alone")
    bits = sorted({int(getattr(m, "bits", 0)) for n, m in qmodel.model.named_modules() if n + ".weight" in state})
    print(f"gptqmodel: {len(state)} expert linears at {bits} bits in {seconds:.1f} s", flush=True)
    save_file(state, out_path, metadata={"seconds": f"{seconds:.1f}", "linears": str(len(state))})


if __name__ == "__main__":
    main()
