"""Model code that ONNX cannot express, swapped for an equivalent for the duration of an export.

DeepSeek-V2 (the language model family of DeepSeek-VL2) rotates its RoPE dimensions with complex numbers:
the rotary module returns ``freqs_cis = scale * exp(i * position * inv_freq)`` and `apply_rotary_emb` views
each (even, odd) pair of a query/key as one complex number and multiplies. ONNX has no complex type. The
same rotation in real arithmetic, on (cos, sin) pairs:

    (a + ib)(c + is) = (ac - bs) + i(as + bc)        a, b: the pair; c, s: scale * cos, scale * sin

`real_rope(model)` makes the rotary module return [..., dim/2, 2] = (c, s) and the attention use the real
product; outside the block the model is as it was. The export tests compare the graph with the unpatched
PyTorch model, so a change in either formula shows.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
from torch import nn


def _rotary_real(self, x, position_ids):
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], -1) * self.attention_scaling


def _with_rope_update(fn):
    """The rotary forward keeps transformers' dynamic-RoPE wrapper (it updates inv_freq for long inputs)."""
    try:
        from transformers.modeling_rope_utils import dynamic_rope_update
    except ImportError:  # pragma: no cover - older transformers
        return fn
    return dynamic_rope_update(fn)


def _apply_real(xq, xk, freqs):
    cs = freqs.unsqueeze(1).to(xq.device)  # [B, 1, T, dim/2, 2]
    c, s = cs[..., 0], cs[..., 1]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


_COMPLEX_ROPE = {"deepseek_v2": "transformers.models.deepseek_v2.modeling_deepseek_v2"}


@contextlib.contextmanager
def real_rope(model: nn.Module) -> Iterator[bool]:
    """Within the block a complex-RoPE model computes its rotation in real arithmetic; yields whether it had to."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = _COMPLEX_ROPE.get(cfg.model_type)
    if name is None:
        yield False
        return
    module = importlib.import_module(name)
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    saved = module.apply_rotary_emb
    module.apply_rotary_emb = _apply_real
    for m in rotaries:
        m.forward = _with_rope_update(_rotary_real).__get__(m)
    try:
        yield True
    finally:
        module.apply_rotary_emb = saved
        for m in rotaries:
            del m.forward
