"""The bundle manifest (docs/BUNDLE.md): its schema as typed records, reading, and hash verification.

Lives in the runtime because the device needs it to trust a bundle; the toolchain's writer
(`mopeq_export/bundle.py`) builds the same records. NumPy-free, torch-free: only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError

SCHEMA_VERSION = 2  # 2: per-layer KV-cache shapes (model.kv_cache) instead of kv_heads/head_dim
READABLE_SCHEMAS = (1, 2)
KIND = "mopeq.bundle"
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSig:
    name: str
    dtype: str  # numpy name: float32, float16, int64, ...
    shape: tuple  # ints for fixed dims, strings for symbolic ones


@dataclass(frozen=True)
class GraphEntry:
    name: str  # decoder | embed | vision
    file: str
    data_files: tuple[str, ...]  # ONNX external data, kept beside the graph
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]


@dataclass(frozen=True)
class TargetEntry:
    name: str
    arches: tuple[str, ...]  # host machines (platform.machine()) the bundle is meant for
    activation_dtype: str
    providers: tuple[str, ...]  # execution providers, preferred first
    memory_bytes: int  # the share of device memory the model may use
    context_length: int  # tokens the memory check was made for; the runtime enforces it


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    model_type: str
    is_vlm: bool
    config_sha256: str
    weights_sha256: str
    num_layers: int
    kv_cache: tuple  # per layer [key heads, key dim, value heads, value dim] (past_key_values.{i}.key / .value)
    hidden: int
    vocab: int
    max_position_embeddings: int


@dataclass(frozen=True)
class TokenizerEntry:
    file: str  # tokenizer.json, read with the `tokenizers` library
    config_file: str | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


@dataclass(frozen=True)
class KernelEntry:
    status: str  # "binary": library included; "source": only csrc + recipe; "none"
    library: str | None  # bundle path of the shared library when status == "binary"
    arch: str | None  # machine the library was compiled for
    source: str | None  # bundle folder with the C++ sources when status == "source"
    build: str  # how to build it on the device
    note: str  # said plainly: what runs when no library is loaded


@dataclass(frozen=True)
class DenseWeights:
    """`quantization.dense`: width per class of dense (non-expert) weight, 16 = kept float (attention,
    shared_experts, dense_mlp, lm_head, embeddings; docs/BUNDLE.md), and the quantized matrices and their
    parameters. Bundles of older toolchains have none: their dense weights are float."""

    widths: dict
    matrices: int
    params: int

    @classmethod
    def read(cls, quantization: dict) -> "DenseWeights | None":
        d = quantization.get("dense")
        if d is None:
            return None
        rec = _rec(cls, d)
        if not all(isinstance(k, str) and type(v) is int for k, v in rec.widths.items()):
            raise TypeError("quantization.dense.widths must map class names to integer widths")
        return rec


@dataclass(frozen=True)
class Manifest:
    target: TargetEntry
    model: ModelEntry
    toolchain: dict
    plan: dict
    quantization: dict
    graphs: tuple[GraphEntry, ...]
    tokenizer: TokenizerEntry
    kernel: KernelEntry
    validation: dict
    files: tuple[FileEntry, ...]
    prompt: dict | None = None  # VQA prompt format (mopeq_runtime.prompt.VQAFormat) for a VLM
    genai: dict | None = None  # what the bundle holds for ONNX Runtime GenAI, or why nothing (mopeq_export/genai.py)
    schema_version: int = SCHEMA_VERSION
    kind: str = KIND

    @property
    def dense(self) -> DenseWeights | None:
        return DenseWeights.read(self.quantization)

    def graph(self, name: str) -> GraphEntry:
        for g in self.graphs:
            if g.name == name:
                return g
        raise BundleError(f"the bundle has no {name!r} graph (it has {', '.join(g.name for g in self.graphs)})")

    def to_json(self) -> dict:
        d = _plain(asdict(self))
        head = {"schema_version": d.pop("schema_version"), "kind": d.pop("kind")}
        return {**head, **d}

    def dumps(self) -> str:
        """The exact bytes written to manifest.json (deterministic: fixed key order and indent)."""
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, d: Any, source: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise BundleError(f"{source} is not a MoPEQ bundle manifest (kind != {KIND})")
        if d.get("schema_version") not in READABLE_SCHEMAS:
            raise BundleError(f"{source} has schema version {d.get('schema_version')!r}; this runtime reads versions "
                              f"{', '.join(map(str, READABLE_SCHEMAS))}: rebuild the bundle with a matching toolchain "
                              "or update the runtime")
        try:
            model = dict(d["model"])
            if d["schema_version"] == 1:  # one grouped-query shape for every layer
                model["kv_cache"] = [[model["kv_heads"], model["head_dim"]] * 2] * model["num_layers"]
            kv = model["kv_cache"]
            if (not isinstance(kv, list) or len(kv) != model.get("num_layers")
                    or not all(isinstance(k, list) and len(k) == 4 and all(type(x) is int and x > 0 for x in k) for k in kv)):
                raise ValueError("model.kv_cache must list [key heads, key dim, value heads, value dim] (positive "
                                 "integers) for each of num_layers layers")
            model["kv_cache"] = tuple(tuple(k) for k in kv)
            DenseWeights.read(dict(d["quantization"]))  # a malformed record is refused here
            if not isinstance(d["graphs"], list) or "decoder" not in {g.get("name") for g in d["graphs"]}:
                raise ValueError("no decoder graph listed")
            return cls(
                target=_rec(TargetEntry, d["target"]), model=_rec(ModelEntry, model),
                toolchain=dict(d["toolchain"]), plan=dict(d["plan"]), quantization=dict(d["quantization"]),
                graphs=tuple(_graph(g) for g in d["graphs"]), tokenizer=_rec(TokenizerEntry, d["tokenizer"]),
                kernel=_rec(KernelEntry, d["kernel"]), validation=dict(d["validation"]),
                files=tuple(_rec(FileEntry, f) for f in d["files"]), prompt=d.get("prompt"),
                genai=_optional_dict(d, "genai"), schema_version=d["schema_version"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{source} is malformed ({type(e).__name__}: {e}); rebuild the bundle") from None


def _optional_dict(d: dict, key: str) -> dict | None:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise TypeError(f"{key} must be an object or absent, got {type(v).__name__}")
    return v


def _plain(x):
    """Tuples -> lists so the JSON form round-trips to the same bytes."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _conforms(v, tp) -> bool:
    """Whether a JSON value has a record field's declared type (bool is not an int here)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp in (str, bool, dict):
        return isinstance(v, tp)
    if tp is tuple or origin is tuple:
        if not isinstance(v, (list, tuple)):
            return False
        return not args or all(_conforms(x, args[0]) for x in v)
    return True


def _rec(cls, d: dict):
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__} must be an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in fields(cls):
        v = d[f.name]
        if not _conforms(v, hints[f.name]):
            raise TypeError(f"{cls.__name__}.{f.name} = {v!r:.40} is not of type {hints[f.name]}")
        kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def _graph(d: dict) -> GraphEntry:
    def sig(s) -> TensorSig:
        shape = s["shape"]
        if not isinstance(shape, list) or not all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)
                                                                         and x >= 0) for x in shape):
            raise ValueError(f"tensor {s.get('name')!r} has a malformed shape {shape!r:.40}")
        return _rec(TensorSig, {**s, "shape": shape})

    if not isinstance(d, dict) or not isinstance(d.get("inputs"), list) or not isinstance(d.get("outputs"), list):
        raise TypeError("a graph entry must be an object with 'inputs' and 'outputs' lists")
    return _rec(GraphEntry, {**d, "data_files": d["data_files"], "inputs": tuple(sig(s) for s in d["inputs"]),
                             "outputs": tuple(sig(s) for s in d["outputs"])})


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}; build one with `mopeq-export build`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged, rebuild or re-copy it") from None
    return Manifest.from_json(d, str(path))


def _safe_relpath(p: str) -> bool:
    pp = PurePosixPath(p)
    return bool(p) and not pp.is_absolute() and ".." not in pp.parts and "\\" not in p


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file exists with its size and sha256; nothing unlisted; every referenced file is listed."""
    listed = {f.path for f in manifest.files}
    for f in manifest.files:
        if not _safe_relpath(f.path):
            raise BundleError(f"manifest lists an unsafe path {f.path!r}; the bundle was tampered with")
        p = root / f.path
        if not p.is_file() or p.is_symlink():
            raise BundleError(f"bundle file {f.path} is missing; re-copy the whole bundle folder")
        if p.stat().st_size != f.size:
            raise BundleError(f"bundle file {f.path} has {p.stat().st_size} bytes, the manifest says {f.size}: "
                              "it was altered or truncated; re-copy the bundle")
        if sha256_file(p) != f.sha256:
            raise BundleError(f"bundle file {f.path} does not match its sha256 in the manifest: it was altered; "
                              "re-copy or rebuild the bundle")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(on_disk - listed - {MANIFEST, "manifest.sig"})
    if extra:
        raise BundleError(f"bundle holds files its manifest does not list ({', '.join(extra[:3])}); "
                          "it was modified after the build: remove them or rebuild")
    referenced = [g.file for g in manifest.graphs] + [d for g in manifest.graphs for d in g.data_files]
    referenced += [manifest.tokenizer.file] + ([manifest.kernel.library] if manifest.kernel.library else [])
    missing = [r for r in referenced if r not in listed]
    if missing:
        raise BundleError(f"manifest refers to {missing[0]} but does not list its hash; the manifest was edited")
