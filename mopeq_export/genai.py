"""genai_config.json: the bundle described for ONNX Runtime GenAI (docs/EXPORT.md, "ONNX Runtime GenAI").

`onnxruntime_genai.Model(BUNDLE)` reads BUNDLE/genai_config.json; `onnxruntime_genai.Tokenizer` reads
tokenizer.json and tokenizer_config.json from the same folder. The decoder graph already is what GenAI's
generic decoder-only model drives (input_ids, attention_mask, position_ids and past_key_values.%d.key/.value
in; logits and present.%d.key/.value out; a cache that grows by concatenation, a zero-length past at
prefill), so the config only names those tensors, states the cache's dimensions and the token ids, and
registers the bundle's kernel library. Nothing is renamed and the export is unchanged.

A bundle GenAI cannot run gets no config at all, and the manifest's `genai` record says why: a config
that fails at load (or, worse, generates something else) is worse than none.

Derived from the manifest records (plus the checkpoint's num_attention_heads); nothing here imports ONNX or
onnxruntime_genai, which is a dev dependency only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mopeq_runtime.manifest import GraphEntry, KernelEntry, ModelEntry, TargetEntry, TokenizerEntry

GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")  # where GenAI looks: beside its config
MODEL_TYPE = "decoder"  # GenAI's architecture-neutral decoder-only LLM
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")
CACHE_DTYPES = ("float32", "float16")  # what GenAI allocates a KV cache in
FEEDS = ("input_ids", "attention_mask", "position_ids")  # the non-cache inputs GenAI feeds a decoder


class Unsupported(Exception):
    """The bundle is outside what GenAI runs; str(e) is the reason recorded in the manifest."""


def derive(graphs: tuple[GraphEntry, ...], model: ModelEntry, target: TargetEntry, tokenizer: TokenizerEntry,
           kernel: KernelEntry, num_attention_heads: int | None = None) -> dict:
    """The genai_config.json of a bundle; raises Unsupported when GenAI cannot run it as it is."""
    names = [g.name for g in graphs]
    if model.is_vlm or names != ["decoder"]:
        raise Unsupported(
            f"vision-language bundle ({', '.join(n + '.onnx' for n in names)}): the runtime embeds the prompt "
            "with embed.onnx and splices vision.onnx features into inputs_embeds; ONNX Runtime GenAI runs "
            "multimodal models only through its own per-architecture processors, and this splice is none of them")
    dec = graphs[0]
    ins, outs = {s.name: s for s in dec.inputs}, {s.name: s for s in dec.outputs}
    layers = range(model.num_layers)
    past = [p % i for i in layers for p in PAST]
    present = [p % i for i in layers for p in PRESENT]
    extra = sorted(set(ins) - set(FEEDS) - set(past))
    missing = [n for n in ("input_ids", *past) if n not in ins] + [n for n in ("logits", *present) if n not in outs]
    if extra or missing:
        raise Unsupported(f"the decoder's I/O is not GenAI's decoder contract (inputs GenAI does not feed: "
                          f"{extra or 'none'}; missing: {missing or 'none'})")
    shapes = set(model.kv_cache)
    kh, kd, vh, vd = model.kv_cache[0]
    if len(shapes) != 1 or (kh, kd) != (vh, vd):
        raise Unsupported(f"the KV cache is not one [heads, head_dim] for every layer's keys and values "
                          f"(per layer [key heads, key dim, value heads, value dim]: {sorted(shapes)}, e.g. multi-head "
                          "latent attention); GenAI allocates one num_key_value_heads x head_size cache for all")
    dtypes = {ins[n].dtype for n in past}
    if len(dtypes) != 1 or not dtypes <= set(CACHE_DTYPES):
        raise Unsupported(f"the KV cache dtype {sorted(dtypes)} is not one of {', '.join(CACHE_DTYPES)}")
    context = min(target.context_length, model.max_position_embeddings)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if kernel.status == "binary" and kernel.library:
        session["custom_ops_library"] = kernel.library  # relative: GenAI resolves it against the config's folder
    decoder = {"filename": dec.file, "session_options": session,
               "inputs": {n: n for n in FEEDS if n in ins} | {"past_key_names": PAST[0], "past_value_names": PAST[1]},
               "outputs": {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
               "num_hidden_layers": model.num_layers, "num_key_value_heads": kh, "head_size": kd,
               "num_attention_heads": int(num_attention_heads or kh), "hidden_size": model.hidden}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id}
    cfg = {"model": {"type": MODEL_TYPE, "context_length": context, "vocab_size": model.vocab, "decoder": decoder,
                     **{k: v for k, v in ids.items() if v is not None}},
           # greedy, as mopeq_runtime's generate at temperature 0; the cache grows by concatenation, so GenAI must
           # not share one preallocated past/present buffer
           "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                      "min_length": 0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                      "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
                      "early_stopping": True, "past_present_share_buffer": False}}
    return cfg


def _note(kernel: KernelEntry, target: TargetEntry) -> str:
    if kernel.status == "binary" and kernel.library:
        note = (f"onnxruntime_genai.Model(BUNDLE) registers {kernel.library} ({kernel.arch}); on a host of another "
                "machine type set model.decoder.session_options.custom_ops_library to a libmopeq_ops built there "
                "(onnxruntime_genai.Config.overlay)")
    else:
        note = ("no kernel binary in the bundle: under GenAI the MoE layers run the graphs' ONNX function bodies "
                "(correct, much slower); set model.decoder.session_options.custom_ops_library to the library built "
                "from kernel-src/ (onnxruntime_genai.Config.overlay) for the fast path")
    others = [p for p in target.providers if p != "CPUExecutionProvider"]
    if others:
        note += (f"; the config names GenAI's CPU provider, a GenAI build with {others[0]} takes it through "
                 "onnxruntime_genai.Config.append_provider")
    return note


def write_genai(stage: Path, parts: dict, num_attention_heads: int | None = None) -> dict:
    """Write genai_config.json and GenAI's tokenizer files into the staged bundle; return the manifest's
    `genai` record: {"config", "tokenizer", "note"}, with config None (and the reason as note) when GenAI
    cannot run the bundle."""
    try:
        cfg = derive(parts["graphs"], parts["model"], parts["target"], parts["tokenizer"], parts["kernel"],
                     num_attention_heads)
    except Unsupported as e:
        return {"config": None, "tokenizer": [], "note": f"no {GENAI_CONFIG}: {e}"}
    tok = parts["tokenizer"]
    # GenAI reads the tokenizer beside its config, where the bundle keeps the runtime's one copy (a bundle
    # laid out otherwise gets byte copies there)
    if tok.file != GENAI_TOKENIZER[0]:
        _copy(stage / tok.file, stage / GENAI_TOKENIZER[0])
    if tok.config_file and tok.config_file != GENAI_TOKENIZER[1]:
        _copy(stage / tok.config_file, stage / GENAI_TOKENIZER[1])
    elif not tok.config_file:  # onnxruntime-extensions refuses a folder without one; an empty one defers to tokenizer.json
        (stage / GENAI_TOKENIZER[1]).write_text("{}\n", encoding="utf-8")
    (stage / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return {"config": GENAI_CONFIG, "tokenizer": list(GENAI_TOKENIZER), "note": _note(parts["kernel"], parts["target"])}


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fi, open(dest, "wb") as fo:  # bytes only, as bundle._copy: no metadata
        shutil.copyfileobj(fi, fo, 1 << 20)
