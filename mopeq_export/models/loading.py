"""Load a Hugging Face MoE checkpoint from a local folder, with checks that give actionable errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MopeqError
from ..fsutil import sha256_file

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a source checkpoint, recorded in every downstream record."""

    path: str
    name: str
    architecture: str
    model_type: str
    is_vlm: bool
    config_sha256: str
    weights_sha256: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files; pickled checkpoints are refused (they can run code)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
        hint = " (only pickle files found; convert them to safetensors)" if pickles else ""
        raise MopeqError(f"no *.safetensors weights in {model_dir}{hint}")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as e:
            raise MopeqError(f"{index} is malformed ({e}); re-download the checkpoint") from None
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise MopeqError(f"{model_dir} is missing weight shards listed in its index: {', '.join(missing)}")
    return files


def _check_safetensors(path: Path) -> None:
    """Read each file's header so a truncated or corrupt shard fails here, not deep in transformers."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
    except Exception as e:  # safetensors raises several exception types for corrupt files
        raise MopeqError(f"corrupt or unreadable weights file {path}: {e}") from None
    # the data section must be as long as the header says
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + n + end:
        raise MopeqError(f"weights file {path} is truncated ({path.stat().st_size} bytes); re-copy it")


def model_info(model_dir: str | Path) -> ModelInfo:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MopeqError(f"model folder not found: {model_dir}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MopeqError(f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MopeqError(f"cannot read {cfg_path}: {e}") from None
    files = weight_files(model_dir)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    arch = (cfg.get("architectures") or ["unknown"])[0]
    return ModelInfo(
        path=str(model_dir.resolve()),
        name=model_dir.resolve().name,
        architecture=arch,
        model_type=cfg.get("model_type", "unknown"),
        is_vlm="vision_config" in cfg,
        config_sha256=sha256_file(cfg_path),
        weights_sha256=h.hexdigest(),
    )


def load_model(
    model_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> tuple[torch.nn.Module, ModelInfo]:
    """Load a checkpoint for analysis/quantization (float32 compute on CPU by default).

    Eager attention is the default because `analyze --curvature hessian` needs double backward,
    which the CPU SDPA kernel does not provide.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    info = model_info(model_dir)
    for f in weight_files(Path(model_dir)):
        _check_safetensors(f)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MopeqError(f"{model_dir} needs its own code; rerun with --trust-remote-code if you trust it") from None
        raise MopeqError(f"cannot read the config in {model_dir}: {e}") from None
    auto = AutoModelForImageTextToText if info.is_vlm else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            model_dir,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise MopeqError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, info


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MopeqError(f"no usable tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None
