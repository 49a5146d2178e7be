"""`build`: analyze -> plan -> quantize -> export -> package -> validate, into one verified bundle.

Each expensive stage is cached under a key that hashes everything it depends on (source weights/config,
calibration data, the stage's settings, the upstream key, and the toolchain's own source code), so a re-run
with one changed setting redoes only what that setting touches. The bundle itself is never cached: it is
written into a staging folder beside --out, validated through the runtime, and renamed into place only
when the gate passes. A failing gate, Ctrl-C or a full disk leave no bundle.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from mopeq_runtime.native import kernel_sources

from .bundle import BundleInputs, toolchain_version, write_manifest, write_payload, write_tar
from .devices import Meter
from .errors import MopeqError
from .fsutil import (OUTPUT_MARKER, check_out, clean_stale, default_cache, output_lock, output_record, overlaps, read_json,
                     require_free_space, sha256_file, staged_dir, staged_file, write_json)
from .memory import MemoryCheck, check_memory, estimate_weights, kv_bytes_per_token, kv_cache_of_config, require_fit
from .targets import Target, get_target
from .validate import GateConfig, GateReport, plot_report, run_gate

Say = Callable[[str, str], None]  # (stage, status: "run" | "cached" | "done")
# the build's expert quantizer per model kind, chosen by measurement (docs/DECISIONS.md, docs/RESULTS.md
# "Quantizers" and "Dense weights' quantizers"): learned rounding on text and vision-language models alike
BUILD_METHOD = {"text": "signround", "vlm": "signround"}


@dataclass(frozen=True)
class BuildConfig:
    model: Path
    target: str
    out: Path
    avg_bits: float | None = None  # None: the target's default (ignored with plan)
    plan: Path | None = None  # a plan.json to use instead of analyze + plan
    calib: Path | None = None  # None: the shipped calibration data for the model's kind
    eval: Path | None = None  # None: evaluation_data/ (held out), else the calibration data (the report says so)
    seed: int = 0
    tar: bool = False
    cache: Path | None = None  # None: $MOPEQ_CACHE or ~/.cache/mopeq-export
    use_cache: bool = True
    context: int | None = None  # tokens for the memory check and the runtime's limit; None: model maximum
    gate: GateConfig = field(default_factory=GateConfig)
    group_size: int = 32
    method: str | None = None  # gptq | signround | rtn; None: BUILD_METHOD for the model's kind
    probes: int = 32  # = EstimatorConfig().max_probes (kept import-free)
    kernel_library: Path | None = None  # None: runtime/lib for x86-64 targets when built
    device: str = "auto"  # analyze, quantize and the gate's float16 reference: auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # the analysis' (and reference's) compute dtype (devices.py)
    trust_remote_code: bool = False
    force: bool = False  # replace a previous bundle (or tar file) at `out`; never anything else
    sign_key: Path | None = None  # ed25519 private key (PEM): write manifest.sig (docs/BUNDLE.md)
    dense_bits: int | None = None  # dense weights: None/4 quantized at the plan's defaults, 16 kept float (ignored with plan)


@dataclass(frozen=True)
class BuildResult:
    out: Path | None  # None when the gate failed
    report: GateReport
    report_path: Path  # inside the bundle, or beside --out when the gate failed
    summary: dict


class GateFailed(MopeqError):
    def __init__(self, message: str, result: BuildResult):
        super().__init__(message)
        self.result = result


# -- cache ---------------------------------------------------------------------------------------------
# The modules each stage's output depends on: editing the exporter re-exports but keeps the analysis.
# Names, not paths: the digest reads the imported modules' files, wherever the toolchain is installed.
STAGE_SOURCES = {
    "analyze": ("mopeq_export.sensitivity", "mopeq_export.calibration", "mopeq_export.models",
                "mopeq_export.quantization.primitives", "mopeq_export.devices"),
    "plan": ("mopeq_export.allocation", "mopeq_export.quantization.dense"),
    "quantize": ("mopeq_export.quantization", "mopeq_export.calibration", "mopeq_export.models",
                 "mopeq_export.devices"),
    "export": ("mopeq_exporters", "mopeq_export.quantization", "mopeq_export.targets", "mopeq_export.models"),
}


def _module_files(name: str) -> list[tuple[str, Path]]:
    """(a name stable across installs, file) for a module, or for every .py file of a package."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MopeqError(f"module {name} of the toolchain cannot be found: reinstall mopeq-export")
    origin = Path(spec.origin)
    if spec.submodule_search_locations is None:
        return [(name, origin)]
    root = origin.parent
    return [(f"{name}/{f.relative_to(root).as_posix()}", f) for f in sorted(root.rglob("*.py"))
            if "__pycache__" not in f.parts]


def code_digest(stage: str) -> str:
    """Hash of the Python sources a stage runs: a changed quantizer invalidates its cached output."""
    h = hashlib.sha256()
    for entry in STAGE_SOURCES[stage]:
        for rel, f in _module_files(entry):
            h.update(rel.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class StageCache:
    def __init__(self, root: Path | None, say: Say):
        self.tmp = None if root else Path(tempfile.mkdtemp(prefix="mopeq-build-"))
        self.root, self.say, self.hits = Path(root or self.tmp), say, []

    def get(self, stage: str, key: dict, make: Callable[[Path], None]) -> tuple[Path, str]:
        key = {**key, "code": code_digest(stage)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        dest = self.root / f"{stage}-{digest[:20]}"
        # one writer per entry: a second build sharing the cache waits, then finds the entry made
        with output_lock(dest, wait=True, say=lambda m: self.say(stage, m)):
            if dest.is_dir():
                problem = _entry_problem(dest, digest)
                if problem is None:
                    self.say(stage, "cached")
                    self.hits.append(stage)
                    return dest, digest
                self.say(stage, f"cache entry damaged ({problem}): rebuilding")
            self.say(stage, "run")
            with staged_dir(dest, "cache", force=True) as st:
                make(st)
                write_json(st / ".complete", {"key": digest})
            self.say(stage, "done")
            return dest, digest

    def close(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _entry_problem(dest: Path, digest: str) -> str | None:
    """None when a cache entry is complete and every file matches the size and hash recorded when it was made
    (its marker's file list; fsutil.output_record)."""
    rec, _ = output_record(dest)
    try:
        done = json.loads((dest / ".complete").read_text(encoding="utf-8"))
        complete = rec is not None and rec.kind == "cache" and done.get("key") == digest
    except (OSError, ValueError, AttributeError):
        complete = False
    if not complete:
        return "incomplete"
    recorded = {rel: entry for rel, entry in rec.files.items() if entry[1] is not None}
    now = {rel: (p.stat().st_size, None) for p in dest.rglob("*")
           if p.is_file() and (rel := p.relative_to(dest).as_posix()) not in (".complete", OUTPUT_MARKER)}
    if set(now) != set(recorded):
        return "files added or removed"
    for rel, (size, sha) in recorded.items():
        if now[rel][0] != size or sha256_file(dest / rel) != sha:
            return f"{rel} altered"
    return None


def default_eval(is_vlm: bool) -> Path | None:
    """Held-out data shipped with the toolchain (evaluation_data/); None when absent: the build then gates on
    the calibration data, says so, and the report records it (`is_calibration`)."""
    from .data import evaluation_file

    return evaluation_file(is_vlm)


# -- stages ----------------------------------------------------------------------------------------------
def _seed(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _analysis_settings(cfg: BuildConfig, calib: Path, device, dtype) -> dict:
    """Everything the analyze stage's output depends on besides the model and data: its cache key (the
    device type and compute dtype change the numbers in their last digits, so they are part of it)."""
    from .calibration import calibration_kind
    from .devices import dtype_name
    from .sensitivity import DATA_DEFAULTS, SCHEMA_VERSION, TEXT_SEQ_LEN, EstimatorConfig

    samples, batch_size = DATA_DEFAULTS[calibration_kind(calib)]
    est = EstimatorConfig(seed=cfg.seed, max_probes=cfg.probes, min_probes=min(EstimatorConfig.min_probes, cfg.probes),
                          batch_size=batch_size, group_size=cfg.group_size)
    return {"schema": SCHEMA_VERSION, "estimator": est.to_json(), "samples": samples, "seq_len": TEXT_SEQ_LEN,
            "device": device.type, "dtype": dtype_name(dtype)}


def _analyze(cfg: BuildConfig, settings: dict, calib: Path, device, dtype, st: Path) -> None:
    from .sensitivity import EstimatorConfig, run_analyze

    _seed(cfg.seed)
    est = EstimatorConfig.from_json(settings["estimator"])
    report = run_analyze(cfg.model, calib, cfg=est, samples=settings["samples"], seq_len=settings["seq_len"],
                         device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    write_json(st / "sensitivity.json", report.to_json())


def _plan(sens: Path, avg_bits: float, dense_bits: int | None, st: Path) -> None:
    from .allocation import PlanConfig, plan_from_file

    plan, _ = plan_from_file(sens, PlanConfig(method="budget", avg_bits=avg_bits, dense_bits=dense_bits))
    write_json(st / "plan.json", plan.to_json())


def _quantize(cfg: BuildConfig, plan: Path, calib: Path, device, st: Path) -> None:
    from .quantization.pipeline import QuantizeConfig
    from .quantization.stage import run_quantize

    _seed(cfg.seed)
    run_quantize(cfg.model, plan, st / "qdir", calib=calib, device=device, trust_remote_code=cfg.trust_remote_code,
                 cfg=QuantizeConfig(method=cfg.method, group_size=cfg.group_size))


def _export(cfg: BuildConfig, qdir: Path, target: Target, st: Path) -> None:
    from mopeq_exporters import export_quantized

    export_quantized(qdir, target, st / "export", cfg.model, trust_remote_code=cfg.trust_remote_code)


def kernel_for(target: Target, override: Path | None) -> Path | None:
    """The compiled library when it can run on the target (x86-64 here); else None: ship the source.

    A target whose providers include CUDA gets libmopeq_ops_cuda (the CPU op and the CUDA op) when this
    installation has it; every other target the CPU-only libmopeq_ops (it must load where there is no CUDA)."""
    if override is not None:
        return override
    from mopeq_runtime.host import elf_arch, host_arch
    from mopeq_runtime.native import KernelLibraryMissing, cuda_library_path, library_path

    try:
        lib = library_path()  # the runtime package's own build (or $MOPEQ_KERNEL_LIBRARY)
    except KernelLibraryMissing:
        return None
    if "CUDAExecutionProvider" in target.providers and cuda_library_path() is not None:
        lib = cuda_library_path()
    if target.arch == host_arch() and elf_arch(lib) == target.arch:
        return lib
    return None


# -- the whole build ---------------------------------------------------------------------------------------
def build(cfg: BuildConfig, say: Say = lambda s, st: None, progress=None) -> BuildResult:
    from .cli import default_calib
    from .devices import resolve_device, resolve_dtype
    from .models.loading import checkpoint_params, model_info

    target = get_target(cfg.target)
    # the output first: a folder that is not ours, or one another build is writing, is refused before any work
    check_out(cfg.out, "bundle", force=cfg.force, inputs=(cfg.model, cfg.eval, cfg.plan, cfg.calib), file=cfg.tar)
    info = model_info(cfg.model)
    tc = json.loads((Path(cfg.model) / "config.json").read_text())
    tc = tc.get("text_config", tc)
    max_pos = int(tc["max_position_embeddings"])
    context = max_pos if cfg.context is None else cfg.context
    if not isinstance(context, int) or context > max_pos or context < 1:
        raise MopeqError(f"--context {context} is outside 1..{max_pos} (the model's max_position_embeddings)")
    calib = Path(cfg.calib or default_calib(info.is_vlm))
    if not calib.exists():
        raise MopeqError(f"calibration data not found: {calib}")
    if cfg.method is None:
        cfg = replace(cfg, method=BUILD_METHOD["vlm" if info.is_vlm else "text"])
    from .quantization.pipeline import METHODS
    if cfg.method not in METHODS:
        raise MopeqError(f"unknown --method '{cfg.method}'; use one of {', '.join(METHODS)}")
    avg_bits = cfg.avg_bits if cfg.avg_bits is not None else target.default_avg_bits
    if cfg.plan is not None:  # the plan decides the widths; its realized average sizes the estimate
        avg_bits = float(read_json(cfg.plan, "bit plan").get("avg_bits") or avg_bits)
    per_token = kv_bytes_per_token(kv_cache_of_config(tc), target.activation_dtype)
    # fail fast, before hours of GPTQ on a large model: estimated weights at the planned average width
    weights = estimate_weights(cfg.model, target, avg_bits, cfg.group_size)
    require_fit(check_memory(target, weights, per_token, context), "the model at the planned width (estimate)")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, checkpoint_params(cfg.model))
    cache_root = (cfg.cache or default_cache()) if cfg.use_cache else None
    inputs = _inputs(cfg, calib)
    # again with the inputs known now (calibration default, cache); the previous output was hashed just above
    check_out(cfg.out, "bundle", force=cfg.force, inputs=(*inputs, cache_root), file=cfg.tar, hashes=False)
    if cfg.sign_key is not None:
        from .signing import load_private_key  # cryptography is needed only when signing

        load_private_key(cfg.sign_key)  # a missing or wrong key fails now, not after the build
    if cache_root is not None:
        for given in inputs:
            if given is not None and overlaps(cache_root, given):
                raise MopeqError(f"--cache {cache_root} overlaps the input {given}; give another cache folder")
    # the stage outputs (packed experts, graphs) and the bundle: about three times the bundle's weights
    require_free_space(cache_root or Path(tempfile.gettempdir()), 2 * weights, "the build's stage cache")
    require_free_space(Path(cfg.out).resolve().parent, weights, "the bundle")
    if cfg.plan is None:  # the packed format's 16-row tiles: refused before the analysis, not after it
        from .quantization.stage import check_model_rows  # (with a plan, the quantize stage checks it first)

        check_model_rows(cfg.model, cfg.trust_remote_code)
    lock = contextlib.ExitStack()  # one build per --out: a second one started meanwhile refuses at once
    lock.enter_context(output_lock(Path(cfg.out).resolve()))
    cache = StageCache(cache_root, say)
    try:
        base = {"weights": info.weights_sha256, "config": info.config_sha256,
                "calib": sha256_file(calib) if calib.is_file() else str(calib), "seed": cfg.seed,
                "group_size": cfg.group_size}
        if cfg.plan is not None:
            plan_dir, plan_key = cache.get("plan", {**base, "plan_file": sha256_file(cfg.plan)},
                                           lambda st: shutil.copyfile(cfg.plan, st / "plan.json"))
        else:
            settings = _analysis_settings(cfg, calib, device, dtype)
            sens_dir, sens_key = cache.get("analyze", {**base, **settings},
                                           lambda st: _analyze(cfg, settings, calib, device, dtype, st))
            plan_dir, plan_key = cache.get("plan", {"analyze": sens_key, "avg_bits": avg_bits,
                                                    "dense_bits": cfg.dense_bits or 4},
                                           lambda st: _plan(sens_dir / "sensitivity.json", avg_bits, cfg.dense_bits, st))
        plan_path = plan_dir / "plan.json"
        q_dir, q_key = cache.get("quantize", {**base, "plan": plan_key, "method": cfg.method, "device": device.type},
                                 lambda st: _quantize(cfg, plan_path, calib, device, st))
        graph_key = {k: getattr(target, k) for k in ("name", "activation_dtype", "opset", "ir_version")}
        e_dir, _ = cache.get("export", {"quantize": q_key, "target": graph_key},
                             lambda st: _export(cfg, q_dir / "qdir", target, st))
        return _package(cfg, target, info, context, per_token, plan_path, q_dir / "qdir", e_dir / "export",
                        calib, say, progress, cache.hits, device, dtype)
    finally:
        cache.close()
        lock.close()


def _quantization_record(qdir: Path, seed: int) -> dict:
    q = read_json(qdir / "quantized.json", "quantized checkpoint record")
    return {"method": q["method"], "group_size": q["group_size"], "layout_version": q["layout_version"],
            "config": q["config"], "calibration": q["calibration"], "seed": seed, "sizes": q["sizes"],
            "rtn_fallbacks": q["rtn_fallbacks"], "dense": _dense_record(q)}


def _dense_record(q: dict) -> dict:
    """The dense weights' widths per class (16 = float) and what they take in the quantized checkpoint
    (mopeq_runtime.manifest.DenseWeights)."""
    widths = q.get("dense_widths") or {}
    return {"widths": {k: v for k, v in widths.items() if isinstance(v, int)}, "matrices": len(q.get("dense", [])),
            "params": int(sum(d["in_features"] * d["out_features"] for d in q.get("dense", [])))}


def _stable_plan(plan_path: Path) -> dict:
    """The plan record for the manifest. Its sensitivity hash covers the file's wall-clock `seconds` and
    absolute paths; replace it by a hash of the content without them, so rebuilds stay byte-identical."""
    from .bundle import scrub

    plan = read_json(plan_path, "bit plan")
    sens = plan.get("sensitivity") or {}
    if isinstance(sens, dict) and sens.get("path") and Path(sens["path"]).is_file():
        d = read_json(sens["path"], "sensitivity file")
        d.pop("seconds", None)
        d.pop("resources", None)
        digest = hashlib.sha256(json.dumps(scrub(d), sort_keys=True).encode()).hexdigest()
        plan["sensitivity"] = {"path": Path(sens["path"]).name, "content_sha256": digest,
                               "note": "sha256 of the JSON without `seconds` and `resources`, paths reduced to "
                                       "names, sorted keys"}
    return plan


def _inputs(cfg: BuildConfig, calib: Path) -> tuple:
    """What a build reads: its outputs may not overlap any of them (fsutil.check_out)."""
    return (cfg.model, calib, cfg.eval, cfg.plan)


def _own_report(path: Path) -> bool:
    """Whether `path` is absent or a failure report this tool wrote (only those are replaced or removed)."""
    if not path.exists():
        return True
    try:
        return (not path.is_symlink() and path.is_file() and path.stat().st_size < 64 << 20
                and json.loads(path.read_text(encoding="utf-8")).get("kind") == "mopeq.validation")
    except (OSError, ValueError, AttributeError):
        return False


def report_beside(out: Path) -> Path:
    return out.parent / f"{out.name}.validation.json"


def _package(cfg, target, info, context, per_token, plan_path, qdir, export_dir, calib, say, progress, hits,
             device, dtype):
    out = Path(cfg.out).resolve()
    prompt = None
    if info.is_vlm:
        from transformers import AutoConfig

        from .calibration import vqa_format_for

        prompt = vqa_format_for(AutoConfig.from_pretrained(cfg.model)).to_json()
    inputs_rec = BundleInputs(export_dir, Path(cfg.model), info, target, context, _stable_plan(plan_path),
                          _quantization_record(qdir, cfg.seed), kernel_for(target, cfg.kernel_library),
                          kernel_sources(), prompt)
    shipped_eval = None if cfg.eval else default_eval(info.is_vlm)
    if cfg.eval is None and shipped_eval is None:
        say("validate", "no held-out data in this installation (evaluation_data): the gate runs on the calibration "
                        "data, and the report records it")
    eval_path = Path(cfg.eval or shipped_eval or calib)
    inputs = _inputs(cfg, calib)
    tar_tmp = None
    if cfg.tar:  # the folder is assembled in a private staging folder beside the archive, then packed
        clean_stale(out)
        tar_tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        folder = tar_tmp / "bundle"
    else:
        folder = out
    try:
        with staged_dir(folder, "bundle", force=cfg.force, inputs=inputs) as stage:
            say("package", "run")
            package_meter = Meter(torch.device("cpu"), torch.float32)
            parts = write_payload(inputs_rec, stage)
            per_token = kv_bytes_per_token(parts["model"].kv_cache, target.activation_dtype)  # the real cache
            write_manifest(stage, parts, {"status": "pending"})
            weights = sum(f.stat().st_size for f in stage.glob("*.onnx*"))
            mem = check_memory(target, weights, per_token, context)
            require_fit(mem)
            say("package", "done")
            stages = {"package": package_meter.done().to_json()}
            say("validate", "run")
            validate_meter = Meter(device, dtype)
            report = _validate(cfg, stage, eval_path, calib, progress, device, dtype)
            stages["validate"] = validate_meter.done().to_json()
            summary = _summary(parts, stage, report, mem, hits, stage_resources(plan_path, qdir, export_dir, stages))
            if not report.passed:
                path = report_beside(out)
                if not _own_report(path):  # a file of the user's by that name: kept, the report goes beside it
                    path = path.with_name(f"{path.stem}-{os.getpid()}.json")
                with staged_file(path) as tmp:
                    write_json(tmp, {**report.to_json(), "summary": summary})
                raise GateFailed(f"accuracy gate failed: {'; '.join(report.failures)}; report: {path}; "
                                 "no bundle written (raise --avg-bits, or relax the gate knowingly)",
                                 BuildResult(None, report, path, summary))
            say("validate", "done")
            (stage / "validation").mkdir()
            write_json(stage / "validation" / "report.json", report.to_json())
            plot_report(report, stage / "validation" / "fidelity.png")
            write_manifest(stage, parts, _validation_entry(report, mem))
            if cfg.sign_key is not None:
                from .signing import sign_bundle

                sign_bundle(stage, cfg.sign_key)
        if report_beside(out).exists() and _own_report(report_beside(out)):
            report_beside(out).unlink()  # a stale failure report would contradict the bundle
        if cfg.tar:
            with staged_file(out, force=cfg.force, inputs=inputs) as tmp:
                write_tar(folder, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise MopeqError(f"disk full while writing the bundle ({e.strerror}); free space in {out.parent} "
                             "and re-run: no bundle was written") from None
        raise
    finally:
        if tar_tmp is not None:
            shutil.rmtree(tar_tmp, ignore_errors=True)
    return BuildResult(out, report, out if cfg.tar else out / "validation" / "report.json", summary)


def _validate(cfg: BuildConfig, stage: Path, eval_path: Path, calib: Path, progress, device, dtype) -> GateReport:
    import mopeq_runtime

    from .models.loading import load_model, load_tokenizer

    # a Jetson bundle is validated here on the CPU: the same graphs and dtype, with this host's build of the
    # same kernel when there is one (the function bodies dequantize every expert on every call: at real size
    # far too slow), else the function bodies; the float16 reference runs in PyTorch on --device
    host_lib = kernel_for(get_target("cpu"), None)
    foreign = kernel_for(get_target(cfg.target), cfg.kernel_library) is None
    bundle = mopeq_runtime.load(stage, allow_foreign_target=True, kernel_library=host_lib if foreign else None,
                                allow_unvalidated=True)  # validating it is what this does
    ref, _ = load_model(cfg.model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return run_gate(ref, bundle, load_tokenizer(cfg.model), eval_path, cfg.gate,
                    is_calibration=eval_path.resolve() == calib.resolve(), progress=progress)


def _validation_entry(report: GateReport, mem: MemoryCheck) -> dict:
    return {"passed": report.passed, "kind": report.kind, "metrics": {k: v for k, v in report.metrics.items()
                                                                    if k != "per_task"},
            "gate": report.gate.to_json(), "data": report.data, "memory": mem.to_json(),
            "report": "validation/report.json", "plots": ["validation/fidelity.png"]}


def stage_resources(plan_path: Path, qdir: Path, export_dir: Path, more: dict) -> dict:
    """What each stage cost (devices.Resources), from the records the stages wrote (a cached stage's are
    those of the run that made it) and the package and validate meters of this build."""
    out = {}
    plan = read_json(plan_path, "bit plan")
    sens = (plan.get("sensitivity") or {}).get("path")
    for stage, path in (("analyze", Path(sens) if sens else None), ("quantize", qdir / "quantized.json"),
                        ("export", export_dir / "export.json")):
        if path is not None and path.is_file():
            res = read_json(path, f"{stage} record").get("resources")
            if res:
                out[stage] = res
    return {**out, **more}


def _summary(parts: dict, stage: Path, report: GateReport, mem: MemoryCheck, hits: list[str],
             resources: dict) -> dict:
    bits = Counter(parts["plan"]["experts"].values())
    sizes = {p.name: p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
    return {"bits_histogram": {str(b): n for b, n in sorted(bits.items())}, "avg_bits": parts["plan"].get("avg_bits"),
            "file_sizes": sizes, "bundle_bytes": sum(sizes.values()), "weights_bytes": mem.weights_bytes,
            "memory": mem.to_json(), "metrics": report.metrics, "passed": report.passed, "cached_stages": hits,
            "target": parts["target"].name, "activation_dtype": parts["target"].activation_dtype,
            "stages": resources}
