"""A tiny synthetic export on the docs/EXPORT.md decoder contract, built with onnx.helper (no torch).

Lets the bundle writer and the runtime be tested in milliseconds. The decoder is causal and uses its cache:

    ids ─Gather(E)─► x [B,T,KV*D] ─Reshape/Transpose─► k [B,KV,T,D]
    present.key = present.value = Concat(past.key, k, axis=2)
    h = CumSum(present.key, axis=2)[:, :, -T:] / (position + 1)   (a causal running mean)
    logits = Reshape(Transpose(h)) @ W        [B,T,V]

so prefill-then-decode gives the same logits as one prefill of the whole sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from mopeq_export.quantization.packing import LAYOUT_VERSION
from mopeq_runtime.native import kernel_sources
from onnx import TensorProto, helper, numpy_helper

KV, D = 2, 4


def make_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The os module provides a portable way of using operating system dependent functionality."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def decoder_graph(vocab: int, seed: int = 0, kv_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """kv_dtype: the cache's element type (FLOAT16 for a float16 target; the arithmetic stays float32)."""
    rng = np.random.default_rng(seed)
    E = numpy_helper.from_array(rng.standard_normal((vocab, KV * D)).astype(np.float32), "E")
    W = numpy_helper.from_array(rng.standard_normal((KV * D, vocab)).astype(np.float32), "W")
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    consts = [c("shape4", [0, 0, KV, D]), c("shape3", [0, 0, KV * D]), c("two", [2]), c("neg_t", [0]),
              c("big", [1 << 40]), c("one", [1])]
    n = helper.make_node
    nodes = [
        n("Gather", ["E", "input_ids"], ["x"]),
        n("Reshape", ["x", "shape4"], ["x4"]),
        n("Transpose", ["x4"], ["k"], perm=[0, 2, 1, 3]),
        n("Cast", ["past_key_values.0.key"], ["past_f"], to=TensorProto.FLOAT),
        n("Concat", ["past_f", "k"], ["cat"], axis=2),
        n("Cast", ["cat"], ["present.0.key"], to=kv_dtype),
        n("Identity", ["present.0.key"], ["present.0.value"]),
        n("CumSum", ["cat", "two"], ["cs"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "one"], ["t"], axis=0),
        n("Neg", ["t"], ["mt"]),
        n("Slice", ["cs", "mt", "big", "two"], ["h"]),
        n("Cast", ["position_ids"], ["posf"], to=TensorProto.FLOAT),
        n("Add", ["posf", "onef"], ["cnt"]),
        n("Unsqueeze", ["cnt", "one"], ["cnt3"]),
        n("Unsqueeze", ["cnt3", "ax3"], ["cnt4"]),
        n("Div", ["h", "cnt4"], ["hm"]),
        n("Transpose", ["hm"], ["hmt"], perm=[0, 2, 1, 3]),
        n("Reshape", ["hmt", "shape3"], ["h3"]),
        n("MatMul", ["h3", "W"], ["logits0"]),
        n("ReduceMax", ["attention_mask"], ["mmax"], keepdims=0),
        n("Cast", ["mmax"], ["mask_gate"], to=TensorProto.FLOAT),
        n("Mul", ["logits0", "mask_gate"], ["logits"]),
    ]
    extra = [numpy_helper.from_array(np.array(1.0, np.float32), "onef"), c("ax3", [3])]
    vi = helper.make_tensor_value_info
    inputs = [vi("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              vi("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              vi("position_ids", TensorProto.INT64, ["batch", "sequence"]),
              vi("past_key_values.0.key", kv_dtype, ["batch", KV, "past_sequence", D]),
              vi("past_key_values.0.value", kv_dtype, ["batch", KV, "past_sequence", D])]
    outputs = [vi("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]),
               vi("present.0.key", kv_dtype, ["batch", KV, "total_sequence", D]),
               vi("present.0.value", kv_dtype, ["batch", KV, "total_sequence", D])]
    graph = helper.make_graph(nodes, "fake_decoder", inputs, outputs, [E, W, *consts, *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def make_fake(root: Path, max_positions: int = 64, kv_dtype: int = TensorProto.FLOAT) -> tuple[Path, Path]:
    """(model_dir, export_dir) of a fake text model with a tokenizer and one decoder graph."""
    model_dir, export_dir = root / "model", root / "export"
    model_dir.mkdir(parents=True)
    export_dir.mkdir(parents=True)
    vocab = make_tokenizer(model_dir / "tokenizer.json")
    cfg = {"architectures": ["FakeMoeForCausalLM"], "model_type": "fake_moe", "num_hidden_layers": 1,
           "num_attention_heads": KV, "num_key_value_heads": KV, "head_dim": D, "hidden_size": KV * D,
           "vocab_size": vocab, "max_position_embeddings": max_positions, "bos_token_id": 0, "eos_token_id": 0,
           "pad_token_id": 1}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    onnx.save_model(decoder_graph(vocab, kv_dtype=kv_dtype), str(export_dir / "decoder.onnx"), save_as_external_data=True,
                    location="decoder.onnx.data", size_threshold=1024)
    # export_layout_version: the graph I/O contract of docs/EXPORT.md; custom_op.layout_version: the packed expert
    # format of docs/FORMAT.md (v2, 16-row tiles), as a real export records it (the fake graph holds no MoE node)
    custom_op = {"domain": "mopeq", "op_type": "MoEExperts", "version": 1, "layout_version": LAYOUT_VERSION,
                 "fallback": "model-local ONNX function"}
    (export_dir / "export.json").write_text(json.dumps({"export_layout_version": 1, "target": "cpu",
                                                        "custom_op": custom_op,
                                                        "quantized": str(root.resolve() / "qdir")}))
    return model_dir, export_dir


def make_fake_bundle(root: Path, *, target: str = "cpu", kernel_library: Path | None = None, prompt: dict | None = None,
                     context_length: int = 48, validation: dict | None = None) -> Path:
    """A complete fake bundle folder at root/bundle (writer of mopeq_export.bundle, no validation run)."""
    from mopeq_export.bundle import BundleInputs, write_manifest, write_payload
    from mopeq_export.models.loading import ModelInfo
    from mopeq_export.targets import get_target

    kv = TensorProto.FLOAT16 if get_target(target).activation_dtype == "float16" else TensorProto.FLOAT
    model_dir, export_dir = make_fake(root, kv_dtype=kv)
    info = ModelInfo(str(model_dir), "fake", "FakeMoeForCausalLM", "fake_moe", False, "c" * 64, "w" * 64)
    inputs = BundleInputs(export_dir, model_dir, info, get_target(target), context_length,
                          {"kind": "mopeq.bitplan", "experts": {"model.layers.0.mlp.experts.0": 2}, "avg_bits": 2.0},
                          {"method": "gptq", "group_size": 32, "layout_version": LAYOUT_VERSION}, kernel_library,
                          kernel_sources(), prompt)
    stage = root / "bundle"
    stage.mkdir()
    write_manifest(stage, write_payload(inputs, stage), validation or {"passed": True})
    return stage
