"""Next-token choice from float32 logits: greedy, or temperature sampling with top-k / top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus mass kept
    seed: int = 0

    def __post_init__(self):
        ok = (math.isfinite(self.temperature) and self.temperature >= 0 and math.isfinite(self.top_p)
              and 0 < self.top_p <= 1 and isinstance(self.top_k, int) and self.top_k >= 0)
        if not ok:
            raise InputError(f"sampling needs a finite temperature >= 0, 0 < top_p <= 1 and an integer top_k >= 0 "
                             f"(got temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k})")


def choose(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token id from logits [V]."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-z, kind="stable")  # stable: ties resolve the same way on every machine
    if cfg.top_k:
        order = order[: cfg.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if cfg.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), cfg.top_p) + 1)  # smallest prefix reaching top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
