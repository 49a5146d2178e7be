"""The VLM's side graphs: `vision.onnx` (vision tower + projector) and `embed.onnx` (token ids -> embeddings).

The language model itself goes through decoder.py with `inputs_embeds`; the runtime splices
`image_features` into the embeddings at the image-token positions (docs/EXPORT.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from mopeq_export.errors import MopeqError


class VisionFeatures(nn.Module):
    """pixel_values [B,3,S,S] -> image_features [B, image_tokens, hidden], as LlavaModel computes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        # LlavaModel.get_image_features, minus its per-image list (which would pin the batch size at export)
        cfg, llava = self.model.config, self.model.model
        hidden = llava.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return llava.multi_modal_projector(feats)


def check_supported(model: nn.Module) -> None:
    cfg = model.config
    llava = hasattr(getattr(model, "model", None), "multi_modal_projector") and hasattr(cfg, "vision_feature_layer")
    if not llava:
        raise MopeqError(f"{type(model).__name__}: the vision-language export handles LLaVA-style models (a vision "
                         "tower and a projector feeding inputs_embeds); this architecture's vision path "
                         f"({cfg.model_type}) is not exported yet. Its language model can be quantized and evaluated")
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise MopeqError(f"vision_feature_layer {layer!r}: only a single feature layer is supported by the export")


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
    check_supported(model)
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
