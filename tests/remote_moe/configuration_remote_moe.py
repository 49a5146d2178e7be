"""Config of a remote-code MoE model after the DeepSeek-VL2 / MolmoE layout (used by tests and benchmarks)."""

from transformers import Qwen3Config


class RemoteMoeConfig(Qwen3Config):
    model_type = "remote_moe"

    def __init__(self, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                 first_k_dense_replace=0, **kwargs):
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.n_shared_experts = n_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        super().__init__(**kwargs)
