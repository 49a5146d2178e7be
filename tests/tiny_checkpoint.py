"""A tiny random-init Qwen2-MoE checkpoint on disk (safetensors + tokenizer.json), for end-to-end builds."""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
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


REMOTE_CODE = Path(__file__).resolve().parent / "remote_moe"
REMOTE_FILES = ("configuration_remote_moe.py", "modeling_remote_moe.py")


def remote_moe_classes():
    """(config class, model class) of tests/remote_moe, imported as plain modules."""
    import importlib
    import sys

    if str(REMOTE_CODE) not in sys.path:
        sys.path.insert(0, str(REMOTE_CODE))
    return (importlib.import_module("configuration_remote_moe").RemoteMoeConfig,
            importlib.import_module("modeling_remote_moe").RemoteMoeForCausalLM)


def remote_moe_config(**overrides):
    config_cls, _ = remote_moe_classes()
    dims = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1)
    cfg = config_cls(**{**dims, **overrides})
    cfg.auto_map = {"AutoConfig": "configuration_remote_moe.RemoteMoeConfig",
                    "AutoModelForCausalLM": "modeling_remote_moe.RemoteMoeForCausalLM"}
    cfg._attn_implementation = "eager"
    return cfg


def save_remote_moe(folder: Path, dtype=torch.float16, **overrides) -> Path:
    """A remote-code checkpoint with ModuleList experts (load with trust_remote_code=True)."""
    import shutil

    _, model_cls = remote_moe_classes()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = model_cls(remote_moe_config(**overrides)).to(dtype).eval()
    model.save_pretrained(folder)
    for f in REMOTE_FILES:
        shutil.copyfile(REMOTE_CODE / f, folder / f)
    return folder


def save_tiny(name: str, folder: Path) -> Path:
    """tiny_models.ALL_MOE[name] saved as a float16 checkpoint ("modulelist": the remote-code model)."""
    import tiny_models as tm

    if name == "modulelist":
        return save_remote_moe(folder)
    tm.ALL_MOE[name]().to(torch.float16).save_pretrained(folder)
    return folder


def quantize_random_plan(model_dir, out, trust_remote_code=False, seed=0, dense=None, cfg=None, calib=None,
                         samples=None, seq_len=256):
    """RTN with a random 2/3/4-bit plan: every width occurs, like a MoPEQ plan. `dense`: the plan's dense
    widths (None: no `dense` record, so every dense weight stays float, as in plans of older toolchains).
    `cfg` (with `calib`, `samples`, `seq_len`) replaces RTN by another QuantizeConfig."""
    from mopeq_export.models.adapters import find_moe_layers
    from mopeq_export.models.loading import model_info
    from mopeq_export.models.onload import skeleton
    from mopeq_export.quantization.pipeline import QuantizeConfig
    from mopeq_export.quantization.stage import run_quantize

    info = model_info(model_dir)
    rng = np.random.default_rng(seed)
    names = [n for layer in find_moe_layers(skeleton(model_dir, trust_remote_code=trust_remote_code))
             for n in layer.expert_names]
    plan = {"kind": "mopeq.bitplan", "experts": {n: int(rng.choice([2, 3, 4])) for n in names}, "method": "random", "avg_bits": 0,
            "model": {"weights_sha256": info.weights_sha256}}
    if dense is not None:
        plan["dense"] = dense
    (out.parent / "plan.json").write_text(json.dumps(plan))
    run_quantize(model_dir, out.parent / "plan.json", out, calib=calib, cfg=cfg or QuantizeConfig(method="rtn"),
                 samples=samples, seq_len=seq_len, trust_remote_code=trust_remote_code, device="cpu")
    return out
