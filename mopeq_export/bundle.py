"""Stage "bundle": exported graphs + tokenizer + kernel + validation -> a self-describing folder (docs/BUNDLE.md).

The manifest schema and its verification live in the runtime (`mopeq_runtime.manifest`); this module only
writes. Everything written is a pure function of the inputs: no timestamps, no absolute paths (they are
reduced to file names), sorted file lists, ONNX graphs re-saved without exporter stack traces; so two builds
from the same inputs are byte-identical, and `write_tar` keeps that for the .tar form.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mopeq_runtime.manifest import (MANIFEST, FileEntry, GraphEntry, KernelEntry, Manifest, ModelEntry, TargetEntry,
                                    TensorSig, TokenizerEntry)

from .errors import MopeqError
from .fsutil import sha256_file
from .genai import write_genai
from .models.loading import ModelInfo
from .targets import Target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GRAPH_ORDER = ("decoder", "embed", "vision")
KERNEL_RECIPE = ("cmake -S kernel-src -B build -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR=<onnxruntime headers> "
                 "&& cmake --build build -j  (headers: the JetPack/ORT release tarball's include/onnxruntime); then "
                 "mopeq_runtime.load(BUNDLE, kernel_library='build/libmopeq_ops.so'), see docs/BUNDLE.md")
FIXED_MTIME = 0  # tar members: 1970-01-01, so the archive does not depend on when it was built


@dataclass(frozen=True)
class BundleInputs:
    export_dir: Path  # ODIR of `mopeq-export export`: graphs, external data, export.json
    model_dir: Path  # the source checkpoint: tokenizer files
    model: ModelInfo
    target: Target
    context_length: int
    plan: dict  # the bit plan record
    quantization: dict  # method, group size, calibration provenance, seed
    kernel_library: Path | None  # compiled libmopeq_ops for the target, or None (ship the source)
    kernel_source: Path | None  # runtime/csrc, shipped when there is no binary
    prompt: dict | None = None  # VQAFormat of a VLM


def toolchain_version() -> str:
    try:
        return metadata.version("mopeq-export")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def scrub(obj):
    """Absolute paths -> their last component: a bundle must not depend on where it was built."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        return Path(obj).name
    return obj


def target_entry(t: Target, context_length: int) -> TargetEntry:
    # The cpu target's graphs are portable; only its kernel binary is x86-64, and the runtime falls back
    # to the function bodies on an Arm CPU, so a cpu bundle is accepted on both.
    arches = ("x86_64", "aarch64") if t.name == "cpu" else (t.arch,)
    return TargetEntry(t.name, arches, t.activation_dtype, tuple(t.providers),
                       int(t.memory_gib * t.memory_share * 2**30), context_length)


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def model_entry(info: ModelInfo, model_dir: Path, export_json: dict) -> ModelEntry:
    """Decoder dimensions: export.json's `model` section when it has them, else the HF config."""
    from .memory import kv_cache_of_config

    tc = _text_config(json.loads((model_dir / "config.json").read_text()))
    ex = export_json.get("model", {}) if isinstance(export_json.get("model"), dict) else {}
    dims = {"num_layers": tc["num_hidden_layers"], "hidden": tc["hidden_size"], "vocab": tc["vocab_size"],
            "max_position_embeddings": tc["max_position_embeddings"]}
    ex = {**ex, "max_position_embeddings": ex.get("max_position_embeddings", ex.get("max_positions"))}
    dims = {k: int(ex[k]) if ex.get(k) is not None else int(v) for k, v in dims.items()}
    kv = ex.get("kv_cache") or kv_cache_of_config(tc)
    return ModelEntry(info.name, info.architecture, info.model_type, info.is_vlm, info.config_sha256,
                      info.weights_sha256, kv_cache=tuple(tuple(int(x) for x in k) for k in kv), **dims)


def _sig(values) -> tuple[TensorSig, ...]:
    from onnx import helper

    out = []
    for v in values:
        tt = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        shape = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                      for d in tt.shape.dim)
        out.append(TensorSig(v.name, dtype, shape))
    return tuple(out)


def copy_graph(src: Path, dest_dir: Path, name: str) -> GraphEntry:
    """Copy one exported graph and its `<file>.data` as `<name>.onnx` (+ `.data`) and read its signature.

    The export writes the final form (readable names, no provenance, one data file in a fixed order), so
    this is a byte copy: a real model's graphs are gigabytes, never loaded here."""
    import onnx

    graph_file, data_file = f"{name}.onnx", f"{name}.onnx.data"
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value != data_file:
                raise MopeqError(f"{src} keeps its weights in {entry.value}, not {data_file}; re-run the export stage")
    _copy(src, dest_dir / graph_file)
    data = ()
    if (src.parent / data_file).is_file():
        _copy(src.parent / data_file, dest_dir / data_file)
        data = (data_file,)
    return GraphEntry(name, graph_file, data, _sig(model.graph.input), _sig(model.graph.output))


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dest, "wb") as fo:  # explicit write: no metadata copied, ENOSPC surfaces
        shutil.copyfileobj(fi, fo, 1 << 20)


def _tokenizer(inputs: BundleInputs, stage: Path) -> TokenizerEntry:
    tok = inputs.model_dir / "tokenizer.json"
    if not tok.is_file():
        raise MopeqError(f"{inputs.model_dir} has no tokenizer.json; the runtime reads tokenizers in that format "
                         "(save the tokenizer with a fast/`tokenizers` backend)")
    copied = []
    for name in TOKENIZER_FILES:
        if (inputs.model_dir / name).is_file():
            _copy(inputs.model_dir / name, stage / name)  # at the root: where ORT GenAI reads them too
            copied.append(name)
    cfg = json.loads((inputs.model_dir / "config.json").read_text())
    tc = _text_config(cfg)
    pick = lambda k: tc.get(k, cfg.get(k))  # noqa: E731
    return TokenizerEntry("tokenizer.json", "tokenizer_config.json" if "tokenizer_config.json" in copied else None,
                          pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id"))


def _kernel(inputs: BundleInputs, stage: Path) -> KernelEntry:
    lib = inputs.kernel_library
    if lib is not None:
        from mopeq_runtime.host import elf_arch

        _copy(lib, stage / "lib" / lib.name)
        return KernelEntry("binary", f"lib/{lib.name}", elf_arch(lib), None, KERNEL_RECIPE,
                           "compiled kernel library included; the graphs also run without it (function bodies)")
    src = inputs.kernel_source
    if src is not None and src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            _copy(f, stage / "kernel-src" / f.relative_to(src))
    return KernelEntry("source", None, None, "kernel-src" if src is not None else None, KERNEL_RECIPE,
                       f"no kernel binary for {inputs.target.arch} is included (none was built for it on the build "
                       "machine); the bundle runs through the portable ONNX function bodies until the library "
                       "is built on the device from kernel-src/")


def file_entries(stage: Path) -> tuple[FileEntry, ...]:
    files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != MANIFEST)
    return tuple(FileEntry(p.relative_to(stage).as_posix(), sha256_file(p), p.stat().st_size) for p in files)


def write_payload(inputs: BundleInputs, stage: Path) -> dict:
    """Everything but the manifest and the validation files; returns the parts the manifest is made of."""
    export_json_path = inputs.export_dir / "export.json"
    export_json = json.loads(export_json_path.read_text()) if export_json_path.is_file() else {}
    graphs = []
    for name in GRAPH_ORDER:
        src = inputs.export_dir / f"{name}.onnx"
        if src.is_file():
            graphs.append(copy_graph(src, stage, name))
    if not graphs or graphs[0].name != "decoder":
        raise MopeqError(f"{inputs.export_dir} holds no decoder.onnx; re-run the export stage")
    toolchain = {"name": "mopeq-export", "version": toolchain_version(),
                 "export": scrub({k: v for k, v in export_json.items() if k not in ("graphs", "resources")})}
    parts = {"target": target_entry(inputs.target, inputs.context_length),
             "model": model_entry(inputs.model, inputs.model_dir, export_json), "toolchain": toolchain,
             "plan": scrub(inputs.plan), "quantization": scrub(inputs.quantization), "graphs": tuple(graphs),
             "tokenizer": _tokenizer(inputs, stage), "kernel": _kernel(inputs, stage), "prompt": inputs.prompt}
    heads = _text_config(json.loads((inputs.model_dir / "config.json").read_text())).get("num_attention_heads")
    parts["genai"] = write_genai(stage, parts, heads)  # before the manifest: its files are hashed with the rest
    return parts


def write_manifest(stage: Path, parts: dict, validation: dict) -> Manifest:
    """(Re)write manifest.json over the files now in `stage`."""
    manifest = Manifest(files=file_entries(stage), validation=scrub(validation), **parts)
    with open(stage / MANIFEST, "w", encoding="utf-8") as f:
        f.write(manifest.dumps())
    return manifest


def write_tar(src: Path, dest: Path) -> None:
    """Deterministic tar: sorted members, fixed mtime/uid/gid/mode, no owner names, PAX-free ustar/GNU."""
    entries = sorted(p for p in src.rglob("*"))
    with open(dest, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for p in entries:
            info = tarfile.TarInfo(p.relative_to(src).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = p.stat().st_size, 0o644
                with open(p, "rb") as f:
                    tf.addfile(info, f)


def read_bytes_member(tar_path: Path, name: str) -> bytes:
    """One member of a bundle tar (used by `inspect` on a .tar without unpacking it)."""
    with tarfile.open(tar_path) as tf:
        f = tf.extractfile(name)
        if f is None:
            raise MopeqError(f"{tar_path} has no {name}")
        return io.BytesIO(f.read()).getvalue()
