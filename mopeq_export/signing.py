"""Signing bundles: ed25519 keys (`keygen`) and manifest.sig (`build --sign-key`, `sign`).

The format and what it covers are in docs/BUNDLE.md ("Signatures"); verification lives in the runtime
(`mopeq_runtime.signature`), which the device runs.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mopeq_runtime.signature import ALGORITHM, SIG_KIND, SIGNATURE, key_id

from .errors import MopeqError
from .fsutil import check_out, staged_file


def generate_keypair(prefix: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """PREFIX.key (PKCS#8 PEM, unencrypted, mode 0600: keep it secret) and PREFIX.pub (PEM)."""
    if not str(prefix).strip() or Path(prefix).name in ("", ".", ".."):
        raise MopeqError(f"--out {str(prefix)!r} is not a key name; give one, e.g. --out keys/release "
                         "(writes keys/release.key and keys/release.pub)")
    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (private, public):
        check_out(p, "file", force=force, file=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with staged_file(public, force=force) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    with staged_file(private, force=force) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(pem)
    return private, public


def load_private_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    from mopeq_runtime.signature import _read_key_file

    p = Path(path)
    if not p.exists():
        raise MopeqError(f"signing key {p} not found; create one with `mopeq-export keygen --out NAME`")
    data = _read_key_file(p, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise MopeqError(f"{p} is not an unencrypted PEM private key ({e}); use the .key file from "
                         "`mopeq-export keygen`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MopeqError(f"{p} is not an ed25519 key; bundle signatures use ed25519 (`mopeq-export keygen`)")
    return key


def signature_record(manifest_bytes: bytes, key: ed25519.Ed25519PrivateKey) -> dict:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kind": SIG_KIND, "algorithm": ALGORITHM, "key_id": key_id(raw),
            "public_key": base64.b64encode(raw).decode(), "signed": "manifest.json",
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}


def sign_bundle(folder: str | Path, key: str | Path | ed25519.Ed25519PrivateKey,
                manifest_bytes: bytes | None = None) -> dict:
    """Write FOLDER/manifest.sig: the signature of `manifest_bytes` (the manifest as it was checked; default:
    FOLDER/manifest.json as read now, for a folder only this process writes, e.g. a build's staging folder)."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if manifest_bytes is None:
        if not manifest.is_file():
            raise MopeqError(f"{folder} is not a bundle folder (no manifest.json); sign the folder `build` wrote")
        manifest_bytes = manifest.read_bytes()
    private = key if isinstance(key, ed25519.Ed25519PrivateKey) else load_private_key(key)
    rec = signature_record(manifest_bytes, private)
    with staged_file(folder / SIGNATURE, flag="the signature") as tmp:
        tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return rec
