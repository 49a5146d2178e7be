"""`mopeq-export inspect BUNDLE`: what a bundle holds (manifest summary, bits per layer, sizes)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import typer
from rich.table import Table

from ..cli import app, console


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="bundle folder or .tar"),
            verify: bool = typer.Option(True, "--verify/--no-verify", help="check every file's sha256"),
            allow_unvalidated: bool = typer.Option(False, "--allow-unvalidated", help="exit 0 for a bundle that "
                                                   "never passed the accuracy gate")) -> None:
    """Summarize a bundle's manifest; with --verify (default) also check its hashes. Exit 2 when a check fails
    or the bundle never passed the accuracy gate (the leftover of a killed build)."""
    from mopeq_runtime.errors import BundleError
    from mopeq_runtime.loader import open_bundle
    from mopeq_runtime.manifest import GENAI_CONFIG, check_genai_config, verify_files

    failure = None
    with open_bundle(bundle, verify=False) as b:
        m = b.manifest
        if verify:
            try:
                verify_files(b.files, m)
                check_genai_config(b.files.bytes(GENAI_CONFIG) if GENAI_CONFIG in b.files.held else None, m,
                                   str(bundle))
            except BundleError as e:
                failure = e
    from ..errors import MopeqError

    try:
        tables = _tables(bundle, m, verify, failure)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # values the schema leaves free-form
        raise MopeqError(f"{bundle}: its manifest holds a value inspect cannot show ({type(e).__name__}: "
                         f"{str(e)[:80]}); the manifest was edited, rebuild the bundle") from None
    for t in tables:
        console.print(t)
    if failure is not None:
        raise MopeqError(f"{bundle}: {failure}")
    if m.validation.get("passed") is not True and not allow_unvalidated:
        raise MopeqError(f"{bundle} never passed the accuracy gate (validation {json.dumps(m.validation)[:60]}): "
                         "it is the leftover of an interrupted or failed build; rebuild it (--allow-unvalidated "
                         "to inspect it without this error)")


def _tables(bundle, m, verify: bool, failure) -> list:
    from rich.markup import escape

    t = Table(title=escape(f"bundle {bundle}"), show_header=False)
    t.add_column("what")
    t.add_column("value")
    status = ("not checked" if not verify else "[green]ok[/]" if failure is None
              else f"[red]FAILED[/]: {escape(str(failure))}")
    t.add_row("schema", f"{m.kind} v{m.schema_version}; hashes {status}")
    t.add_row("target", f"{m.target.name} ({'/'.join(m.target.arches)}, {m.target.activation_dtype}, "
                        f"{' > '.join(p.replace('ExecutionProvider', '') for p in m.target.providers)}; "
                        f"memory share {m.target.memory_bytes / 2**20:.0f} MiB, context {m.target.context_length})")
    t.add_row("model", f"{m.model.name} ({m.model.architecture}), weights sha256 {m.model.weights_sha256[:16]}…")
    t.add_row("toolchain", f"{m.toolchain.get('name')} {m.toolchain.get('version')}")
    q = m.quantization
    t.add_row("quantization", f"{q.get('method')} group {q.get('group_size')}, plan {m.plan.get('method')} "
                              f"avg {m.plan.get('avg_bits')} bits, seed {q.get('seed')}")
    dense = m.dense
    t.add_row("dense weights", "float (bundle of an older toolchain)" if dense is None else
              ", ".join(f"{c} {'float' if b == 16 else f'{b}-bit'}" for c, b in dense.widths.items()))
    t.add_row("kernel", f"{m.kernel.status}: {m.kernel.library or m.kernel.source or '-'} ({m.kernel.note})")
    g = m.genai
    t.add_row("ONNX Runtime GenAI", "no record (bundle of an older toolchain)" if g is None else
              f"{g.get('config') or 'no config'}: {g.get('note', '')}")
    v = m.validation
    met = v.get("metrics", {})
    fid = (f"ppl x{met['ppl_ratio']:.4f}, KL {met['kl']:.4f}, top-1 {met['top1_agreement']:.4f}" if "ppl_ratio" in met
           else f"VQA retention {met.get('accuracy_retention', float('nan')):.4f}" if met else "-")
    t.add_row("validation", f"{'PASS' if v.get('passed') else 'not passed'} on {v.get('data', {}).get('file')}: {fid}")
    return [t, _bits_table(m.plan.get("experts", {})), _files_table(m)]


def _bits_table(experts: dict) -> Table:
    layers: dict[str, list[int]] = defaultdict(list)
    for name, bits in experts.items():
        layers[name.rsplit(".", 1)[0]].append(int(bits))
    widths = sorted({b for v in layers.values() for b in v})
    t = Table("experts of", *(f"{w}-bit" for w in widths), "avg", title="bits per layer")
    for path, bits in layers.items():
        c = Counter(bits)
        t.add_row(path, *(str(c.get(w, 0)) for w in widths), f"{sum(bits) / len(bits):.2f}")
    return t


def _files_table(m) -> Table:
    from rich.markup import escape

    from ..fsutil import human_bytes

    t = Table("file", "size", "sha256", title=f"{len(m.files)} files, {sum(f.size for f in m.files) / 2**20:.2f} MiB")
    for f in m.files:
        if f.path.startswith("kernel-src/"):
            continue  # many small sources; summarized below
        t.add_row(escape(f.path), human_bytes(f.size), f.sha256[:16] + "…")
    src = [f for f in m.files if f.path.startswith("kernel-src/")]
    if src:
        t.add_row(f"kernel-src/ ({len(src)} files)", human_bytes(sum(f.size for f in src)), "")
    for g in m.graphs:  # the full signatures are in manifest.json
        first = g.inputs[0]
        t.add_row(f"graph {g.name}", f"{len(g.inputs)} in / {len(g.outputs)} out",
                  f"{first.name}: {first.dtype}")
    return t
