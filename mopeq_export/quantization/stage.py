"""`mopeq-export quantize`: plan + model (+ calibration) -> QDIR, all or nothing, one decoder layer in memory.

Everything that can be checked without the model is checked first (plan, calibration, widths, the output
folder's disk), then the model is built as a skeleton and walked layer by layer (`pipeline.py`): the peak
memory is about one decoder layer in float32 plus the calibration activations and the packed result
(docs/SCALE.md), whatever the model's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import torch

from ..calibration import load_calibration
from ..devices import Meter, gib, resolve_device
from ..errors import MopeqError
from ..fsutil import check_out, require_free_space, staged_dir
from ..models.adapters import MLP_NAMES, StopForward, decoder_layer_paths, find_moe_layers
from ..models.loading import check_weights, load_tokenizer, model_info
from ..models.onload import WeightSource, skeleton
from ..models.sequential import SequentialRunner
from ..scale import ModelShape, check_fits, quantize_bytes
from .checkpoint import (SCHEMA_VERSION, DenseRecord, dense_tensors, layer_record, layer_tensors, size_report,
                         to_json_layers, write_layer, write_record)
from .dense import EMBEDDING_GROUP, FLOAT, OUTPUT_PROJECTIONS, dense_linears, module_path
from .gptq import Gram, gptq
from .packing import LAYOUT_VERSION, check_tile_rows
from .pipeline import (DEFAULT_SAMPLES, QuantizeConfig, check_config, kept_rows, quantize_sequential,
                       results_summary)
from .plan_io import PlanBits, read_plan_bits
from .primitives import QuantizedMatrix, check_width, rtn
from .signround import signround_experts



@dataclass
class QuantizeResult:
    out: Path
    record: dict
    seconds: float


def _dense_targets(model, layers, widths: dict[str, int], legacy_bits: int | None,
                   legacy_attention: bool) -> dict[str, int]:
    """{linear path: bits} of the decoder's dense linears to quantize: the plan's widths per class
    (dense.py), or with the older `--quantize-dense B` the shared experts (and `--dense-attention`) at B."""
    classes = dense_linears(model, layers, decoder_layer_paths(model))
    if legacy_bits is not None:
        keep = ("shared_experts", "attention") if legacy_attention else ("shared_experts",)
        return {p: legacy_bits for p, c in classes.items() if c in keep}
    return {p: widths[c] for p, c in classes.items() if widths[c] != FLOAT}


def _quantize_dense(model, paths: dict[str, int], cfg: QuantizeConfig, grams: dict | None = None):
    """GPTQ on the calibration inputs each linear saw (`grams`), RTN with the clipping search without them;
    the model keeps the dequantized weights, so later layers calibrate on the quantized ones."""
    records, tensors = [], {}
    for p, bits in paths.items():
        lin = model.get_submodule(p)
        gram = (grams or {}).get(p)
        w = lin.weight.detach().float()
        if cfg.uses_calibration and gram is not None and gram.n > 0:
            q = gptq(w, gram, bits, cfg.group_size, cfg.gptq)
        else:
            q = rtn(w, bits, cfg.group_size)
        bias = None if lin.bias is None else lin.bias.detach().cpu()
        tensors.update(dense_tensors(p, q.cpu(), bias))
        records.append(DenseRecord(p, bits, lin.in_features, lin.out_features, lin.bias is not None))
        with torch.no_grad():
            lin.weight.copy_(q.dequantize().to(lin.weight.dtype))
    return records, tensors


def _gated_mlps(model, paths: dict[str, int]) -> dict[str, int]:
    """{module path: bits} of the gated MLPs among `paths` that learned rounding can take: gate/up/down all
    listed at one width, no biases, an `act_fn`."""
    out = {}
    for parent in sorted({p.rsplit(".", 1)[0] for p in paths}):
        names = [f"{parent}.{n}" for n in MLP_NAMES]
        if not all(n in paths for n in names) or len({paths[n] for n in names}) != 1:
            continue
        mod = model.get_submodule(parent)
        if callable(getattr(mod, "act_fn", None)) and all(model.get_submodule(n).bias is None for n in names):
            out[parent] = paths[names[0]]
    return out


def _learn_mlp(model, runner: SequentialRunner, i: int, decoder_layer, path: str, bits: int, cfg: QuantizeConfig):
    """Learned rounding of one gated MLP (QuantizeConfig.mlp_method "signround"): its inputs over every
    calibration batch (a pass of layer i that stops at the MLP), then gate/up/down fitted together to the float
    MLP's output on them (`signround_experts` with one expert). The model keeps the dequantized weights."""
    mod = model.get_submodule(path)
    xs, state = [], {}

    def hook(_m, args):
        x = args[0].detach()
        xs.append(x.reshape(-1, x.shape[-1])[kept_rows(state["mask"], x.device)].float())
        raise StopForward

    handle = mod.register_forward_pre_hook(hook)
    try:
        runner.run(i, decoder_layer, stop_ok=True,
                   on_batch=lambda b: state.update(mask=runner.batches[b].get("attention_mask")))
    finally:
        handle.remove()
    gate, up, down = (getattr(mod, n) for n in MLP_NAMES)
    w1 = torch.cat([gate.weight, up.weight]).detach().float()[None]
    w2 = down.weight.detach().float()[None]
    [(q1, q2, _, _)] = signround_experts(w1, w2, [torch.cat(xs)], [bits], cfg.group_size, mod.act_fn,
                                         replace(cfg.signround, scope="expert"))
    inter = gate.out_features
    records, tensors = [], {}
    for name, lin, q in (("gate_proj", gate, q1.rows(0, inter)), ("up_proj", up, q1.rows(inter, 2 * inter)),
                         ("down_proj", down, q2)):
        tensors.update(dense_tensors(f"{path}.{name}", q.cpu(), None))
        records.append(DenseRecord(f"{path}.{name}", bits, lin.in_features, lin.out_features, False))
        with torch.no_grad():
            lin.weight.copy_(q.dequantize().to(lin.weight.dtype))
    return records, tensors


def _input_grams(model, paths) -> tuple[dict, list]:
    """Forward pre-hooks accumulating each linear's input Gram matrix (GPTQ's Hessian) over the layer's
    calibration passes. A pass that runs a linear twice over the same tokens adds the same mean."""
    grams: dict[str, Gram] = {}
    handles = []
    for p in paths:
        def hook(mod, args, p=p):
            x = args[0].detach()
            grams.setdefault(p, Gram(x.shape[-1], x.device)).add(x)
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook))
    return grams, handles


def final_norm(model, stack_path: str) -> tuple[str, torch.nn.Module] | None:
    """The norm between the decoder stack and lm_head: `norm` (Llama-style models) or `ln_f` beside the
    stack. None when the model has neither (lm_head then falls back to round-to-nearest)."""
    parent = stack_path.rsplit(".", 1)[0] if "." in stack_path else ""
    owner = model.get_submodule(parent) if parent else model
    for name in ("norm", "ln_f", "final_layernorm"):
        m = getattr(owner, name, None)
        if isinstance(m, torch.nn.Module):
            return (f"{parent}.{name}" if parent else name), m
    return None


def _head_gram(model, runner: SequentialRunner, source, float_target: bool = False
               ) -> tuple[Gram, torch.Tensor | None] | None:
    """lm_head's input Gram matrix: the final norm of the decoder stack's outputs (`runner.hidden` after a
    `final_pass`), padding dropped. With `float_target` and the float stream's final hidden states at hand
    (`runner.float_hidden`), also A = sum x_float x^T over the same tokens (float64), else None. The norm's
    weights were freed after the capture and are loaded again."""
    found = final_norm(model, runner.stack_path)
    if found is None:
        return None
    path, norm = found
    if source is not None and any(p.device.type == "meta" for p in norm.parameters()):
        source.load(model, lambda n: n.startswith(path + "."), runner.device)
    hidden = runner.hidden[0].shape[-1]
    gram = Gram(hidden, runner.hidden[0].device)
    floats = runner.float_hidden if float_target else None
    cross = None if floats is None else torch.zeros(hidden, hidden, dtype=torch.float64, device=gram.xtx.device)
    with torch.no_grad():
        for b, h in enumerate(runner.hidden):
            keep = kept_rows(runner.batches[b].get("attention_mask"), h.device)
            x = norm(h).reshape(-1, hidden)[keep].float()
            gram.add(x)
            if cross is not None:
                xf = norm(floats[b]).reshape(-1, hidden)[keep].double()
                cross += xf.t() @ x.double()
    return gram, cross


# ridge of the float-target head's solve, as a fraction of G's mean diagonal: GPTQ's 0.01 shrinks the head
# (on the tiny test model its logit error was 0.76 against 0.41 of W itself, 0.29 at 1e-4 = least squares)
_HEAD_RIDGE = 1e-4


def _float_target_map(gram: Gram, cross: torch.Tensor, damp: float = _HEAD_RIDGE) -> torch.Tensor:
    """M = A (G + damp)^-1 [H, H] (float64): W M is the head whose outputs on this model's hidden states best
    match (least squares) W's outputs on the float model's (damp: a fraction of G's mean diagonal)."""
    g = gram.xtx.to(cross.device)
    g = g + torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * damp * torch.diag(g).mean().clamp_min(1e-12)
    return torch.linalg.solve(g, cross.t()).t()  # A G^-1 (G symmetric)


# rows of lm_head per GPTQ call: the rows are independent given the Gram matrix, and a vocabulary of 150k
# rows in one call would hold several float32 copies of the whole head (8192 x 4096: about 1.3 GB working)
_HEAD_ROWS = 8192


def _quantize_outer(model, source, widths: dict[str, int], cfg: QuantizeConfig,
                    head: tuple[Gram, torch.Tensor | None] | None = None, device: torch.device | str = "cpu"):
    """lm_head and the input embeddings (outside the decoder layers): loaded one at a time, round-to-nearest
    with the clipping search, packed; the model keeps them unloaded. With `head`, `_head_gram`'s (Gram, A)
    (QuantizeConfig.head_gptq), lm_head is GPTQ-quantized on the Gram matrix instead, in blocks of rows on
    `device`; with A too, around the float-target head W M (`_float_target_map`, QuantizeConfig.head_float_target)."""
    head_gram, cross = head if head is not None else (None, None)
    group_size = cfg.group_size
    records, tensors = [], {}
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_cfg, "tie_word_embeddings", False):  # one tensor serves both: kept float (docs/DECISIONS.md)
        return records, tensors
    outer = (("lm_head", model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None),
             ("embeddings", model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None))
    for cls, module in outer:
        bits = widths[cls]
        path = module_path(model, module)
        if bits == FLOAT or path is None or not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        name = f"{path}.weight"
        if module.weight.device.type == "meta":
            source.load(model, lambda n, name=name: n == name, "cpu")
        w = module.weight.detach().float()
        kind = "embedding" if isinstance(module, torch.nn.Embedding) else "linear"
        g = max(group_size, EMBEDDING_GROUP) if kind == "embedding" else group_size
        if kind == "linear" and head_gram is not None and head_gram.n > 0:
            m = None if cross is None else _float_target_map(head_gram, cross).to(device)
            target = (lambda r: r) if m is None else (lambda r: (r.double() @ m).float())  # noqa: E731
            q = QuantizedMatrix.stack_rows([gptq(target(rows.to(device)), head_gram, bits, g, cfg.gptq)
                                            for rows in w.split(_HEAD_ROWS)])
        else:
            q = rtn(w, bits, g)
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().cpu()
        tensors.update(dense_tensors(path, q, bias))
        records.append(DenseRecord(path, bits, w.shape[1], w.shape[0], bias is not None, kind,
                                   None if g == group_size else g))
    return records, tensors


def check_expert_rows(layers) -> None:
    """Layout v2 stores every expert matrix in tiles of 16 rows (docs/FORMAT.md §3-4): refuse, before any work,
    a model whose hidden size H (the rows of w2) or twice its expert intermediate size 2I (the rows of w1) is
    not a multiple of 16."""
    for l in layers:
        h, i = l.hidden_size, l.intermediate_size
        what = f"{l.experts_path}: the packed format cannot hold this model's experts;"
        check_tile_rows(h, f"{what} w2 [H={h}, I={i}]")
        check_tile_rows(2 * i, f"{what} w1 [2I={2 * i}, H={h}]")


def check_model_rows(model_dir: str | Path, trust_remote_code: bool = False) -> None:
    """`check_expert_rows` from the model's skeleton (no weights read): what a build checks before its analysis."""
    check_expert_rows(find_moe_layers(skeleton(model_dir, trust_remote_code=trust_remote_code)))


def expected_bytes(plan: PlanBits, layers, group_size: int, dense_params: int = 0, dense_bits: int = 8) -> int:
    """Bytes QDIR will hold: each expert's codes at its width plus float16 scales and uint8 zeros per group."""
    per_expert = {l.expert_name(e): l.expert_params for l in layers for e in range(l.num_experts)}
    total = sum(per_expert[n] * (plan.bits[n] + 24 / group_size) / 8 for n in per_expert if n in plan.bits)
    return int(total + dense_params * (dense_bits + 24 / group_size) / 8)


def run_quantize(model_dir: str | Path, plan_path: str | Path, out: str | Path, *, calib: str | Path | None,
                 cfg: QuantizeConfig, samples: int | None = None, seq_len: int = 256, dense_bits: int | None = None,
                 dense_attention: bool = False, trust_remote_code: bool = False, progress=None,
                 device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
                 work_bytes: int | None = None, say=lambda s: None, force: bool = False) -> QuantizeResult:
    t0 = time.time()
    samples = DEFAULT_SAMPLES.get(cfg.method, 32) if samples is None else samples
    inputs = (model_dir, plan_path, calib)
    check_out(out, "quantize", force=force, inputs=inputs)
    # -- checks that need no model ---------------------------------------------------------------------
    plan: PlanBits = read_plan_bits(plan_path)
    info = model_info(model_dir)
    plan.check_model(info)
    cfg = cfg.for_kind(info.is_vlm)
    check_config(plan.bits, calib if cfg.uses_calibration else None, cfg)
    if dense_bits is not None:
        check_width(dense_bits, cfg.group_size)
        if dense_bits not in (4, 8):
            raise MopeqError("--quantize-dense takes 4 or 8 bits")
    if cfg.uses_calibration and not Path(calib).exists():
        raise MopeqError(f"calibration data not found: {calib}")
    dev = resolve_device(device)
    check_weights(model_dir)
    model = skeleton(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    layers = find_moe_layers(model)
    check_expert_rows(layers)  # before the calibration set and the hours of quantization
    plan.check_experts([n for l in layers for n in l.expert_names])
    dense_paths = _dense_targets(model, layers, plan.dense, dense_bits, dense_attention)
    dense_params = sum(model.get_submodule(p).weight.numel() for p in dense_paths)
    require_free_space(Path(out).resolve().parent, expected_bytes(plan, layers, cfg.group_size, dense_params,
                                                                 dense_bits or 8), "the quantized checkpoint")
    calib_set = None
    if cfg.uses_calibration:
        calib_set = load_calibration(calib, load_tokenizer(model_dir, trust_remote_code), model.config,
                                     samples=samples, seq_len=seq_len)
    work_bytes = work_bytes or default_work_bytes(dev)
    tokens = calib_set.num_tokens if calib_set else 0
    # expert-balanced calibration's candidate stream (spare samples), held beside the calibration set; counted
    # as calibration tokens in the estimate (an overcount: it has no float stream)
    spare = []
    if calib_set is not None and cfg.balance_tokens:
        spare = calib_set.spare_batches(cfg.balance_samples)
        if not spare:
            say("quantize: expert-balanced calibration has no spare calibration samples to draw from; it adds nothing")
    tokens += sum(int(b["input_ids"].numel()) for b in spare)
    avg = sum(plan.bits.values()) / len(plan.bits)
    need = quantize_bytes(ModelShape.of(model), tokens, avg, work_bytes, learned=cfg.method == "signround")
    check_fits(need, dev, "quantize", "use --device cuda, fewer --samples (or fewer balance_samples)")
    say(f"quantize: one decoder layer at a time on {dev}, about {gib(need)} at peak (estimate)")
    meter = Meter(dev, dtype, estimate_bytes=need)
    expert_params = {n for n, p in model.named_parameters() if any(p is q for l in layers for q, _ in l.hessian_params())}
    total_params = sum(p.numel() for p in model.parameters())
    expert_count = sum(p.numel() for n, p in model.named_parameters() if n in expert_params)

    dense_recs, dense = [], {}
    dense_batches = None  # the first batches holding cfg.dense_samples windows
    if cfg.dense_samples is not None and calib_set is not None:
        seen = list(accumulate(int(b["input_ids"].shape[0]) for b in calib_set.batches))
        dense_batches = next((k for k, n in enumerate(seen, 1) if n >= cfg.dense_samples), len(seen))
    lrecs, summaries, expert_bytes = [], [], [0]
    classes = dense_linears(model, layers, decoder_layer_paths(model))
    mlps = {"shared_experts", "dense_mlp"}

    def quantize_dense_of(i, decoder_layer, phase: set[str], done: frozenset[str] = frozenset()):
        """GPTQ needs the linears' inputs: a pass of the layer over the calibration set collects them (its
        output is dropped), then they are quantized and written back before the layer's next pass. Input
        projections go first, then the output projections (o_proj, down_proj) on inputs computed through
        the quantized ones, as the routed experts' w2 follows w1. Without calibration data (RTN), no pass."""
        prefix = f"{runner.stack_path}.{i}."
        mine = {p: b for p, b in dense_paths.items()
                if p.startswith(prefix) and classes.get(p) in phase and p not in done}
        outputs = {p: b for p, b in mine.items() if p.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS}
        for part in ({p: b for p, b in mine.items() if p not in outputs}, outputs):
            if not part:
                continue
            grams = None
            if cfg.uses_calibration and runner.batches:
                grams, handles = _input_grams(model, part)
                try:
                    runner.run(i, decoder_layer, stop_ok=True, first=dense_batches)
                finally:
                    for h in handles:
                        h.remove()
            recs, tensors = _quantize_dense(model, part, cfg, grams)
            dense_recs.extend(recs)
            dense.update(tensors)

    def quantize_mlps_of(i, decoder_layer):
        """The layer's shared experts and dense MLP: learned rounding for the gated MLPs when
        cfg.mlp_method says so (and calibration data is at hand), GPTQ for the rest."""
        prefix = f"{runner.stack_path}.{i}."
        mine = {p: b for p, b in dense_paths.items() if p.startswith(prefix) and classes.get(p) in mlps}
        learned = set()
        if cfg.mlp_method == "signround" and cfg.uses_calibration and runner.batches:
            for path, bits in _gated_mlps(model, mine).items():
                recs, tensors = _learn_mlp(model, runner, i, decoder_layer, path, bits, cfg)
                dense_recs.extend(recs)
                dense.update(tensors)
                learned.update(f"{path}.{n}" for n in MLP_NAMES)
        quantize_dense_of(i, decoder_layer, mlps, frozenset(learned))

    def before(i, decoder_layer):  # attention, then (with cfg.shared_first) the shared experts / dense MLP
        quantize_dense_of(i, decoder_layer, {"attention"})
        if cfg.shared_first:
            quantize_mlps_of(i, decoder_layer)

    def on_experts(layer, results):  # packed and written at once: one layer's codes in memory at a time
        tensors = layer_tensors(results)
        write_layer(stage, layer.experts_path, tensors)
        expert_bytes[0] += sum(t.nbytes for t in tensors.values())
        lrecs.append(layer_record(layer, results))
        summaries.extend(results_summary(results))

    source = WeightSource(model_dir, model)
    try:
        with staged_dir(out, "quantize", force=force, inputs=inputs) as stage:
            runner = SequentialRunner(model, calib_set.batches if calib_set else [], dev, source)
            candidates = SequentialRunner(model, spare, dev, source) if spare else None  # expert-balanced
            head_gptq = (cfg.head_gptq and calib_set is not None and dense_bits is None
                         and plan.dense["lm_head"] != FLOAT)
            quantize_sequential(runner, layers, plan.bits, cfg, progress, work_bytes, None, on_experts,
                                before_layer=before,
                                after_experts=None if cfg.shared_first else quantize_mlps_of,
                                final_pass=head_gptq, candidates=candidates)
            del candidates
            if dense_bits is None:  # lm_head and embeddings come with the plan's widths only
                head = _head_gram(model, runner, source, cfg.head_float_target) if head_gptq else None
                recs, tensors = _quantize_outer(model, source, plan.dense, cfg, head, dev)
                dense_recs.extend(recs)
                dense.update(tensors)
            dense_count = sum(d.in_features * d.out_features for d in dense_recs)
            sizes = size_report(lrecs, expert_bytes[0], total_params, expert_count,
                                sum(t.nbytes for t in dense.values()), dense_count)
            record = {
                "schema_version": SCHEMA_VERSION,
                "layout_version": LAYOUT_VERSION,
                "model": info.to_json(),
                "plan": {"path": str(Path(plan_path).resolve()), "sha256": plan.sha256, "method": plan.method,
                         "avg_bits": plan.avg_bits},
                "method": cfg.method,
                "group_size": cfg.group_size,
                "config": cfg.to_json(),
                "calibration": calib_set.info.to_json() if calib_set else None,
                "layers": to_json_layers(lrecs),
                "dense": [vars(d) for d in dense_recs],
                "dense_widths": _dense_summary(plan.dense, dense_recs, dense_bits),
                "experts": summaries,
                "rtn_fallbacks": [e["name"] for e in summaries if e["method"] != cfg.method],
                "sizes": sizes,
                "resources": meter.done().to_json(),
            }
            write_record(stage, record, dense)
    finally:
        source.close()
    return QuantizeResult(Path(out), record, time.time() - t0)


def _dense_summary(widths: dict[str, int], records, legacy_bits: int | None) -> dict:
    """Per class of dense weight: its width (16 = float), as the plan asked (or `--quantize-dense`)."""
    if legacy_bits is not None:
        return {"legacy_quantize_dense": legacy_bits, "matrices": len(records)}
    return dict(widths)


def default_work_bytes(device: torch.device) -> int:
    """Working memory for one batched GPTQ chunk: a quarter of the free GPU memory, 256 MiB on the CPU (where
    batching saves little: the CPU is busy either way, and host memory is the budget)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] // 4)
    return 256 << 20
