"""The language model as ONE ONNX graph for prefill and decode (docs/EXPORT.md "decoder.onnx").

`DecoderWithCache` turns the model's DynamicCache into plain tensors so the graph's I/O is flat:
past key/values come in as `past_key_values.{i}.key|value`, go into a fresh DynamicCache, and the grown
cache leaves as `present.{i}.key|value`. Logits are cast to float32 in the graph (one sampling path for
every target).

What a layer caches is the model's business, not a formula of the config: grouped-query attention caches
keys and values of `num_key_value_heads` heads, multi-head latent attention (DeepSeek-V2/V3, DeepSeek-VL2's
language model) caches its compressed latent as one "key head" of kv_lora_rank and the shared RoPE key as
one "value head" of qk_rope_head_dim. `DecoderShape.of` runs the model once on two tokens and reads each
layer's cache shapes, so every architecture gets the layout it really uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim


@dataclass(frozen=True)
class DecoderShape:
    """What the runtime needs to size inputs (recorded in export.json -> model)."""

    num_layers: int
    kv_cache: tuple[tuple[int, int, int, int], ...]  # per layer: key heads, key dim, value heads, value dim
    hidden: int
    vocab: int
    max_positions: int

    @classmethod
    def of(cls, model: nn.Module, embeds: bool, dtype: torch.dtype) -> "DecoderShape":
        """Read from one forward of two tokens (batch 1, no past) with the cache on."""
        c = text_config(model)
        dev = next(model.parameters()).device
        with torch.no_grad():
            if embeds:
                tokens = {"inputs_embeds": torch.zeros(1, 2, c.hidden_size, dtype=dtype, device=dev)}
            else:
                tokens = {"input_ids": torch.tensor([[3, 4]], device=dev)}
            out = model(**tokens, use_cache=True)
        layers = cache_layers(out)[: c.num_hidden_layers]
        kv = tuple((int(l.keys.shape[1]), int(l.keys.shape[3]), int(l.values.shape[1]), int(l.values.shape[3]))
                   for l in layers)
        return cls(c.num_hidden_layers, kv, c.hidden_size, c.vocab_size, c.max_position_embeddings)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "kv_cache": [list(k) for k in self.kv_cache], "hidden": self.hidden,
                "vocab": self.vocab, "max_positions": self.max_positions}


def cache_layers(out) -> list:
    """The cache layers of a model output (transformers names the field `cache` or `past_key_values`)."""
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else out.past_key_values
    return list(cache.layers)


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def io_names(shape: DecoderShape, embeds: bool) -> tuple[list[str], list[str]]:
    kv = lambda pre: [f"{pre}.{i}.{t}" for i in range(shape.num_layers) for t in ("key", "value")]  # noqa: E731
    inputs = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids", *kv("past_key_values")]
    return inputs, ["logits", *kv("present")]


class DecoderWithCache(nn.Module):
    def __init__(self, model: nn.Module, embeds: bool, shape: DecoderShape):
        super().__init__()
        self.model = model
        self.embeds = embeds
        self.shape = shape

    def forward(self, tokens, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(config=text_config(self.model))
        for i in range(self.shape.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"inputs_embeds" if self.embeds else "input_ids": tokens}
        out = self.model(**kwargs, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in cache_layers(out)[: self.shape.num_layers]:
            present += [layer.keys, layer.values]
        return out.logits.float(), present


def example_inputs(shape: DecoderShape, embeds: bool, dtype: torch.dtype, batch: int = 2, seq: int = 3,
                   past: int = 4, device: torch.device | None = None):
    """Sizes >= 2 everywhere: torch.export specializes dimensions whose example size is 0 or 1."""
    g = torch.Generator().manual_seed(0)
    if embeds:
        tokens = torch.randn(batch, seq, shape.hidden, generator=g).to(dtype)
    else:
        tokens = torch.randint(3, shape.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for kh, kd, vh, vd in shape.kv_cache:
        kv += [torch.randn(batch, kh, past, kd, generator=g).to(dtype), torch.randn(batch, vh, past, vd, generator=g).to(dtype)]
    dev = device or torch.device("cpu")
    return tokens.to(dev), mask.to(dev), pos.to(dev), [t.to(dev) for t in kv]


def dynamic_shapes(shape: DecoderShape, embeds: bool):
    batch, seq, total = Dim("batch"), Dim("sequence"), Dim("total_sequence")
    past = Dim("past_sequence", min=0)  # 0 at prefill
    return {"tokens": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * (2 * shape.num_layers)}


def export_decoder(model: nn.Module, embeds: bool, dtype: torch.dtype, opset: int, shape: DecoderShape,
                   translations=None):
    """torch.onnx.export of the wrapped model; returns the ONNXProgram (not yet saved)."""
    wrapper = DecoderWithCache(model, embeds, shape).eval()
    inputs, outputs = io_names(wrapper.shape, embeds)
    args = example_inputs(wrapper.shape, embeds, dtype)
    with torch.no_grad():
        return torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes(wrapper.shape, embeds), custom_translation_table=translations or {},
            verbose=False)
