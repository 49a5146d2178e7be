"""The target memory check: weights + KV cache at the chosen context must fit the device's memory share.

Counted: every weight the bundle loads (graph files + external data) and the KV cache of one sequence at
`context` tokens in the target's activation dtype. Not counted: activations of one step and the runtime's
own footprint, which is what the share's headroom (1 - memory_share) is for.
"""

from __future__ import annotations

import json
import struct
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


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    return 2 * num_layers * kv_heads * head_dim * _DTYPE_BYTES[dtype]  # key + value per layer


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
    experts = other = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, v in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in v["shape"]:
                count *= d
            if ".experts." in name and "shared" not in name:
                experts += count
            else:
                other += count
    return experts, other


def estimate_weights(model_dir: Path, t: Target, avg_bits: float, group_size: int) -> int:
    """Bytes of the bundle's weights before quantizing: experts at avg_bits (+ scales/zeros), rest in A."""
    experts, other = checkpoint_params(model_dir)
    return int(experts * (avg_bits + 24 / group_size) / 8 + other * _DTYPE_BYTES[t.activation_dtype])
