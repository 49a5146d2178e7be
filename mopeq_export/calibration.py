"""Calibration data: text windows or image-question-answer samples, turned into model batches.

Accepted inputs
- text: a plain ``.txt`` file, or ``.jsonl`` with one ``{"text": ...}`` object per line. The token
  stream is cut into ``samples`` windows of ``seq_len`` tokens, spread evenly over the file.
- image-text: an ``.npz`` with ``images`` (uint8 N x S x S x 3), ``questions``, ``answers``; or a folder
  holding images and a ``.jsonl`` of ``{"image": file, "question": ..., "answer": ...}``. The loss of a
  VQA sample is on its answer tokens only (prompt format: ``mopeq_runtime.prompt.VQAFormat``).

The samples that were not chosen stay reachable as a ``SparePool``: the sensitivity stage scans them
for inputs that reach experts the chosen samples never routed to (``CalibrationSet.extend``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mopeq_runtime.prompt import VQAFormat, load_image

from .errors import MopeqError
from .fsutil import sha256_bytes, sha256_file

IGNORE = -100


@dataclass(frozen=True)
class CalibrationInfo:
    """Provenance of calibration data, recorded in every record computed from it."""

    path: str
    sha256: str
    kind: str  # "text" | "vqa"
    samples: int
    seq_len: int  # text window length; for VQA the padded sample length
    tokens: int  # tokens fed to the model (VQA: answer tokens that carry the loss)
    coverage_samples: int = 0  # of `samples`, added to reach experts the chosen ones missed

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class SparePool:
    """The samples of the calibration source that were not chosen, collated on demand."""

    ids: tuple[int, ...]
    collate: Callable[[list[int]], dict[str, torch.Tensor]]  # sample ids -> one model batch
    tokens: Callable[[list[int]], int]  # sample ids -> tokens as counted in CalibrationInfo.tokens

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        for i in range(0, len(self.ids), batch_size):
            chunk = list(self.ids[i:i + batch_size])
            yield chunk, self.collate(chunk)


@dataclass
class CalibrationSet:
    info: CalibrationInfo
    batches: list[dict[str, torch.Tensor]]  # model inputs, each with `labels` (IGNORE where no loss)
    spare: SparePool | None = None
    batch_size: int = 8

    @property
    def num_tokens(self) -> int:
        return int(sum(b["input_ids"].numel() for b in self.batches))

    def spare_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """Up to `n` spare samples spread evenly over the pool, in model batches (the set is unchanged)."""
        if self.spare is None or not self.spare.ids or n < 1:
            return []
        pick = np.unique(np.linspace(0, len(self.spare.ids) - 1, min(n, len(self.spare.ids))).round().astype(int))
        ids = [self.spare.ids[i] for i in pick]
        return [self.spare.collate(ids[i:i + self.batch_size]) for i in range(0, len(ids), self.batch_size)]

    def extend(self, ids: list[int]) -> "CalibrationSet":
        """This set plus the spare samples `ids` (in their own batches); they leave the spare pool."""
        if not ids:
            return self
        assert self.spare is not None and set(ids) <= set(self.spare.ids), "extend() takes spare sample ids"
        chunks = [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        info = replace(self.info, samples=self.info.samples + len(ids),
                       tokens=self.info.tokens + self.spare.tokens(ids),
                       coverage_samples=self.info.coverage_samples + len(ids))
        taken = set(ids)
        rest = SparePool(tuple(i for i in self.spare.ids if i not in taken), self.spare.collate, self.spare.tokens)
        return CalibrationSet(info, self.batches + [self.spare.collate(c) for c in chunks], rest, self.batch_size)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A calibration batch without its labels: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


def to_device(inputs: dict, device: torch.device | str) -> dict:
    """Model inputs with every tensor on `device` (calibration batches are built on the CPU)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def labelled_predictions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] bool: position t's logits predict token t + 1, which carries a label."""
    return batch["labels"][:, 1:] != IGNORE


def vqa_format_for(config) -> VQAFormat:
    """The prompt format of a LLaVA-style config (image token id/count, image size)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise MopeqError("image-text calibration data needs a vision-language model")
    size = int(getattr(vision, "image_size", 64))
    tokens = int(getattr(config, "image_seq_length", (size // int(getattr(vision, "patch_size", 8))) ** 2))
    token_id = int(getattr(config, "image_token_index", getattr(config, "image_token_id", 2)))
    return VQAFormat(image_token_id=token_id, image_tokens=tokens, image_size=size)


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MopeqError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
        return texts
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise MopeqError(f"{path} is not UTF-8 text; pass a .txt, .jsonl or VQA .npz file") from None


def load_text(path: Path, tokenizer, samples: int, seq_len: int, batch_size: int) -> CalibrationSet:
    texts = _read_texts(path)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(texts) > 1 and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    windows = len(ids) // seq_len
    if windows < 1:
        raise MopeqError(
            f"calibration data {path} has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    n = min(samples, windows)
    every = torch.tensor(ids[:windows * seq_len], dtype=torch.long).view(windows, seq_len)
    chosen = np.unique(np.linspace(0, windows - 1, n).round().astype(int))  # spread over the whole file
    n = len(chosen)
    batches = [{"input_ids": b, "labels": b.clone()} for b in every[chosen].split(batch_size)]
    info = CalibrationInfo(str(path.resolve()), sha256_file(path), "text", n, seq_len, n * seq_len)
    spare = SparePool(tuple(sorted(set(range(windows)) - set(chosen.tolist()))),
                      lambda w: {"input_ids": every[w], "labels": every[w].clone()}, lambda w: len(w) * seq_len)
    return CalibrationSet(info, batches, spare, batch_size)


def read_vqa(path: Path, image_size: int | None = None) -> dict[str, np.ndarray]:
    """images/questions/answers (and tasks if present) from an .npz or a folder with a .jsonl."""
    if path.is_dir():
        metas = sorted(path.glob("*.jsonl"))
        if not metas:
            raise MopeqError(f"{path} holds no .jsonl of image/question/answer records")
        rows = [json.loads(line) for line in metas[0].read_text().splitlines() if line.strip()]
        try:
            images = [load_image(str(path / r["image"]), image_size or 64, fit=True) for r in rows]
            out = {"images": np.stack(images), "questions": np.array([r["question"] for r in rows]),
                   "answers": np.array([str(r["answer"]) for r in rows])}
        except (KeyError, ValueError) as e:
            raise MopeqError(f"{metas[0]}: bad record ({e}); each line needs image, question, answer") from None
        out["tasks"] = np.array([r.get("task", "") for r in rows])
        return out
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise MopeqError(f"cannot read VQA data {path}: {e}") from None
    missing = {"images", "questions", "answers"} - set(data)
    if missing:
        raise MopeqError(f"{path} lacks {sorted(missing)}; a VQA .npz needs images, questions, answers")
    if data["images"].dtype != np.uint8 or data["images"].ndim != 4:
        raise MopeqError(f"{path}: images must be uint8 [N, S, S, 3], got {data['images'].dtype} {data['images'].shape}")
    return data


def vqa_examples(fmt: VQAFormat, tokenizer, questions, answers) -> list[tuple[list[int], list[int]]]:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(fmt.prompt_ids(enc, str(q)), fmt.answer_ids(enc, str(a), tokenizer.eos_token_id))
            for q, a in zip(questions, answers)]


def collate_vqa(examples, pixel_values: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+answer sequences; loss only on the answer tokens."""
    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(examples):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)
        mask[i, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.from_numpy(pixel_values)}


def load_vqa(path: Path, tokenizer, config, samples: int, batch_size: int) -> CalibrationSet:
    fmt = vqa_format_for(config)
    data = read_vqa(path, fmt.image_size)
    total = len(data["questions"])
    n = min(samples, total)
    if n < 1:
        raise MopeqError(f"VQA data {path} is empty")
    try:
        pixels = fmt.pixel_values(data["images"][:n])
    except ValueError as e:
        raise MopeqError(f"{path}: {e}") from None
    examples = vqa_examples(fmt, tokenizer, data["questions"], data["answers"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate_vqa(examples[i:i + batch_size], pixels[i:i + batch_size], pad) for i in range(0, n, batch_size)]
    digest = sha256_file(path) if path.is_file() else sha256_bytes(b"".join(p.read_bytes() for p in sorted(path.iterdir())))
    answer_tokens = lambda idx: sum(len(examples[i][1]) for i in idx)  # noqa: E731
    info = CalibrationInfo(str(path.resolve()), digest, "vqa", n,
                           max(len(p) + len(a) for p, a in examples[:n]), answer_tokens(range(n)))
    spare = SparePool(tuple(range(n, total)),
                      lambda idx: collate_vqa([examples[i] for i in idx], fmt.pixel_values(data["images"][idx]), pad),
                      answer_tokens)
    return CalibrationSet(info, batches, spare, batch_size)


def check_sizes(samples: int, seq_len: int, batch_size: int) -> None:
    """The sample count, text window length and batch size a calibration set can be built with."""
    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise MopeqError("--samples and --batch-size must be >= 1 and --seq-len >= 2")


def calibration_kind(path: str | Path) -> str:
    """"vqa" for an .npz or a folder (image-text), else "text"."""
    path = Path(path)
    return "vqa" if path.suffix == ".npz" or path.is_dir() else "text"


def load_calibration(path: str | Path, tokenizer, config, *, samples: int = 32, seq_len: int = 256,
                     batch_size: int = 8) -> CalibrationSet:
    """Dispatch on the data's form; raise MopeqError with a fix for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise MopeqError(f"calibration data not found: {path}")
    check_sizes(samples, seq_len, batch_size)
    is_vlm = getattr(config, "vision_config", None) is not None
    if calibration_kind(path) == "vqa":
        if not is_vlm:
            raise MopeqError(f"{path} is image-text data but the model is text-only; pass a .txt or .jsonl file")
        return load_vqa(path, tokenizer, config, samples, batch_size)
    if path.stat().st_size == 0:
        raise MopeqError(f"calibration data {path} is empty")
    return load_text(path, tokenizer, samples, seq_len, batch_size)
