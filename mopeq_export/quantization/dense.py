"""Dense (non-expert) weights: which classes there are, their default widths, and their quantization.

A plan carries one width per class of dense weight (plan.json -> `dense`):

    attention       q/k/v/o projections of every decoder layer            4 bits -> MatMulNBits
    shared_experts  the always-on expert MLP of MoE layers (Qwen2-MoE, ...)  4 bits -> MatMulNBits
    dense_mlp       the MLP of decoder layers without routed experts        4 bits -> MatMulNBits
    lm_head         the output projection                                   4 bits -> MatMulNBits
    embeddings      the input token embeddings                              8 bits -> int8 Gather + Cast + Mul

16 keeps a class float (the target's activation dtype). Linear classes take 4 (ONNX Runtime's
`com.microsoft.MatMulNBits`, which every ORT build since 1.17 runs with 4-bit weights on the CPU and CUDA
providers); embeddings take 8 (a row-gather of uint8 codes, standard ops only). Why these defaults: measured
on text-moe, docs/DECISIONS.md "Dense weights".

Quantization is the group-wise asymmetric format of the routed experts (FORMAT.md §2-3, same group size):
GPTQ on the calibration inputs each linear receives (the decoder's linears, and lm_head on the final hidden
states with `QuantizeConfig.head_gptq`; learned rounding for gated MLPs with `QuantizeConfig.mlp_method`),
round-to-nearest with the clipping search without calibration data and for the embeddings (stage.py).
"""

from __future__ import annotations

from ..errors import MopeqError

FLOAT = 16  # "keep it float"
DENSE_CLASSES = ("attention", "shared_experts", "dense_mlp", "lm_head", "embeddings")
DEFAULT_DENSE = {"attention": 4, "shared_experts": 4, "dense_mlp": 4, "lm_head": 4, "embeddings": 8}
ALLOWED = {"attention": (4, FLOAT), "shared_experts": (4, FLOAT), "dense_mlp": (4, FLOAT), "lm_head": (4, 8, FLOAT),
           "embeddings": (8, FLOAT)}  # the exported table holds one uint8 code per weight: fewer bits would not shrink it
# 8-bit embeddings are grouped by 128 (not the experts' 32): at 8 bits the group size barely matters for the
# error, and the table's float16 scale + uint8 zero per group cost 0.19 instead of 0.75 bit per weight
EMBEDDING_GROUP = 128
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "dense", "fc2", "w2")  # quantized after the layer's input projections


def dense_widths(dense_bits: int | None) -> dict[str, int]:
    """`--dense-bits`: None or 4 -> the defaults; 16 -> everything float."""
    if dense_bits is None or dense_bits == 4:
        return dict(DEFAULT_DENSE)
    if dense_bits == FLOAT:
        return {c: FLOAT for c in DENSE_CLASSES}
    raise MopeqError(f"--dense-bits {dense_bits}: use 4 (dense weights quantized: the default) or 16 (kept float)")


def check_dense(d, source: str = "plan") -> dict[str, int]:
    """A plan's `dense` record, checked; a plan without one (older toolchains) keeps every class float."""
    if d is None:
        return {c: FLOAT for c in DENSE_CLASSES}
    if not isinstance(d, dict) or set(d) - set(DENSE_CLASSES):
        raise MopeqError(f"{source}: `dense` must map some of {', '.join(DENSE_CLASSES)} to widths")
    out = {}
    for c in DENSE_CLASSES:
        b = d.get(c, FLOAT)
        if isinstance(b, bool) or b not in ALLOWED[c]:
            raise MopeqError(f"{source}: dense {c} width {b!r} is not one of {ALLOWED[c]}")
        out[c] = int(b)
    return out


def dense_linears(model, layers, decoder_paths: list[str]) -> dict[str, str]:
    """{linear path: class} for the attention, shared-expert and dense-MLP linears of the decoder layers.

    `layers` are the model's MoE layers (their shared experts and blocks); a decoder layer that holds no MoE
    block has a dense MLP, whose linears are `dense_mlp`."""
    from torch import nn

    out: dict[str, str] = {}
    moe_blocks = {l.block_path for l in layers}
    routed = {l.experts_path for l in layers}
    for l in layers:
        if l.shared_expert_path:
            shared = model.get_submodule(l.shared_expert_path)
            for n, m in shared.named_modules():
                if isinstance(m, nn.Linear):
                    out[f"{l.shared_expert_path}.{n}"] = "shared_experts"
    for dl in decoder_paths:
        block = model.get_submodule(dl)
        has_moe = any(p.startswith(dl + ".") for p in moe_blocks)
        for n, m in block.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            path = f"{dl}.{n}"
            if path in out or any(path.startswith(r + ".") for r in routed):
                continue
            leaf = n.rsplit(".", 1)[-1]
            if leaf in ATTENTION_NAMES and ("attn" in n or "attention" in n):
                out[path] = "attention"
            elif not has_moe and (".mlp." in f".{n}" or n.startswith("mlp.")):
                out[path] = "dense_mlp"
    return out


def module_path(model, module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)
