"""ONNX Runtime GenAI on our bundles: the genai_config.json derivation (fast, on the synthetic export) and
greedy generation through `onnxruntime_genai` equal to mopeq_runtime's (the fake bundle, then text-moe)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import mopeq_runtime
from fake_export import KV, D, make_fake_bundle
from mopeq_export.genai import GENAI_CONFIG, Unsupported, derive, write_genai
from mopeq_runtime.manifest import TensorSig, read_manifest
from mopeq_runtime.native import packaged_library

PROMPT_IDS = [594, 3380, 662, 1842]  # "The os module provides" in text-moe's tokenizer
FAKE_IDS = [5, 17, 40, 9]


def _parts(bundle: Path) -> dict:
    m = read_manifest(bundle)
    return {k: getattr(m, k) for k in ("graphs", "model", "target", "tokenizer", "kernel")}


def _genai_greedy(bundle: Path, ids: list[int], n: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]  # the sequence holds no EOS, as Generation.token_ids


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_bundle(tmp_path_factory.mktemp("genai"))


def test_config_is_derived_from_the_manifest_and_hashed(fake):
    m = mopeq_runtime.load(fake)  # verifies every hash: the GenAI files are listed, nothing is unlisted
    man = m.manifest
    listed = {f.path for f in man.files}
    assert {GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"} <= listed
    assert (fake / "tokenizer.json").read_bytes() == (fake / man.tokenizer.file).read_bytes()
    cfg = json.loads((fake / GENAI_CONFIG).read_text())
    assert man.genai["config"] == GENAI_CONFIG
    mc, dec = cfg["model"], cfg["model"]["decoder"]
    assert mc["type"] == "decoder" and mc["vocab_size"] == man.model.vocab
    assert mc["context_length"] == cfg["search"]["max_length"] == m.context_length == 48
    assert (mc["bos_token_id"], mc["eos_token_id"], mc["pad_token_id"]) == (0, 0, 1)
    assert dec["filename"] == "decoder.onnx"
    dims = (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], dec["hidden_size"])
    assert dims == (1, KV, D, KV * D)
    graph_in = {s.name for s in man.graph("decoder").inputs}
    graph_out = {s.name for s in man.graph("decoder").outputs}
    named = {v for k, v in dec["inputs"].items() if not k.endswith("_names")}
    assert named == graph_in - {"past_key_values.0.key", "past_key_values.0.value"}
    assert dec["inputs"]["past_key_names"] % 0 in graph_in and dec["inputs"]["past_value_names"] % 0 in graph_in
    assert dec["outputs"]["logits"] in graph_out and dec["outputs"]["present_key_names"] % 0 in graph_out
    assert cfg["search"]["do_sample"] is False and cfg["search"]["past_present_share_buffer"] is False
    # a source-only kernel: no library to register (the function bodies run), and the record says so
    assert man.kernel.status == "source" and "custom_ops_library" not in dec["session_options"]
    assert "function bodies" in man.genai["note"]


def test_kernel_binary_is_registered_by_relative_path(tmp_path):
    lib = packaged_library()
    if not lib.is_file():
        pytest.skip("kernel library not built (make kernels)")
    b = make_fake_bundle(tmp_path, kernel_library=lib)
    dec = json.loads((b / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert dec["session_options"]["custom_ops_library"] == f"lib/{lib.name}"  # GenAI resolves it in the bundle
    assert (b / dec["session_options"]["custom_ops_library"]).is_file()


def test_bundles_genai_cannot_run_get_no_config(fake, tmp_path):
    parts = _parts(fake)
    dec = parts["graphs"][0]
    mla = replace(parts["model"], kv_cache=((1, 64, 1, 16),))
    with pytest.raises(Unsupported, match="KV cache"):
        derive(**{**parts, "model": mla})
    vlm = (replace(dec, inputs=tuple(s for s in dec.inputs if s.name != "input_ids")
                   + (TensorSig("inputs_embeds", "float32", ("batch", "sequence", KV * D)),)),
           replace(dec, name="embed", file="embed.onnx"))
    with pytest.raises(Unsupported, match="vision-language"):
        derive(**{**parts, "graphs": vlm, "model": replace(parts["model"], is_vlm=True)})
    extra = replace(dec, inputs=dec.inputs + (TensorSig("cache_position", "int64", ("sequence",)),))
    with pytest.raises(Unsupported, match="cache_position"):
        derive(**{**parts, "graphs": (extra,)})
    rec = write_genai(tmp_path, {**parts, "model": mla})
    assert rec["config"] is None and "KV cache" in rec["note"] and not any(tmp_path.iterdir())


def test_genai_generates_the_runtimes_greedy_tokens_on_the_fake_bundle(fake):
    want = list(mopeq_runtime.load(fake).generate(FAKE_IDS, max_new_tokens=24).token_ids)
    assert _genai_greedy(fake, FAKE_IDS, 24) == want


@pytest.mark.slow
def test_genai_generates_the_runtimes_greedy_tokens_on_text_moe(text_cpu_bundle):
    og = pytest.importorskip("onnxruntime_genai")
    n = 32
    m = mopeq_runtime.load(text_cpu_bundle, threads=1)
    assert m.uses_kernel
    want = list(m.generate(PROMPT_IDS, max_new_tokens=n).token_ids)
    got = _genai_greedy(text_cpu_bundle, PROMPT_IDS, n)
    assert got == want and len(got) > 8, (got, want)
    cfg = json.loads((text_cpu_bundle / GENAI_CONFIG).read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == m.manifest.kernel.library
    # GenAI's tokenizer (onnxruntime-extensions, the root copies) reads the same ids and text
    tok = og.Tokenizer(og.Model(str(text_cpu_bundle)))
    text = "The os module provides"
    assert [int(t) for t in tok.encode(text)] == PROMPT_IDS == m.tokenizer.encode(text)
    assert tok.decode(got) == m.tokenizer.decode(want)
