"""The bundle manifest (docs/BUNDLE.md): its schema as typed records, reading, and hash verification.

Lives in the runtime because the device needs it to trust a bundle; the toolchain's writer
(`mopeq_export/bundle.py`) builds the same records. NumPy-free, torch-free: only the standard library.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError
from .files import safe_relpath

SCHEMA_VERSION = 2  # 2: per-layer KV-cache shapes (model.kv_cache) instead of kv_heads/head_dim
READABLE_SCHEMAS = (1, 2)
KIND = "mopeq.bundle"
MANIFEST = "manifest.json"


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


def parse_manifest(data: bytes, source: str) -> Manifest:
    """The manifest of these exact bytes (the ones a signature covers), its values checked (check_values)."""
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, or a 5000-digit number
        raise BundleError(f"{source} is not valid JSON ({str(e)[:120]}); the bundle is damaged, rebuild or re-copy "
                          "it") from None
    m = Manifest.from_json(d, source)
    check_values(m, source)
    return m


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}; build one with `mopeq-export build`")
    return parse_manifest(path.read_bytes(), str(path))


# -- the bundle's own values ------------------------------------------------------------------------------
GRAPH_NAMES = ("decoder", "embed", "vision")
ACTIVATION_DTYPES = ("float32", "float16")
_HEX = set("0123456789abcdef")


def check_values(m: Manifest, source: str = MANIFEST) -> None:
    """The manifest's numbers against each other and against the decoder's declared signature: a bundle whose
    values disagree would fail later with a confusing error (or silently misbehave), so it is refused here."""
    def bad(why: str) -> BundleError:
        return BundleError(f"{source}: {why}; the manifest was edited or damaged, rebuild the bundle")

    mo, t, tok = m.model, m.target, m.tokenizer
    for name in ("num_layers", "hidden", "vocab", "max_position_embeddings"):
        if getattr(mo, name) < 1:
            raise bad(f"model.{name} = {getattr(mo, name)} is not a positive count")
    if not 1 <= t.context_length <= mo.max_position_embeddings:
        raise bad(f"target.context_length = {t.context_length} is outside 1..{mo.max_position_embeddings} "
                  "(model.max_position_embeddings)")
    if t.memory_bytes < 0:
        raise bad(f"target.memory_bytes = {t.memory_bytes} is negative")
    if t.activation_dtype not in ACTIVATION_DTYPES:
        raise bad(f"target.activation_dtype {t.activation_dtype!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
    for name in ("bos_id", "eos_id", "pad_id"):
        v = getattr(tok, name)
        if v is not None and not 0 <= v < mo.vocab:
            raise bad(f"tokenizer.{name} = {v} is not a token id of the {mo.vocab}-token vocabulary")
    paths = [f.path for f in m.files]
    if len(set(paths)) != len(paths):
        raise bad("a file is listed twice")
    for f in m.files:
        if not safe_relpath(f.path) or f.path in (MANIFEST, "manifest.sig"):
            raise bad(f"it lists an unsafe path {f.path!r}")
        if f.size < 0 or len(f.sha256) != 64 or not set(f.sha256) <= _HEX:
            raise bad(f"the entry of {f.path} has no valid size and sha256")
    names = [g.name for g in m.graphs]
    if len(set(names)) != len(names) or not set(names) <= set(GRAPH_NAMES):
        raise bad(f"graphs {names} are not distinct names among {', '.join(GRAPH_NAMES)}")
    listed = set(paths)
    for g in m.graphs:  # external data lies beside its graph (ONNX finds it relative to the graph's folder)
        home = PurePosixPath(g.file).parent
        if len(set(g.data_files)) != len(g.data_files) or any(PurePosixPath(d).parent != home for d in g.data_files):
            raise bad(f"graph {g.name}'s data files {list(g.data_files)} are not distinct files beside {g.file}")
    referenced = [g.file for g in m.graphs] + [d for g in m.graphs for d in g.data_files]
    referenced += [tok.file] + ([tok.config_file] if tok.config_file else [])
    referenced += [m.kernel.library] if m.kernel.library else []
    for r in referenced:  # checked here, not only with the hashes: verify=False loads these too
        if not safe_relpath(r):
            raise bad(f"it names {r!r}, which is not a path inside the bundle")
        if r not in listed:
            raise bad(f"it refers to {r} but does not list its hash")
    if m.kernel.source is not None and not safe_relpath(m.kernel.source):
        raise bad(f"kernel.source {m.kernel.source!r} is not a path inside the bundle")
    k = m.kernel
    if k.status not in ("binary", "source", "none") or (k.status == "binary") != bool(k.library):
        raise bad(f"kernel status {k.status!r} with library {k.library!r} is inconsistent")
    dec = m.graph("decoder")
    check_graph_io(m, "decoder", dec.inputs, dec.outputs, source)


def check_graph_io(m: Manifest, name: str, inputs, outputs, source: str) -> None:
    """A graph's inputs/outputs (TensorSig-like: name, dtype, shape) against the manifest: for the decoder,
    the token input, one key and one value per layer of the model's KV shapes in the target's dtype, float32
    logits as wide as the vocabulary. Dimensions given as names (symbolic) are not compared."""
    if name != "decoder":
        return
    mo, act = m.model, m.target.activation_dtype

    def bad(why: str) -> BundleError:
        return BundleError(f"{source}: the decoder graph does not match the manifest ({why}); rebuild the bundle")

    def fixed(shape, i, want, what):
        if len(shape) > i and isinstance(shape[i], int) and shape[i] != want:
            raise bad(f"{what} is {shape[i]}, the manifest says {want}")

    ins, outs = {s.name: s for s in inputs}, {s.name: s for s in outputs}
    if "input_ids" not in ins and "inputs_embeds" not in ins:
        raise bad("no input_ids or inputs_embeds input")
    if "inputs_embeds" in ins:
        fixed(ins["inputs_embeds"].shape, 2, mo.hidden, "inputs_embeds' width")
    past = sorted(n for n in ins if n.startswith("past_key_values."))
    present = sorted(n for n in outs if n.startswith("present."))
    if len(past) != 2 * mo.num_layers or len(present) != 2 * mo.num_layers:
        raise bad(f"{len(past)} past and {len(present)} present tensors for {mo.num_layers} layers")
    for i, (kh, kd, vh, vd) in enumerate(mo.kv_cache):
        for kind, heads, dim in (("key", kh, kd), ("value", vh, vd)):
            for prefix, table in (("past_key_values", ins), ("present", outs)):
                s = table.get(f"{prefix}.{i}.{kind}")
                if s is None:
                    raise bad(f"no {prefix}.{i}.{kind}")
                if s.dtype != act:
                    raise bad(f"{s.name} is {s.dtype}, the target's activations are {act}")
                if len(s.shape) != 4:
                    raise bad(f"{s.name} has rank {len(s.shape)}, not 4")
                fixed(s.shape, 1, heads, f"{s.name}'s heads")
                fixed(s.shape, 3, dim, f"{s.name}'s head dim")
    logits = outs.get("logits")
    if logits is None or logits.dtype != "float32":
        raise bad("no float32 logits output")
    fixed(logits.shape, len(logits.shape) - 1, mo.vocab, "the logits' width (vocabulary)")


def verify_files(files, manifest: Manifest) -> None:
    """Through `files` (files.BundleFiles): every listed file opened once and checked (size, sha256) from its
    descriptor; nothing unlisted, no folder that holds no listed file; every referenced file listed."""
    listed = {f.path for f in manifest.files}
    for f in manifest.files:
        files.hold(f.path, f.size, f.sha256)
    on_disk, folders = files.walk()
    extra = sorted(on_disk - listed - {MANIFEST, "manifest.sig"})
    if extra:
        raise BundleError(f"{files.label} holds files its manifest does not list ({', '.join(extra[:3])}); "
                          "it was modified after the build: remove them or rebuild")
    needed = {p.as_posix() for f in listed for p in PurePosixPath(f).parents if p.as_posix() != "."}
    stray = sorted(folders - needed)
    if stray:
        raise BundleError(f"{files.label} holds folders its manifest does not account for ({', '.join(stray[:3])}); "
                          "it was modified after the build: remove them or rebuild")


# -- genai_config.json ---------------------------------------------------------------------------------------
GENAI_CONFIG = "genai_config.json"
_PATH_KEYS = ("filename", "custom_ops_library")  # the config keys ONNX Runtime GenAI opens as files


def _config_paths(node, where: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _PATH_KEYS or k.endswith("_filename") or k.endswith("_library"):
                yield f"{where}{k}", v
            yield from _config_paths(v, f"{where}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _config_paths(v, f"{where}{i}.")


def check_genai_config(data: bytes | None, m: Manifest, source: str) -> None:
    """genai_config.json (read by ONNX Runtime GenAI, which opens the files it names and loads the library it
    names): present exactly when the manifest's `genai` record names it, every path it names a file of the
    bundle, its graph, tensor names, sizes and token ids those of the manifest."""
    def bad(why: str) -> BundleError:
        return BundleError(f"{source}: {GENAI_CONFIG} {why}; the bundle was altered, rebuild it")

    named = (m.genai or {}).get("config")
    if named is not None and named != GENAI_CONFIG:
        raise BundleError(f"{source}: the manifest's genai record names {named!r}, not {GENAI_CONFIG}")
    if data is None:
        if named is not None:
            raise bad("is missing but the manifest's genai record names it")
        return
    if m.genai is not None and named is None:
        raise bad("is present but the manifest's genai record says the bundle has none")
    try:
        cfg = json.loads(data.decode("utf-8"))
        model = cfg["model"]
        dec = model["decoder"]
        if not isinstance(model, dict) or not isinstance(dec, dict):
            raise TypeError("model and model.decoder must be objects")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise bad(f"is malformed ({type(e).__name__}: {str(e)[:80]})") from None
    listed = {f.path for f in m.files}
    for key, value in _config_paths(cfg):
        if not isinstance(value, str) or not safe_relpath(value) or value not in listed:
            raise bad(f"names {value!r} as {key}: every path it names must be a file of the bundle")
    graph = m.graph("decoder")
    if dec.get("filename") != graph.file:
        raise bad(f"names the decoder {dec.get('filename')!r}, the bundle's decoder is {graph.file}")
    opts = dec.get("session_options") or {}
    if not isinstance(opts, dict):
        raise bad("has a malformed decoder session_options")
    lib = opts.get("custom_ops_library")
    if lib is not None and lib != m.kernel.library:
        raise bad(f"registers the library {lib!r}, the bundle's kernel library is {m.kernel.library!r}")
    ins, outs = {s.name for s in graph.inputs}, {s.name for s in graph.outputs}
    for table, names, what in ((dec.get("inputs") or {}, ins, "input"), (dec.get("outputs") or {}, outs, "output")):
        if not isinstance(table, dict):
            raise bad(f"has a malformed decoder {what} table")
        for key, name in table.items():
            if isinstance(name, str) and "%" in name:  # a per-layer pattern (past_key_values.%d.key)
                if name.count("%") != 1 or "%d" not in name:
                    raise bad(f"maps {key} to the pattern {name!r}; only one %d (the layer) is allowed")
                name = name % 0
            if not isinstance(name, str) or name not in names:
                raise bad(f"maps {key} to {name!r}, which is not a decoder {what}")
    kh, kd, _, _ = m.model.kv_cache[0]
    want = {"num_hidden_layers": m.model.num_layers, "num_key_value_heads": kh, "head_size": kd,
            "hidden_size": m.model.hidden}
    for key, value in want.items():
        if key in dec and dec[key] != value:
            raise bad(f"says {key} {dec[key]!r}, the manifest {value}")
    if model.get("vocab_size", m.model.vocab) != m.model.vocab:
        raise bad(f"says vocab_size {model.get('vocab_size')!r}, the manifest {m.model.vocab}")
    ctx = model.get("context_length", 1)
    if type(ctx) is not int or not 1 <= ctx <= m.target.context_length:
        raise bad(f"says context_length {ctx!r}, outside 1..{m.target.context_length} (the bundle's context)")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = model.get(key)
        ids = v if isinstance(v, list) and v else [v]  # GenAI accepts a list of end-of-sequence ids
        if v is not None and not all(type(i) is int and 0 <= i < m.model.vocab for i in ids):
            raise bad(f"says {key} {v!r}, not token ids of the {m.model.vocab}-token vocabulary")
