"""A remote-code MoE model with ModuleList experts, after DeepSeek-VL2's MoE block: a top-k softmax gate
returning (indices, weights, aux), an nn.ModuleList of gate/up/down MLPs and shared experts, inside Qwen3
decoder layers. Loaded with trust_remote_code, as the seed papers' checkpoints are."""

import torch
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

try:
    from .configuration_remote_moe import RemoteMoeConfig
except ImportError:  # imported as a plain module (tests build the model before saving it)
    from configuration_remote_moe import RemoteMoeConfig


class MoEGate(nn.Module):
    def __init__(self, hidden, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, hidden_states):
        logits = nn.functional.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        scores = logits.float().softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        return topk_idx, topk_weight, None


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.moe_intermediate_size
        self.gate = MoEGate(h, config.n_routed_experts, config.num_experts_per_tok)
        self.experts = nn.ModuleList(MLP(h, i) for _ in range(config.n_routed_experts))
        self.shared_experts = MLP(h, i * config.n_shared_experts)

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


class RemoteMoeDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if layer_idx >= config.first_k_dense_replace:
            self.mlp = MoE(config)


class RemoteMoeModel(Qwen3Model):
    config_class = RemoteMoeConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(RemoteMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class RemoteMoeForCausalLM(Qwen3ForCausalLM):
    config_class = RemoteMoeConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = RemoteMoeModel(config)
        self.post_init()
