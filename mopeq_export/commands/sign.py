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
    from mopeq_runtime.host import check_elf_bytes
    from mopeq_runtime.loader import check_validated, open_bundle

    from ..errors import MopeqError
    from ..signing import load_private_key, sign_bundle

    if not bundle.is_dir():
        raise MopeqError(f"{bundle} is not a bundle folder; sign the folder (or build with --tar --sign-key)")
    private = load_private_key(key)  # a bad key fails before the bundle is read
    # never sign what does not match its own manifest: the bytes signed are the bytes the files were checked
    # against (read once), not the file read again
    with open_bundle(bundle, verify=True) as b:
        check_validated(b.manifest, allow_unvalidated=False)
        if b.manifest.kernel.library:
            check_elf_bytes(b.files.bytes(b.manifest.kernel.library), b.manifest.kernel.library)
        rec = sign_bundle(bundle, private, b.manifest_bytes)
    console.print(f"signed {bundle}/manifest.json with key {rec['key_id']} -> {bundle}/manifest.sig")


@app.command()
def verify(bundle: Path = typer.Argument(..., help="bundle folder or archive"),
           key: Optional[list[Path]] = typer.Option(None, "--key", help="trusted public key (.pub), repeatable: "
                                                    "the bundle must be signed by one of them"),
           allow_unvalidated: bool = typer.Option(False, "--allow-unvalidated",
                                                  help="accept a bundle that never passed the accuracy gate")) -> None:
    """Check a bundle as a release pipeline should: every hash, the gate result, and (with --key) the signature.

    Exit 0 only when every check passes; otherwise one line saying what failed and exit 2."""
    from mopeq_runtime.host import check_elf_bytes
    from mopeq_runtime.loader import check_validated, open_bundle

    with open_bundle(bundle, verify=True, trusted_keys=key or None) as b:
        manifest = b.manifest
        check_validated(manifest, allow_unvalidated)
        if manifest.kernel.library:
            check_elf_bytes(b.files.bytes(manifest.kernel.library), manifest.kernel.library)
        sig, signed_by = b.signature, b.signed_by
    signed = (f"signed by trusted key {signed_by.key_id}" if signed_by else f"signed by key {sig['key_id']} (not "
              "checked: no --key)") if sig else "unsigned"
    console.print(f"[green]ok[/]: {bundle}: {len(manifest.files)} files match their hashes, gate "
                  f"{'passed' if manifest.validation.get('passed') else 'not passed (allowed)'}, {signed}")
