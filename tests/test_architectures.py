"""Every supported architecture, saved as a tiny float16 checkpoint, through the paths that real sizes take:
module-by-module loading (== from_pretrained), the sequential layer runner (== the model's own forward),
and export (ONNX Runtime == PyTorch, prefill + decode with the cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_models as tm
from tiny_checkpoint import quantize_random_plan, save_tiny

ARCHS = sorted(tm.ALL_MOE)
VLMS = {"llava_olmoe", "qwen3_vl_moe"}
REMOTE = {"modulelist"}
EXPORTABLE = sorted(set(ARCHS) - {"qwen3_vl_moe"})  # Qwen3-VL: the vision export handles LLaVA-style models only


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    made = {}

    def get(name):
        if name not in made:
            made[name] = save_tiny(name, root / name)
        return made[name]
    return get


def _auto(name):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM


def _inputs(name, model_config, batch=2, seq=10, seed=0):
    """Model inputs for one calibration-like batch (with an image for the VLMs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "llava_olmoe":
        ids[:, :model_config.image_seq_length] = model_config.image_token_index
        out["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
    if name == "qwen3_vl_moe":  # 16 patches of 8x8 merged 2x2: 4 image tokens per image
        c = model_config
        ids[:, 1], ids[:, 6] = c.vision_start_token_id, c.vision_end_token_id
        ids[:, 2:6] = c.image_token_id
        out.update(pixel_values=torch.randn(16 * batch, 3 * 8 * 8, generator=g),
                   image_grid_thw=torch.tensor([[1, 4, 4]] * batch), mm_token_type_ids=(ids == c.image_token_id).long())
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_loading_module_by_module_equals_from_pretrained(checkpoints, name):
    from mopeq_export.models.loading import load_model

    folder = checkpoints(name)
    model, _ = load_model(folder, trust_remote_code=name in REMOTE)
    ref = _auto(name).from_pretrained(folder, dtype=torch.float32, trust_remote_code=name in REMOTE)
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n


@pytest.mark.parametrize("name", ARCHS)
def test_sequential_runner_gives_every_layer_the_models_own_inputs(checkpoints, name):
    """Skeleton + one layer's weights at a time, hidden states carried from layer to layer: each decoder
    layer gets exactly what it gets inside the resident model's forward (Qwen3-VL's deepstack features,
    added between layers, included)."""
    from mopeq_export.models.adapters import decoder_stack
    from mopeq_export.models.loading import load_model
    from mopeq_export.models.onload import WeightSource, on_meta, skeleton
    from mopeq_export.models.sequential import SequentialRunner

    folder = checkpoints(name)
    remote = name in REMOTE
    ref, _ = load_model(folder, trust_remote_code=remote)
    batches = [_inputs(name, ref.config, seed=s) for s in range(2)]
    _, stack = decoder_stack(ref)
    seen = [[] for _ in stack]
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kw, i=i: seen[i].append((args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
        for i, layer in enumerate(stack)]
    with torch.no_grad():
        for b in batches:
            ref(**b, use_cache=False)
    for h in hooks:
        h.remove()

    model = skeleton(folder, trust_remote_code=remote)
    runner = SequentialRunner(model, batches, torch.device("cpu"), WeightSource(folder, model))
    for i in range(len(stack)):
        for b in range(len(batches)):
            torch.testing.assert_close(runner.hidden[b], seen[i][b], rtol=1e-5, atol=1e-5)
        with runner.loaded(i) as layer:
            runner.run(i, layer)
        assert on_meta(layer), "a layer's weights are freed after its turn"


@pytest.mark.parametrize("target", ["cpu", "jetson"])
@pytest.mark.parametrize("name", EXPORTABLE)
@pytest.mark.usefixtures("exact_kernel")  # parity with PyTorch to 1e-4: the float-activation path
def test_every_architecture_exports_and_matches_pytorch(checkpoints, name, target, tmp_path):
    """float32 graphs to 1e-4 of PyTorch; float16 graphs (Jetson) to 2e-2: routers that compute in float32
    (DeepSeek-V2's) meet the op's activation-typed inputs there."""
    from mopeq_export.quantization.loader import load_quantized
    from mopeq_exporters import export_quantized
    from mopeq_exporters.ort_check import Exported
    from test_export_models import KERNEL, check_decoder

    folder = checkpoints(name)
    remote = name in REMOTE
    qdir = quantize_random_plan(folder, tmp_path / "q", remote)
    record = export_quantized(qdir, target, tmp_path / "onnx", trust_remote_code=remote, nbits_accuracy_level=0)
    model = load_quantized(qdir, trust_remote_code=remote)
    inputs = _inputs(name, model.config, batch=2, seq=9)
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
    ids = inputs["input_ids"].numpy()
    for kernel in KERNEL:
        ex = Exported(tmp_path / "onnx", kernel=kernel)
        embeds = ex.embed(ids, inputs["pixel_values"].numpy()) if name in VLMS else None
        check_decoder(ex, embeds, ids, ref, split=6, tol=1e-4 if target == "cpu" else 2e-2)
    kv = record["model"]["kv_cache"]
    if name.startswith("deepseek"):  # multi-head latent attention caches the latent (16) and the RoPE key (8)
        assert kv == [[1, 16, 1, 8]] * 2
    else:
        assert all(k == kv[0] for k in kv) and kv[0][0] == kv[0][2]


def test_qwen3_vl_export_is_refused_clearly(checkpoints, tmp_path):
    from mopeq_export.errors import MopeqError
    from mopeq_exporters import export_quantized

    qdir = quantize_random_plan(checkpoints("qwen3_vl_moe"), tmp_path / "q")
    with pytest.raises(MopeqError, match="LLaVA-style"):
        export_quantized(qdir, "cpu", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_zero_sized_tensors_load_and_export(tmp_path):
    """A checkpoint with empty modules (remote code building its shared experts 0 wide, as a MolmoE-style
    config with no shared experts does) loads like from_pretrained and exports: safetensors cannot slice a
    tensor with a zero dimension, found at real size."""
    from transformers import AutoModelForCausalLM

    from mopeq_export.models.loading import load_model
    from mopeq_exporters import export_quantized
    from tiny_checkpoint import quantize_random_plan, save_remote_moe

    folder = save_remote_moe(tmp_path / "m", n_shared_experts=0)
    model, _ = load_model(folder, trust_remote_code=True)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True)
    empty = [k for k, v in ref.state_dict().items() if v.numel() == 0]
    assert empty, "the test model should have zero-sized parameters"
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "q").mkdir()
    qdir = quantize_random_plan(folder, tmp_path / "q" / "qdir", trust_remote_code=True)
    rec = export_quantized(qdir, "cpu", tmp_path / "onnx", trust_remote_code=True)
    assert rec["quantized"]["moe_layers"] == 2
