"""Load a Hugging Face MoE checkpoint from a local folder, with checks that give actionable errors."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MopeqError
from ..fsutil import cached_sha256, default_cache, sha256_file

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
    broken = [f.name for f in files if not f.is_file()]  # a dangling symlink (a half-copied hub cache)
    if broken:
        raise MopeqError(f"{model_dir}: weight file {broken[0]} is a broken link or not a file; re-download or "
                         "re-copy the checkpoint")
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
    cfg = read_config_json(model_dir)
    files = weight_files(model_dir)
    key = (str(model_dir.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                           for f in [model_dir / "config.json", *files]))
    if key in _INFO_MEMO:
        return _INFO_MEMO[key]
    table = default_cache() / "file-hashes.json"
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + cached_sha256(f, table).encode() + b"\n")
    arch = (cfg.get("architectures") or ["unknown"])[0]
    info = ModelInfo(
        path=str(model_dir.resolve()),
        name=model_dir.resolve().name,
        architecture=arch,
        model_type=cfg.get("model_type", "unknown"),
        is_vlm="vision_config" in cfg,
        config_sha256=sha256_file(model_dir / "config.json"),
        weights_sha256=h.hexdigest(),
    )
    _INFO_MEMO[key] = info
    return info


_INFO_MEMO: dict[tuple, ModelInfo] = {}


def read_config_json(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MopeqError(f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MopeqError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise MopeqError(f"{cfg_path} is not a JSON object; point --model at a Hugging Face checkpoint folder")
    return cfg


def tensor_sizes(model_dir: str | Path) -> dict[str, int]:
    """Element count of every checkpoint tensor, from the safetensors headers alone (no weight is read)."""
    sizes = {}
    for f in weight_files(Path(model_dir)):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, v in header.items():
            if name != "__metadata__":
                sizes[name] = math.prod(v["shape"])
    return sizes


def checkpoint_params(model_dir: str | Path) -> int:
    return sum(tensor_sizes(model_dir).values())


def check_weights(model_dir: str | Path) -> None:
    """Every shard's header and length, before any stage spends time on the model."""
    for f in weight_files(Path(model_dir)):
        _check_safetensors(f)


def load_model(
    model_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "eager",
) -> tuple[torch.nn.Module, ModelInfo]:
    """The whole checkpoint on `device` in `dtype` (see mopeq_export/devices.py for the choice).

    Built as a skeleton and filled one decoder layer at a time (`onload.py`), so the transient memory of
    transformers' expert conversions is one layer's, not the model's. Eager attention is the default because
    `analyze --curvature hessian` needs double backward, which the CPU SDPA kernel does not provide.
    """
    from .adapters import decoder_layer_paths
    from .onload import WeightSource, load_full, skeleton

    info = model_info(model_dir)
    check_weights(model_dir)
    model = skeleton(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                     trust_remote_code=trust_remote_code)
    source = WeightSource(model_dir, model)
    try:
        load_full(model_dir, model, source, torch.device(device), chunks=[p + "." for p in decoder_layer_paths(model)])
    except (OSError, RuntimeError) as e:
        raise MopeqError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    finally:
        source.close()
    return model, info


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MopeqError(f"no usable tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None
