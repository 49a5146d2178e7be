"""A tiny random-init Qwen2-MoE checkpoint on disk (safetensors + tokenizer.json), for end-to-end builds."""

from __future__ import annotations

from pathlib import Path

import torch

from fake_export import make_tokenizer

TEXT = ("The os module provides a portable way of using operating system dependent functionality. "
        "A gloss is a brief notation of the meaning of a word or wording in a text. ") * 60


def save_tiny_qwen2_moe(folder: Path) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        '{"backend": "tokenizers", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", '
        '"pad_token": "<|pad|>", "tokenizer_class": "TokenizersBackend"}')
    cfg = Qwen2MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                         num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=1)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg).to(torch.float16).eval()
    model.save_pretrained(folder)
    return folder


def write_text(path: Path) -> Path:
    path.write_text(TEXT)
    return path
