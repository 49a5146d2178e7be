"""The quantized checkpoint folder (QDIR): packed experts in safetensors plus a versioned record.

    QDIR/
      quantized.json       QuantizedRecord: source model identity, plan, method, group size,
                           calibration provenance, per-expert bits/errors, sizes, file hashes
      experts/<experts path>.safetensors
                           one file per MoE layer, written as the layer is done (the stage never holds
                           more than one layer's codes): the tensors of docs/FORMAT.md §4 (codes, scales
                           and zeros in tiles of 16 rows), named "<experts path>.w1.q2", ...,
                           "<experts path>.w2.zeros"
      dense.safetensors    (when the plan's `dense` widths or --quantize-dense quantize any) packed
                           attention / shared-expert / dense-MLP / lm_head matrices and the embedding
                           table, named "<module path>.words|scales|zeros[|bias]" (row-major: dense
                           matrices are not expert matrices and are not tiled)

Non-expert weights are not copied: the record names the source checkpoint and its weights hash, and
`load_quantized` refuses a source whose hash differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..errors import MopeqError
from ..fsutil import read_json, sha256_file, write_json
from ..models.loading import ModelInfo
from .packing import LAYER_TENSOR_NAMES, LAYOUT_VERSION, pack_codes, split_by_width, tile_rows
from .pipeline import ExpertResult
from .primitives import QuantizedMatrix

SCHEMA_VERSION = 2  # 2: one experts file per MoE layer
RECORD = "quantized.json"
EXPERTS_DIR = "experts"
DENSE_FILE = "dense.safetensors"


def layer_file(experts_path: str) -> str:
    return f"{EXPERTS_DIR}/{experts_path}.safetensors"


@dataclass(frozen=True)
class LayerRecord:
    experts_path: str
    block_path: str
    layer: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    expert_bits: tuple[int, ...]


@dataclass(frozen=True)
class DenseRecord:
    path: str
    bits: int
    in_features: int
    out_features: int
    has_bias: bool
    kind: str = "linear"  # "linear" (a matrix [out, in]) | "embedding" (a table [rows, dim]: out = rows, in = dim)
    group_size: int | None = None  # None: the checkpoint's group size


def layer_tensors(results: list[ExpertResult]) -> dict[str, np.ndarray]:
    """Pack one layer's experts into the tensors of FORMAT.md §4: codes grouped by width, codes, scales and
    zeros in tiles of 16 rows ([E, rows/16, G, 16] for the scales and zeros)."""
    bits = [r.bits for r in results]
    out: dict[str, np.ndarray] = {}
    for m in ("w1", "w2"):
        mats = [getattr(r, m) for r in results]
        for b, words in split_by_width([q.codes.numpy() for q in mats], bits).items():
            out[f"{m}.q{b}"] = words
        out[f"{m}.scales"] = tile_rows(np.stack([q.scales.numpy() for q in mats]).astype(np.float16))
        out[f"{m}.zeros"] = tile_rows(np.stack([q.zeros.numpy() for q in mats]).astype(np.uint8))
    return out


def dense_tensors(path: str, q: QuantizedMatrix, bias: torch.Tensor | None) -> dict[str, np.ndarray]:
    d = {f"{path}.words": pack_codes(q.codes.numpy(), q.bits), f"{path}.scales": q.scales.numpy(),
         f"{path}.zeros": q.zeros.numpy()}
    if bias is not None:
        d[f"{path}.bias"] = bias.detach().half().numpy()
    return d


def size_report(layers: list[LayerRecord], expert_bytes: int, total_params: int, expert_params: int,
                dense_bytes: int, dense_params: int) -> dict:
    """Honest sizes: nominal vs effective bits per routed-expert weight, and whole-model bytes vs float16."""
    weights = sum(3 * l.num_experts * l.hidden_size * l.intermediate_size for l in layers)
    nominal = sum(b * 3 * l.hidden_size * l.intermediate_size for l in layers for b in l.expert_bits)
    expert_bytes = int(expert_bytes)
    fp16_rest = 2 * (total_params - expert_params - dense_params)
    return {
        "expert_weights": int(weights),
        "nominal_bits": nominal / weights,
        "effective_bits": expert_bytes * 8 / weights,
        "expert_bytes": expert_bytes,
        "expert_bytes_float16": int(2 * weights),
        "model_bytes": int(fp16_rest + expert_bytes + dense_bytes),
        "model_bytes_float16": int(2 * total_params),
    }


def write_layer(out: Path, experts_path: str, tensors: dict[str, np.ndarray]) -> None:
    """One MoE layer's packed tensors (names relative to the layer) into `out` (a staging folder)."""
    (out / EXPERTS_DIR).mkdir(exist_ok=True)
    save_file({f"{experts_path}.{n}": t for n, t in tensors.items()}, str(out / layer_file(experts_path)),
              metadata={"layout_version": str(LAYOUT_VERSION)})


def write_record(out: Path, record: dict, dense: dict[str, np.ndarray]) -> None:
    """After every layer file: the dense file, then the record holding every file's size and hash."""
    names = [layer_file(l["experts_path"]) for l in record["layers"]]
    if dense:
        save_file(dense, str(out / DENSE_FILE), metadata={"layout_version": str(LAYOUT_VERSION)})
        names.append(DENSE_FILE)
    files = {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size} for n in names}
    write_json(out / RECORD, dict(record, files=files))


def write_checkpoint(out: Path, record: dict, tensors: dict[str, np.ndarray], dense: dict[str, np.ndarray]) -> None:
    """The whole QDIR from tensors named "<experts path>.<tensor>" (all layers at once; the stage writes
    layer by layer with `write_layer`, then `write_record`)."""
    for l in record["layers"]:
        path = l["experts_path"]
        write_layer(out, path, {n: tensors[f"{path}.{n}"] for n in LAYER_TENSOR_NAMES})
    write_record(out, record, dense)


@dataclass
class QuantizedCheckpoint:
    path: Path
    record: dict
    model: ModelInfo
    layers: list[LayerRecord]
    dense: list[DenseRecord]
    tensors: dict[str, np.ndarray]
    dense_tensors: dict[str, np.ndarray]

    @property
    def group_size(self) -> int:
        return int(self.record["group_size"])

    def layer_tensors(self, layer: LayerRecord) -> dict[str, np.ndarray]:
        return {n: self.tensors[f"{layer.experts_path}.{n}"] for n in LAYER_TENSOR_NAMES}


def _requantize_command(qdir: Path, rec: dict) -> str:
    """The `quantize` that made the checkpoint, as far as its record tells (for a refusal's message)."""
    def arg(flag: str, value) -> str:
        return f" {flag} {value}" if value not in (None, "") else ""

    model, plan = rec.get("model"), rec.get("plan")
    return ("mopeq-export quantize" + arg("--model", model.get("path") if isinstance(model, dict) else None)
            + arg("--plan", plan.get("path") if isinstance(plan, dict) else None) + arg("--method", rec.get("method"))
            + arg("--group-size", rec.get("group_size")) + f" --out {qdir} --force")


def read_checkpoint(qdir: str | Path) -> QuantizedCheckpoint:
    """Read and verify a QDIR: schema/layout versions, file sizes and hashes, tensor names."""
    qdir = Path(qdir)
    if not qdir.is_dir():
        raise MopeqError(f"quantized checkpoint folder not found: {qdir}")
    rec = read_json(qdir / RECORD, "quantized checkpoint record")
    if rec.get("schema_version") != SCHEMA_VERSION:
        raise MopeqError(f"{qdir / RECORD}: schema version {rec.get('schema_version')} is not {SCHEMA_VERSION} "
                         "(a checkpoint of another toolchain version); re-run mopeq-export quantize")
    if rec.get("layout_version") != LAYOUT_VERSION:
        raise MopeqError(f"{qdir}: packed layout version {rec.get('layout_version')} is not supported (this toolchain "
                         f"reads version {LAYOUT_VERSION}, docs/FORMAT.md §6); rebuild the quantized checkpoint: "
                         f"{_requantize_command(qdir, rec)}")
    for name, meta in rec.get("files", {}).items():
        p = qdir / name
        if not p.resolve().is_relative_to(qdir.resolve()):
            raise MopeqError(f"{qdir / RECORD} lists a file outside the checkpoint ({name}); it was tampered with")
        if not p.is_file():
            raise MopeqError(f"{qdir} is missing {name}; the checkpoint is incomplete, re-run quantize")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise MopeqError(f"{p} does not match its recorded size/hash; the checkpoint was modified, re-run quantize")
    layers = [LayerRecord(**{**l, "expert_bits": tuple(l["expert_bits"])}) for l in rec["layers"]]
    dense = [DenseRecord(**d) for d in rec.get("dense", [])]
    tensors = {}
    for l in layers:
        name = layer_file(l.experts_path)
        if name not in rec.get("files", {}):
            raise MopeqError(f"{qdir / RECORD} lists no {name}; the checkpoint is incomplete, re-run quantize")
        layer = load_file(str(qdir / name))
        missing = [n for n in LAYER_TENSOR_NAMES if f"{l.experts_path}.{n}" not in layer]
        if missing:
            raise MopeqError(f"{qdir / name} lacks {l.experts_path}.{missing[0]}; re-run quantize")
        tensors.update(layer)
    dt = load_file(str(qdir / DENSE_FILE)) if dense else {}
    return QuantizedCheckpoint(qdir, rec, ModelInfo.from_json(rec["model"]), layers, dense, tensors, dt)


def layer_record(layer, results: list[ExpertResult]) -> LayerRecord:
    return LayerRecord(layer.experts_path, layer.block_path, layer.layer, layer.num_experts, layer.hidden_size,
                       layer.intermediate_size, layer.activation, tuple(r.bits for r in results))


def to_json_layers(layers: list[LayerRecord]) -> list[dict]:
    return [dict(asdict(l), expert_bits=list(l.expert_bits)) for l in layers]
