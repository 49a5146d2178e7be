"""Fidelity of a quantized model against the float16 original (PyTorch side).

Text: perplexity over windows of 256 tokens (next-token cross-entropy, exp of the mean), the mean KL
divergence KL(p_ref || p_quant) of the next-token distributions, and top-1 agreement.
VQA: exact-match accuracy of greedy answers (prompt format in mopeq_runtime.prompt), plus KL and
top-1 agreement on the teacher-forced answer tokens.

The reference model runs beside the candidate batch by batch, so no logits are stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .calibration import collate_vqa, read_vqa, to_device, vqa_examples, vqa_format_for
from .errors import MopeqError

Forward = Callable[[dict], torch.Tensor]  # model inputs -> logits [B, T, V] (float32)


@dataclass(frozen=True)
class TextMetrics:
    windows: int
    tokens: int
    ppl_ref: float
    ppl: float
    ppl_ratio: float
    kl: float
    top1_agreement: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VQAMetrics:
    samples: int
    accuracy_ref: float
    accuracy: float
    accuracy_retention: float
    answer_kl: float
    answer_top1_agreement: float
    per_task: dict

    def to_json(self) -> dict:
        return asdict(self)


def text_windows(path: str | Path, tokenizer, seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise MopeqError(f"evaluation data not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MopeqError(f"evaluation data {p} is not UTF-8 text; a text model is evaluated on a .txt file") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 1:
        raise MopeqError(f"evaluation data {p} has fewer than {seq_len} tokens")
    if max_windows:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def torch_forward(model) -> Forward:
    """Logits of a PyTorch model on its own device, returned as float32 on the CPU."""
    dev = next(model.parameters()).device

    def fwd(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(**to_device(inputs, dev)).logits.float().cpu()
    return fwd


@dataclass
class _Acc:
    """Sums and counts; metrics are derived at the end."""

    nll_ref: float = 0.0
    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    n: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        ref_logits, logits, targets = ref_logits.cpu(), logits.cpu(), targets.cpu()
        keep = targets != -100
        lr = torch.log_softmax(ref_logits[keep], -1)
        lq = torch.log_softmax(logits[keep], -1)
        t = targets[keep]
        self.nll_ref += float(-lr.gather(-1, t[:, None]).sum())
        self.nll += float(-lq.gather(-1, t[:, None]).sum())
        self.kl += float((lr.exp() * (lr - lq)).sum())
        self.agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
        self.n += int(keep.sum())


def evaluate_text(ref: Forward, cand: Forward, windows: torch.Tensor, batch_size: int = 8,
                  progress=None) -> TextMetrics:
    acc = _Acc()
    for batch in windows.split(batch_size):
        inputs = {"input_ids": batch}
        targets = torch.cat([batch[:, 1:], torch.full((batch.shape[0], 1), -100)], 1)
        acc.add(ref(inputs), cand(inputs), targets)
        if progress:
            progress(batch.shape[0])
    ppl_ref, ppl = float(np.exp(acc.nll_ref / acc.n)), float(np.exp(acc.nll / acc.n))
    return TextMetrics(len(windows), acc.n, ppl_ref, ppl, ppl / ppl_ref, acc.kl / acc.n, acc.agree / acc.n)


Generate = Callable[[dict, int], list[list[int]]]  # (inputs of same-length prompts, max_new) -> new token ids


def torch_generate(model, eos_id: int) -> Generate:
    dev = next(model.parameters()).device

    def gen(inputs: dict, max_new: int) -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(**to_device(inputs, dev), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=eos_id)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [seq[: seq.index(eos_id)] if eos_id in seq else seq for seq in new]
    return gen


def _greedy_answers(gen: Generate, examples, pixels: np.ndarray, decode, max_new: int) -> list[str]:
    """Greedy answers, batching prompts of equal length (no padding needed)."""
    answers = [""] * len(examples)
    by_len: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(examples):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        for chunk in [idx[j:j + 32] for j in range(0, len(idx), 32)]:
            ids = torch.tensor([examples[i][0] for i in chunk])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "pixel_values": torch.from_numpy(pixels[chunk])}
            for i, toks in zip(chunk, gen(inputs, max_new)):
                answers[i] = decode(toks).strip()
    return answers


def evaluate_vqa(ref: Forward, cand: Forward, ref_gen: Generate, cand_gen: Generate, data_path, tokenizer, config,
                 max_samples: int | None = None, batch_size: int = 16, max_new: int = 8) -> VQAMetrics:
    fmt = vqa_format_for(config)
    data = read_vqa(Path(data_path), fmt.image_size)
    n = len(data["questions"]) if not max_samples else min(max_samples, len(data["questions"]))
    pixels = fmt.pixel_values(data["images"][:n])
    answers = [str(a) for a in data["answers"][:n]]
    examples = vqa_examples(fmt, tokenizer, data["questions"][:n], answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acc = _Acc()
    for i in range(0, n, batch_size):
        batch = collate_vqa(examples[i:i + batch_size], pixels[i:i + batch_size], pad)
        labels = batch.pop("labels")
        targets = torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], 1)
        acc.add(ref(batch), cand(batch), targets)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    got_ref = _greedy_answers(ref_gen, examples, pixels, decode, max_new)
    got = _greedy_answers(cand_gen, examples, pixels, decode, max_new)
    right_ref = np.array([a == b for a, b in zip(got_ref, answers)])
    right = np.array([a == b for a, b in zip(got, answers)])
    tasks = data.get("tasks", np.array([""] * n))[:n]
    per_task = {str(t): {"ref": float(right_ref[tasks == t].mean()), "quant": float(right[tasks == t].mean())}
                for t in np.unique(tasks)}
    acc_ref, acc_q = float(right_ref.mean()), float(right.mean())
    return VQAMetrics(n, acc_ref, acc_q, acc_q / max(acc_ref, 1e-12), acc.kl / acc.n, acc.agree / acc.n, per_task)


def evaluate_model(model_dir, qdir, data, *, max_windows: int | None = None, max_samples: int | None = None,
                   device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> dict:
    """Load the float16 original and the quantized checkpoint on `device`, and compare them on `data`."""
    from .devices import Meter, resolve_device, resolve_dtype
    from .models.loading import checkpoint_params, load_model, load_tokenizer
    from .quantization.loader import load_quantized

    from .calibration import calibration_kind
    from .models.loading import model_info

    if not Path(data).exists():
        raise MopeqError(f"evaluation data not found: {data}")
    is_vlm = model_info(model_dir).is_vlm
    kind = calibration_kind(data)
    if is_vlm != (kind == "vqa"):
        raise MopeqError(f"{data} is {'VQA (image-text)' if kind == 'vqa' else 'text'} data but the model is a "
                         f"{'vision-language' if is_vlm else 'text'} model; give "
                         f"{'a VQA .npz or folder' if is_vlm else 'a .txt file'}")
    dev = resolve_device(device)
    compute = resolve_dtype(dtype, checkpoint_params(model_dir))
    meter = Meter(dev, compute)
    ref, info = load_model(model_dir, device=dev, dtype=compute)
    cand = load_quantized(qdir, model_dir, device=dev, dtype=compute)
    tok = load_tokenizer(model_dir)
    if info.is_vlm:
        eos = tok.eos_token_id
        m = evaluate_vqa(torch_forward(ref), torch_forward(cand), torch_generate(ref, eos), torch_generate(cand, eos),
                         data, tok, ref.config, max_samples=max_samples)
        kind = "vqa"
    else:
        m = evaluate_text(torch_forward(ref), torch_forward(cand), text_windows(data, tok, max_windows=max_windows))
        kind = "text"
    return {"schema_version": 1, "model": info.name, "quantized": str(Path(qdir).resolve()),
            "data": str(Path(data).resolve()), "kind": kind, "metrics": m.to_json(),
            "resources": meter.done().to_json()}
