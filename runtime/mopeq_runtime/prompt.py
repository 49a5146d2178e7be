"""Prompt and image preprocessing for vision-language models (NumPy only; shared by toolchain and runtime).

The format is data: it is written into every VLM bundle so the device app builds exactly the prompt
the model was calibrated and validated with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class VQAFormat:
    """``[image_token] * image_tokens + encode(question_template) → answer`` (no BOS)."""

    image_token_id: int = 2
    image_tokens: int = 64
    image_size: int = 64
    question_template: str = "\nQuestion: {question}\nAnswer:"
    answer_template: str = " {answer}"
    mean: tuple[float, float, float] = (0.48, 0.46, 0.41)
    std: tuple[float, float, float] = (0.27, 0.26, 0.28)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "VQAFormat":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def prompt_ids(self, encode: Encode, question: str) -> list[int]:
        return [self.image_token_id] * self.image_tokens + list(encode(self.question_template.format(question=question)))

    def answer_ids(self, encode: Encode, answer: str, eos_id: int) -> list[int]:
        return list(encode(self.answer_template.format(answer=answer))) + [eos_id]

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, S, S, 3] (RGB) -> float32 [N, 3, S, S], normalised."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 RGB [N, H, W, 3], got {images.dtype} {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size} pixels, got {images.shape[1]}x{images.shape[2]}; "
                "resize them first (load_image does)"
            )
        x = images.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_image(path: str, size: int, fit: bool = False) -> np.ndarray:
    """Read an image file as uint8 RGB [size, size, 3].

    By default the file must already be an RGB image of the model's size (a silent resize or colour
    conversion would change what the model sees); ``fit=True`` converts the mode and resizes.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    with im:
        if not fit and im.mode != "RGB":
            raise ValueError(f"image {path} is {im.mode}, the model needs RGB; convert it or pass fit=True (--fit-image)")
        if not fit and im.size != (size, size):
            raise ValueError(
                f"image {path} is {im.size[0]}x{im.size[1]}, the model needs {size}x{size}; "
                "resize it or pass fit=True (--fit-image)"
            )
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)
