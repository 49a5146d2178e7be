"""`mopeq-export keygen | sign | verify`: ed25519-signed bundles for release pipelines (docs/BUNDLE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli import app, console


@app.command()
def keygen(out: Path = typer.Option(..., "--out", help="key name: writes NAME.key (secret, 0600) and NAME.pub"),
           force: bool = typer.Option(False, "--force", help="replace existing NAME.key / NAME.pub")) -> None:
    """Create an ed25519 key pair for signing bundles."""
    from ..signing import generate_keypair

    private, public = generate_keypair(out, force=force)
    console.print(f"private key -> {private} (keep it secret); public key -> {public} (ship it with the app)")


@app.command()
def sign(bundle: Path = typer.Argument(..., help="bundle folder"),
         key: Path = typer.Option(..., "--key", help="ed25519 private key (NAME.key from `keygen`)")) -> None:
    """Sign a bundle folder's manifest (writes manifest.sig); its hashes are checked first."""
    from mopeq_runtime.loader import check_validated, open_bundle

    from ..errors import MopeqError
    from ..signing import sign_bundle

    if not bundle.is_dir():
        raise MopeqError(f"{bundle} is not a bundle folder; sign the folder (or build with --tar --sign-key)")
    _, manifest, _ = open_bundle(bundle, verify=True)  # never sign what does not match its own manifest
    check_validated(manifest, allow_unvalidated=False)
    rec = sign_bundle(bundle, key)
    console.print(f"signed {bundle}/manifest.json with key {rec['key_id']} -> {bundle}/manifest.sig")


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle folder or archive"),
           key: Optional[list[Path]] = typer.Option(None, "--key", help="trusted public key (.pub), repeatable: "
                                                    "the bundle must be signed by one of them"),
           allow_unvalidated: bool = typer.Option(False, "--allow-unvalidated",
                                                  help="accept a bundle that never passed the accuracy gate")) -> None:
    """Check a bundle as a release pipeline should: every hash, the gate result, and (with --key) the signature.

    Exit 0 only when every check passes; otherwise one line saying what failed and exit 2."""
    import shutil

    from mopeq_runtime.host import check_elf
    from mopeq_runtime.loader import check_validated, open_bundle
    from mopeq_runtime.signature import read_signature

    root, manifest, tmp = open_bundle(bundle, verify=True, trusted_keys=key or None)
    try:
        check_validated(manifest, allow_unvalidated)
        if manifest.kernel.library:
            check_elf(root / manifest.kernel.library)
        sig = read_signature(root)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    signed = (f"signed by trusted key {sig['key_id']}" if key else f"signed by key {sig['key_id']} (not checked: "
              "no --key)") if sig else "unsigned"
    console.print(f"[green]ok[/]: {bundle}: {len(manifest.files)} files match their hashes, gate "
                  f"{'passed' if manifest.validation.get('passed') else 'not passed (allowed)'}, {signed}")
