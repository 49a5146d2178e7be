"""What the quantizer needs from a bit plan (plan.json of `mopeq-export plan`), with its checks."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MopeqError
from ..fsutil import read_json, sha256_file
from ..models.loading import ModelInfo


@dataclass(frozen=True)
class PlanBits:
    bits: dict[str, int]
    method: str
    avg_bits: float
    weights_sha256: str | None
    sha256: str
    dense: dict[str, int] = field(default_factory=dict)  # class -> width (dense.py); 16 = float

    def check_model(self, info: ModelInfo) -> None:
        if self.weights_sha256 and self.weights_sha256 != info.weights_sha256:
            raise MopeqError(f"the plan was made for another model (weights hash {self.weights_sha256[:12]}… "
                             f"!= {info.weights_sha256[:12]}… of {info.path}); re-run analyze and plan for this model")

    def check_experts(self, names: list[str]) -> None:
        extra = [n for n in self.bits if n not in set(names)]
        if extra:
            close = difflib.get_close_matches(extra[0], names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise MopeqError(f"the plan names {len(extra)} expert(s) the model does not have, e.g. {extra[0]}{hint}")
        missing = [n for n in names if n not in self.bits]
        if missing:
            raise MopeqError(f"the plan misses {len(missing)} of the model's experts, e.g. {missing[0]}; "
                             "re-run plan on this model's sensitivity file")


def read_plan_bits(path: str | Path) -> PlanBits:
    d = read_json(path, "bit plan")
    if not isinstance(d, dict) or d.get("kind") != "mopeq.bitplan":
        kind = d.get("kind") if isinstance(d, dict) else None
        raise MopeqError(f"{path} is not a bit plan (kind {kind!r}, expected 'mopeq.bitplan'); create one with "
                         "mopeq-export plan")
    experts = d.get("experts")
    if not isinstance(experts, dict) or not experts:
        raise MopeqError(f"{path} is not a bit plan (no 'experts' map); create one with mopeq-export plan")
    for k, v in experts.items():  # 2.5 or "3" would be silently truncated or parsed: refuse them
        if isinstance(v, bool) or not isinstance(v, int):
            raise MopeqError(f"{path}: expert {k} has bits {v!r}; every width must be a JSON integer (2, 3, 4 or 8)")
    bits = {str(k): int(v) for k, v in experts.items()}
    model = d.get("model") or {}
    from .dense import check_dense

    return PlanBits(bits, str(d.get("method", "?")), float(d.get("avg_bits", 0.0)),
                    model.get("weights_sha256"), sha256_file(path), check_dense(d.get("dense"), str(path)))
