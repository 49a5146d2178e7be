"""Tiny random-init MoE models built from transformers configs (no downloads), one per architecture.

Also a ModuleList-experts model after the DeepSeek-VL2 block structure (remote-code layout):
a Qwen3 decoder whose MLPs are replaced by blocks with a DeepSeek-style top-k gate, an
``nn.ModuleList`` of gate/up/down experts and a shared expert.
"""

from __future__ import annotations

import torch
from torch import nn

H, I, E, K, V = 32, 48, 4, 2, 128  # hidden, expert intermediate, experts, top-k, vocab

_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False)


def _causal(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def mixtral():
    from transformers import MixtralConfig

    return _causal(MixtralConfig(**_COMMON, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K))


def qwen2_moe():
    from transformers import Qwen2MoeConfig

    return _causal(Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                                  num_experts_per_tok=K, shared_expert_intermediate_size=64))


def qwen3_moe():
    from transformers import Qwen3MoeConfig

    return _causal(Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                                  num_experts_per_tok=K, head_dim=8))


def olmoe():
    from transformers import OlmoeConfig

    return _causal(OlmoeConfig(**_COMMON, intermediate_size=I, num_experts=E, num_experts_per_tok=K))


def deepseek_v3():
    from transformers import DeepseekV3Config

    # MLA attention has no grouped KV heads: key/value heads must equal the query heads
    cfg = DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=I, n_routed_experts=E,
                           num_experts_per_tok=K, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                           topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8)
    return _causal(cfg)


def deepseek_v2():
    """DeepSeek-V2 (the language model family of DeepSeek-VL2): MLA attention caching a compressed latent,
    a dense first layer, two shared experts."""
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=I,
                           n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=2, first_k_dense_replace=1,
                           n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy")
    return _causal(cfg)


def llava_olmoe():
    """The layout of ../shared/models/vlm-moe: CLIP vision tower + OLMoE language model."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, OlmoeConfig

    text = OlmoeConfig(**_COMMON, intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=2, image_seq_length=4)
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    return LlavaForConditionalGeneration(cfg).eval()


def qwen3_vl_moe():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = Qwen3VLMoeConfig(
        text_config=dict(**_COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                               "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[0]),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3, vision_end_token_id=V - 4,
    )
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    return Qwen3VLMoeForConditionalGeneration(cfg).eval()


# -- ModuleList experts after the DeepSeek-VL2 block ----------------------------------------------
class DeepseekStyleGate(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.1)

    def forward(self, hidden_states):
        logits = nn.functional.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        return topk_idx, topk_weight, None


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekStyleMoE(nn.Module):
    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        self.gate = DeepseekStyleGate(hidden, experts, top_k)
        self.experts = nn.ModuleList(GatedMLP(hidden, inter) for _ in range(experts))
        self.shared_experts = GatedMLP(hidden, inter)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx, w, _ = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None].to(x.dtype))
        return (out + self.shared_experts(x)).reshape(shape)


def modulelist_moe():
    from transformers import Qwen3Config

    model = _causal(Qwen3Config(**_COMMON, intermediate_size=64, head_dim=8))
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = DeepseekStyleMoE(H, I, E, K)
    return model


def dense_llama():
    from transformers import LlamaConfig

    return _causal(LlamaConfig(**_COMMON, intermediate_size=64))


ALL_MOE = {
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
    "deepseek_v2": deepseek_v2, "deepseek_v3": deepseek_v3, "llava_olmoe": llava_olmoe, "qwen3_vl_moe": qwen3_vl_moe,
    "modulelist": modulelist_moe,
}
