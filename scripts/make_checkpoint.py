"""Random-init MoE checkpoints at real sizes, built from the published configs' shapes (for benchmarks).

Quality is measured on the trained reference models; these carry real sizes for time and memory. Each
parameter is drawn in the target dtype on the chosen device (normal(0, 0.02); norms 1, biases 0) and the
model is written with `save_pretrained` (transformers' own checkpoint format, per-expert tensors, 5 GB
shards), with the reference models' tokenizer (4096 tokens; the configs keep their own vocabulary sizes).

    python scripts/make_checkpoint.py --shape olmoe-1b-7b --out ckpt/olmoe [--device cuda] [--layers 2] [--tokenizer DIR]

Shapes (published configs; --layers cuts a smaller model of the same family):
    qwen3-moe-1.25b   Qwen3-MoE, 12 layers, hidden 1024, 64 experts top-8, moe intermediate 512, vocab 4096
    olmoe-1b-7b       OLMoE-1B-7B (MolmoE-1B's language model): 16 layers, hidden 2048, 64 experts top-8, I 1024
    deepseek-v2-lite  DeepSeek-V2-Lite (DeepSeek-VL2-Small's language model class): 27 layers, hidden 2048,
                      first layer dense (10944), 64 routed experts top-6 + 2 shared, I 1408, MLA kv_lora_rank 512
    vl2-tiny          DeepSeek-VL2-Tiny-size VLM: LLaVA with a SigLIP-so400m vision tower (27 layers, 1152,
                      384 px, patch 14) and a 3B DeepSeek-V2-shaped MoE (12 layers, hidden 1280, 64 experts
                      top-6 + 2 shared, I 896, MLA)
    modulelist-olmoe  the ModuleList-experts path (remote code, DeepSeek-VL2/MolmoE style) at OLMoE-1B-7B's size
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "models" / "text-moe"


def _qwen3_moe(layers):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers or 12,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, moe_intermediate_size=512,
                          num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _olmoe(layers):
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers or 16,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _deepseek_v2(layers, hidden=2048, inter=10944, moe_inter=1408, heads=16, vocab=102400):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads, moe_intermediate_size=moe_inter,
                            n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                            n_group=1, topk_group=1, topk_method="greedy", q_lora_rank=None, kv_lora_rank=512,
                            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _vl2_tiny(layers):
    from transformers import LlavaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=384, patch_size=14)
    text = _deepseek_v2(layers or 12, hidden=1280, inter=6848, moe_inter=896, heads=10, vocab=129280)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=2,
                       image_seq_length=(384 // 14) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="full", projector_hidden_act="gelu")


SHAPES = {"qwen3-moe-1.25b": _qwen3_moe, "olmoe-1b-7b": _olmoe,
          "deepseek-v2-lite": lambda layers: _deepseek_v2(layers or 27), "vl2-tiny": _vl2_tiny}


def _fill(model: torch.nn.Module, device: str, dtype: torch.dtype) -> int:
    """Materialize every meta parameter in place: normal(0, 0.02), norms 1, biases 0."""
    gen = torch.Generator(device=device).manual_seed(0)
    count = 0
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("bias"):
            t.zero_()
        elif "norm" in name.split(".")[-2]:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        count += p.numel()
    return count


def build(shape: str, out: Path, device: str, dtype: torch.dtype, layers: int | None,
          tokenizer: Path = TOKENIZER) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if shape == "modulelist-olmoe":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_checkpoint import REMOTE_CODE, REMOTE_FILES, remote_moe_classes, remote_moe_config

        _, cls = remote_moe_classes()
        cfg = remote_moe_config(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                num_hidden_layers=layers or 16, num_attention_heads=16, num_key_value_heads=16,
                                head_dim=128, n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024,
                                n_shared_experts=0, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0,
                                pad_token_id=1)
        with init_empty_weights(include_buffers=False):
            model = cls(cfg)
    else:
        cfg = SHAPES[shape](layers)
        auto = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(cfg)
    count = _fill(model.eval(), device, dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, max_shard_size="5GB")
    if shape == "modulelist-olmoe":
        for f in REMOTE_FILES:
            shutil.copyfile(REMOTE_CODE / f, out / f)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / f, out / f)
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=[*SHAPES, "modulelist-olmoe"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (same widths)")
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER,
                    help="folder with tokenizer.json and tokenizer_config.json (default: ../shared/models/text-moe)")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose a new folder")
    if not (args.tokenizer / "tokenizer.json").is_file():
        sys.exit(f"error: no tokenizer.json in {args.tokenizer}; give --tokenizer DIR")
    t = time.time()
    n = build(args.shape, args.out, args.device, getattr(torch, args.dtype), args.layers, args.tokenizer)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"{args.shape}: {n / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB in {args.out} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
