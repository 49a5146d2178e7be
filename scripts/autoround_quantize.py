"""Run AutoRound (the external baseline, in its own venv: scripts/autoround_env.sh) on a model's routed experts.

Not part of the toolchain: it imports only torch, transformers and auto_round. The calibration token ids
come from the caller (the same windows the project's quantizer sees), the routed experts are quantized at
one width with asymmetric groups and everything else is left float; the experts' dequantized ("fake
quantized") weights are written to one safetensors file, under the model's own parameter names (fused
[E, ...] tensors where the checkpoint fuses them), for `scripts/compare_quantizers.py` to load and score.

    work/autoround-venv/bin/python scripts/autoround_quantize.py --model M --calib-ids ids.npy --bits 2 --out w.safetensors
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib-ids", required=True, help=".npy int array [samples, seq_len]")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.from_numpy(np.load(args.calib_ids)).long()
    t0 = time.time()
    ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters,
                   nsamples=ids.shape[0], seqlen=ids.shape[1], dataset=[ids[i:i + 1] for i in range(ids.shape[0])],
                   ignore_layers="self_attn,shared_expert,lm_head", device_map="cpu", low_gpu_mem_usage=False)
    qmodel, layer_config = ar.quantize()
    seconds = time.time() - t0
    quantized = sorted(n for n, c in layer_config.items() if isinstance(c, dict) and c.get("bits", 16) < 16)
    print(f"autoround: {len(quantized)} linears at {args.bits} bits in {seconds:.1f} s", flush=True)
    # per-expert linears -> the checkpoint's fused tensors where the model fuses them
    state = {n: p.detach().float().contiguous() for n, p in qmodel.named_parameters()
             if ".experts." in n and n.endswith("weight")}
    save_file(state, args.out, metadata={"seconds": f"{seconds:.1f}", "linears": str(len(quantized))})
    print("\n".join(sorted(state)[:6]), "...", len(state), "tensors")


if __name__ == "__main__":
    main()
