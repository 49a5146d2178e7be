"""The VLM's side graphs: `vision.onnx` (vision tower + projector) and `embed.onnx` (token ids -> embeddings).

The language model itself goes through decoder.py with `inputs_embeds`; the runtime splices
`image_features` into the embeddings at the image-token positions (docs/EXPORT.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim


class VisionFeatures(nn.Module):
    """pixel_values [B,3,S,S] -> image_features [B, image_tokens, hidden], as LlavaModel computes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


class TokenEmbedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.get_input_embeddings()(input_ids)


def vision_info(model: nn.Module) -> dict:
    cfg = model.config
    return {"image_size": cfg.vision_config.image_size, "image_token_id": cfg.image_token_index,
            "image_tokens": getattr(cfg, "image_seq_length", None)}


def export_vision(model: nn.Module, dtype: torch.dtype, opset: int):
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size).to(dtype)
    with torch.no_grad():
        return torch.onnx.export(VisionFeatures(model).eval(), (pixels,), dynamo=True, opset_version=opset,
                                 input_names=["pixel_values"], output_names=["image_features"],
                                 dynamic_shapes={"pixel_values": {0: Dim("batch")}})


def export_embed(model: nn.Module, opset: int):
    ids = torch.randint(3, 100, (2, 3))
    with torch.no_grad():
        return torch.onnx.export(TokenEmbedding(model).eval(), (ids,), dynamo=True, opset_version=opset,
                                 input_names=["input_ids"], output_names=["inputs_embeds"],
                                 dynamic_shapes={"input_ids": {0: Dim("batch"), 1: Dim("sequence")}})
