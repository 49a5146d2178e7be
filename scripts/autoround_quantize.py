"""Run AutoRound (the external baseline, in its own venv: scripts/autoround_env.sh) on a model's routed experts.

Not part of the toolchain: it imports only torch, transformers and auto_round. The calibration data
comes from the caller (the same windows or VQA samples the project's quantizer sees): token ids for a text
model, or, for a vision-language model, the model-input batches themselves (`--calib-batches`, a
`torch.save`d list of dicts: input_ids, attention_mask, pixel_values), which AutoRound's multimodal
calibrator feeds to the whole model's forward (the vision tower stays float). The routed experts are quantized at
one width with asymmetric groups and everything else is left float; the experts' dequantized ("fake
quantized") weights are written to one safetensors file, under the model's own parameter names (fused
[E, ...] tensors where the checkpoint fuses them), for `scripts/compare_quantizers.py` to load and score.

    work/autoround-venv/bin/python scripts/autoround_quantize.py --model M --calib-ids ids.npy --bits 2 --out w.safetensors
    work/autoround-venv/bin/python scripts/autoround_quantize.py --model VLM --calib-batches b.pt --bits 2 --out w.safetensors
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
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib-ids", help=".npy int array [samples, seq_len] (text models)")
    src.add_argument("--calib-batches", help="torch.save'd list of model-input dicts (vision-language models)")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    common = dict(bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters, device_map="cpu",
                  low_gpu_mem_usage=False)
    if args.calib_ids:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        ids = torch.from_numpy(np.load(args.calib_ids)).long()
        data = dict(nsamples=ids.shape[0], seqlen=ids.shape[1], dataset=[ids[i:i + 1] for i in range(ids.shape[0])])
        ignore = "self_attn,shared_expert,lm_head"
    else:  # one dict per batch; AutoRound counts `batch_size` samples per dict
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
        batches = torch.load(args.calib_batches)
        # AutoRound reuses the first batch's position embeddings for every batch: one length for all, by more
        # right padding (masked, after every real token, so the real tokens' states are unchanged)
        length = max(b["input_ids"].shape[1] for b in batches)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for b in batches:
            extra = length - b["input_ids"].shape[1]
            b["input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, extra), value=pad)
            b["attention_mask"] = torch.nn.functional.pad(b["attention_mask"], (0, extra), value=0)
        sizes = {b["input_ids"].shape[0] for b in batches[:-1]}
        assert len(sizes) <= 1, "every batch but the last must be of one size"
        bs = sizes.pop() if sizes else batches[0]["input_ids"].shape[0]
        data = dict(nsamples=sum(b["input_ids"].shape[0] for b in batches), batch_size=bs,
                    seqlen=length, dataset=batches)
        ignore = "self_attn,shared_expert,lm_head,vision_tower,multi_modal_projector"
        # the multimodal calibrator's template insists on a processor but never calls it on dict batches (the
        # images are already pixel values): the tokenizer stands in
        data["processor"] = tok
    t0 = time.time()
    ar = AutoRound(model, tok, ignore_layers=ignore, **common, **data)
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
