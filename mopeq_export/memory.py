"""The target memory check: weights + KV cache at the chosen context must fit the device's memory share.

Counted: every weight the bundle loads (graph files + external data) and the KV cache of one sequence at
`context` tokens in the target's activation dtype. Not counted: activations of one step and the runtime's
own footprint, which is what the share's headroom (1 - memory_share) is for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MopeqError
from .targets import Target

MiB = 2**20
_DTYPE_BYTES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class MemoryCheck:
    target: str
    share_bytes: int
    weights_bytes: int
    kv_bytes: int
    context: int
    kv_bytes_per_token: int
    fits: bool
    max_context: int  # longest context that fits with these weights (0 if the weights alone do not)

    def to_json(self) -> dict:
        return asdict(self)


def kv_cache_of_config(tc: dict) -> list[list[int]]:
    """Per-layer [key heads, key dim, value heads, value dim] as transformers caches them, from a text config.

    The export reads the real shapes from the model (exporters/decoder.py); this is the estimate before
    the export exists. Multi-head latent attention (a kv_lora_rank in the config) caches its compressed
    latent and the shared RoPE key, one head each."""
    if tc.get("kv_lora_rank"):
        shape = [1, int(tc["kv_lora_rank"]), 1, int(tc["qk_rope_head_dim"])]
    else:
        heads = tc["num_attention_heads"]
        kv = tc.get("num_key_value_heads") or heads
        dim = tc.get("head_dim") or tc["hidden_size"] // heads
        shape = [kv, dim, kv, dim]
    return [shape] * int(tc["num_hidden_layers"])


def kv_bytes_per_token(kv_cache, dtype: str) -> int:
    """Bytes one token adds to the cache: every layer's key and value vectors."""
    return sum(kh * kd + vh * vd for kh, kd, vh, vd in kv_cache) * _DTYPE_BYTES[dtype]


def share_bytes(t: Target) -> int:
    return int(t.memory_gib * t.memory_share * 2**30)


def check_memory(t: Target, weights_bytes: int, per_token: int, context: int) -> MemoryCheck:
    share = share_bytes(t)
    kv = per_token * context
    room = share - weights_bytes
    max_ctx = max(0, room // per_token) if per_token else 0
    return MemoryCheck(t.name, share, weights_bytes, kv, context, per_token, weights_bytes + kv <= share, int(max_ctx))


def require_fit(m: MemoryCheck, what: str = "the bundle") -> None:
    if m.fits:
        return
    need = (m.weights_bytes + m.kv_bytes) / MiB
    head = (f"{what} does not fit {m.target}: weights {m.weights_bytes / MiB:.1f} MiB + KV cache "
            f"{m.kv_bytes / MiB:.1f} MiB at {m.context} tokens = {need:.1f} MiB > the device share of "
            f"{m.share_bytes / MiB:.1f} MiB")
    if m.max_context > 0:
        raise MopeqError(f"{head}; would fit: --context {m.max_context} or less, or a larger target")
    raise MopeqError(f"{head}; the weights alone are too big: lower --avg-bits or choose a target with more memory")


def checkpoint_params(model_dir: Path) -> tuple[int, int]:
    """(routed-expert params, other params) from the safetensors headers, without loading any weight."""
    from .models.loading import tensor_sizes

    experts = other = 0
    for name, count in tensor_sizes(model_dir).items():
        if ".experts." in name and "shared" not in name:
            experts += count
        else:
            other += count
    return experts, other


def estimate_weights(model_dir: Path, t: Target, avg_bits: float, group_size: int) -> int:
    """Bytes of the bundle's weights before quantizing: experts at avg_bits (+ scales/zeros), rest in A."""
    experts, other = checkpoint_params(model_dir)
    return int(experts * (avg_bits + 24 / group_size) / 8 + other * _DTYPE_BYTES[t.activation_dtype])
