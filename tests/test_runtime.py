"""mopeq_runtime on a synthetic bundle (tests/fake_export.py): verification, targets, kernel fallback,
KV cache, generation, bad input, and import hygiene. Milliseconds each; no torch in the runtime path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mopeq_runtime
from fake_export import make_fake_bundle
from mopeq_export.bundle import write_tar
from mopeq_runtime import BundleError, InputError
from mopeq_runtime.prompt import VQAFormat

LIB = Path(__file__).resolve().parents[1] / "runtime" / "mopeq_runtime" / "lib" / "libmopeq_ops.so"


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_fake_bundle(tmp_path)


def _edit_manifest(b: Path, fn) -> None:
    d = json.loads((b / "manifest.json").read_text())
    fn(d)
    (b / "manifest.json").write_text(json.dumps(d))


def test_import_and_generate_do_not_import_torch_or_transformers(bundle):
    code = (f"import sys, mopeq_runtime\nm = mopeq_runtime.load({str(bundle)!r})\n"
            "m.generate('The os module', max_new_tokens=4)\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kv_cache_matches_full_prefill(bundle):
    m = mopeq_runtime.load(bundle)
    full, _ = m.forward([[5, 6, 7, 8, 9]])
    a, past = m.forward([[5, 6]])
    b, past = m.forward([[7]], past)
    c, past = m.forward([[8, 9]], past)
    assert full.dtype == np.float32 and full.shape == (1, 5, m.manifest.model.vocab) and past.length == 5
    np.testing.assert_allclose(np.concatenate([a, b, c], 1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_sampling_stream_and_stop(bundle):
    m = mopeq_runtime.load(bundle)
    pieces = []
    g = m.generate("The os module", max_new_tokens=6, stream=pieces.append)
    assert len(g.token_ids) <= 6 and "".join(pieces) == g.text and g.stop_reason in ("eos", "length")
    s1 = m.generate("The os", max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=7, stop_on_eos=False)
    s2 = m.generate("The os", max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=7, stop_on_eos=False)
    assert s1 == s2 and len(s1.token_ids) == 6
    # greedy continuation is what forward's argmax says
    ids = m.prompt_ids("The os")
    logits, _ = m.forward([ids])
    first = int(np.argmax(logits[0, -1]))
    g = m.generate(ids, max_new_tokens=1, stop_on_eos=False)
    assert g.token_ids == (first,)
    # EOS stops: make EOS the argmax by asking for the token the model picks and calling it EOS
    m.tokenizer.eos_id = first
    assert m.generate(ids, max_new_tokens=5).stop_reason == "eos"


def test_prompt_longer_than_context_is_refused(bundle):
    m = mopeq_runtime.load(bundle)
    with pytest.raises(InputError, match="longer than the bundle's context of 48"):
        m.generate(list(range(3, 60)), max_new_tokens=1)
    g = m.generate(list(range(3, 46)), max_new_tokens=20, stop_on_eos=False)
    assert g.stop_reason == "context" and len(g.token_ids) == 48 - 43
    with pytest.raises(InputError, match="exceed the bundle's context"):
        m.forward([list(range(3, 52))])


def test_bad_image_and_image_on_text_model(tmp_path):
    fmt = VQAFormat(image_size=8, image_tokens=4)
    m = mopeq_runtime.load(make_fake_bundle(tmp_path, prompt=fmt.to_json()))
    with pytest.raises(InputError, match="8x8"):
        m.pixel_values(np.zeros((7, 8, 3), np.uint8))
    with pytest.raises(InputError, match="RGB"):
        m.pixel_values(np.zeros((8, 8), np.uint8))
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "gray.png")
    with pytest.raises(InputError, match="RGB"):
        m.pixel_values(tmp_path / "gray.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="9x8"):
        m.pixel_values(tmp_path / "big.png")
    assert m.pixel_values(np.zeros((8, 8, 3), np.uint8)).shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match="text-only"):
        m.forward([[5, 6]], pixel_values=np.zeros((1, 3, 8, 8), np.float32))


def test_tampered_missing_and_extra_files_are_refused(tmp_path):
    b = make_fake_bundle(tmp_path)
    data = b / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="decoder.onnx.data does not match its sha256"):
        mopeq_runtime.load(b)
    data.unlink()
    with pytest.raises(BundleError, match="decoder.onnx.data is missing"):
        mopeq_runtime.load(b)


def test_unlisted_file_and_edited_manifest_are_refused(bundle):
    (bundle / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list"):
        mopeq_runtime.load(bundle)
    (bundle / "evil.onnx").unlink()
    _edit_manifest(bundle, lambda d: d["files"].append({"path": "../x", "sha256": "0", "size": 1}))
    with pytest.raises(BundleError, match="unsafe path"):
        mopeq_runtime.load(bundle)


def test_wrong_schema_version_and_not_a_bundle(bundle, tmp_path):
    _edit_manifest(bundle, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema version 99"):
        mopeq_runtime.load(bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        mopeq_runtime.load(tmp_path)


def test_other_target_or_architecture_refused_unless_allowed(tmp_path):
    b = make_fake_bundle(tmp_path)
    with pytest.raises(BundleError, match="built for target 'cpu', not 'jetson-orin-nano'"):
        mopeq_runtime.load(b, target="jetson-orin-nano")
    _edit_manifest(b, lambda d: d["target"].update(arches=["riscv64"]))
    with pytest.raises(BundleError, match="this host is"):
        mopeq_runtime.load(b)
    m = mopeq_runtime.load(b, allow_foreign_target=True)
    assert "riscv64" in m.target_note


def test_jetson_bundle_needs_permission_on_a_pc(tmp_path):
    b = make_fake_bundle(tmp_path, target="jetson-orin-nano")
    with pytest.raises(BundleError, match="allow_foreign_target"):
        mopeq_runtime.load(b)
    man = mopeq_runtime.open_bundle(b).manifest
    assert man.kernel.status == "source" and man.kernel.library is None and "no kernel binary" in man.kernel.note
    assert (b / "kernel-src" / "CMakeLists.txt").is_file()


def test_kernel_absent_foreign_or_present(tmp_path):
    m = mopeq_runtime.load(make_fake_bundle(tmp_path / "a"))  # source-only bundle
    assert not m.uses_kernel and "function-body fallback" in m.kernel.reason
    with pytest.raises(BundleError, match="kernel library required"):
        mopeq_runtime.load(tmp_path / "a" / "bundle", require_kernel=True)
    fake_arm = tmp_path / "libmopeq_ops.so"
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    head[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    fake_arm.write_bytes(bytes(head))
    m = mopeq_runtime.load(make_fake_bundle(tmp_path / "b", kernel_library=fake_arm))
    assert not m.uses_kernel and "for aarch64" in m.kernel.reason
    if LIB.is_file():
        m = mopeq_runtime.load(make_fake_bundle(tmp_path / "c", kernel_library=LIB))
        assert m.uses_kernel
        assert not mopeq_runtime.load(tmp_path / "c" / "bundle", use_kernel=False).uses_kernel


def test_tar_is_deterministic_and_loads(bundle, tmp_path):
    write_tar(bundle, tmp_path / "a.tar")
    write_tar(bundle, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    m = mopeq_runtime.load(tmp_path / "a.tar")
    assert m.generate("The", max_new_tokens=2).prompt_tokens > 0


def test_device_built_kernel_library_for_a_source_only_bundle(tmp_path):
    b = make_fake_bundle(tmp_path, target="jetson-orin-nano")
    with pytest.raises(BundleError, match="not found; build it from the bundle's kernel-src"):
        mopeq_runtime.load(b, allow_foreign_target=True, kernel_library=tmp_path / "nope.so")
    if LIB.is_file():
        m = mopeq_runtime.load(b, allow_foreign_target=True, kernel_library=LIB)
        assert m.uses_kernel and str(LIB) in m.kernel.reason


def test_toolchain_api_is_public_and_lazy():
    code = ("import sys, mopeq_export; assert 'torch' not in sys.modules; "
            "from mopeq_export import build_bundle, BuildConfig, load_quantized, run_quantize, export_quantized; "
            "import mopeq_export.pipeline as b; assert build_bundle is b.build; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# -- device= (CPU side; the GPU runs are device tests) ---------------------------------------------------------
def test_device_cpu_and_refusals_of_a_gpu_this_onnxruntime_or_library_cannot_serve(tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    from mopeq_runtime.host import library_providers

    lib = Path(mopeq_runtime.native.library_path())
    data = lib.read_bytes()
    assert library_providers(data) == ("CPUExecutionProvider",)  # this build registers the CPU op only
    assert library_providers(b"\0mopeq-ops-providers:CPUExecutionProvider,CUDAExecutionProvider\0") == (
        "CPUExecutionProvider", "CUDAExecutionProvider")
    b = make_fake_bundle(tmp_path / "a", kernel_library=lib)
    m = mopeq_runtime.load(b, device="cpu")
    assert m.providers == ["CPUExecutionProvider"] and m.kernel.used
    assert m.generate("The", max_new_tokens=2).prompt_tokens > 0
    with pytest.raises(BundleError, match="is not one of auto, cpu, cuda, cuda:N"):
        mopeq_runtime.load(b, device="gpu0")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BundleError, match="needs ONNX Runtime's CUDA execution provider.*onnxruntime-gpu"):
            mopeq_runtime.load(b, device="cuda")
        from test_safety import main

        code, err = main(["run", b, "--prompt", "The", "--device", "cuda:0"], capsys)
        assert code == 2 and "onnxruntime-gpu" in err and "Traceback" not in err
    # an onnxruntime that has the CUDA provider, and a library without the CUDA op: refused, never a GPU
    # session whose MoE nodes would run on the CPU; auto keeps such a bundle on the CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BundleError, match="has no CUDA op"):
        mopeq_runtime.load(b, device="cuda:1")
    j = make_fake_bundle(tmp_path / "j", target="cuda", kernel_library=lib)
    m = mopeq_runtime.load(j, allow_foreign_target=True)
    assert m.providers == ["CPUExecutionProvider"], m.providers
    with pytest.raises(BundleError, match="not both"):
        mopeq_runtime.load(b, device="cpu", providers=["CPUExecutionProvider"])


def test_bound_decoding_keeps_the_cache_as_ortvalues_and_matches_the_numpy_path(tmp_path):
    """The IOBinding path a GPU load takes (the cache stays an OrtValue between calls), bound here to the CPU."""
    import onnxruntime as ort

    b = make_fake_bundle(tmp_path / "a")
    m = mopeq_runtime.load(b)
    ids = np.array([[5, 9, 17, 3]])
    want, past = m.forward(ids)
    want2, _ = m.forward(np.array([[11]]), past)
    m._bound = True  # device stays ("cpu", 0): outputs bound to the CPU device
    got, past2 = m.forward(ids)
    assert all(isinstance(t, ort.OrtValue) for t in past2.tensors) and past2.batch == 1
    got2, past3 = m.forward(np.array([[11]]), past2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got2, want2, rtol=1e-6, atol=1e-6)
    assert past3.length == 5 and m.generate("The", max_new_tokens=3).token_ids == \
        mopeq_runtime.load(b).generate("The", max_new_tokens=3).token_ids
