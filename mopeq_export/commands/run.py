"""`mopeq-export run BUNDLE --prompt ...`: generate with the lean runtime (what a device app does)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli import app, console


@app.command("run")
def run_bundle(
    bundle: Path = typer.Argument(..., help="bundle folder or .tar"),
    prompt: str = typer.Option(..., "--prompt", help="text prompt (with --image: the question)"),
    image: Optional[Path] = typer.Option(None, "--image", help="RGB image of the model's size (VLM bundles)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    fit_image: bool = typer.Option(False, "--fit-image", help="convert/resize the image to the model's input"),
    allow_foreign_target: bool = typer.Option(False, "--allow-foreign-target",
                                              help="run a bundle built for another device on this host"),
    no_kernel: bool = typer.Option(False, "--no-kernel", help="force the portable function-body fallback"),
    key: Optional[list[Path]] = typer.Option(None, "--key", help="trusted public key (.pub), repeatable: refuse "
                                             "a bundle not signed by one of them"),
    allow_unvalidated: bool = typer.Option(False, "--allow-unvalidated",
                                           help="run a bundle that never passed the accuracy gate"),
    device: str = typer.Option("auto", "--device", help="auto (the target's providers), cpu, cuda or cuda:N "
                                                        "(ONNX Runtime's CUDA provider: needs onnxruntime-gpu)"),
) -> None:
    """Stream a completion from a bundle through mopeq_runtime."""
    import mopeq_runtime

    model = mopeq_runtime.load(bundle, allow_foreign_target=allow_foreign_target, use_kernel=not no_kernel,
                               trusted_keys=key or None, allow_unvalidated=allow_unvalidated, device=device)
    if model.target_note:
        console.print(f"[yellow]note:[/] {model.target_note}; running anyway on {', '.join(model.providers)}")
    console.print(f"[dim]{model.kernel.reason}[/]")

    def out(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if image is None:
        out(prompt)
    elif fit_image and model.prompt_format is not None:
        from mopeq_runtime.prompt import load_image

        image = load_image(str(image), model.prompt_format.image_size, fit=True)
    g = model.generate(prompt, max_new_tokens=max_new_tokens, image=image, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stream=out)
    sys.stdout.write("\n")
    console.print(f"[dim]{g.prompt_tokens} prompt tokens, {len(g.token_ids)} new, stopped: {g.stop_reason}[/]")
