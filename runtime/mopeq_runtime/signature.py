"""Bundle signatures (docs/BUNDLE.md, "Signatures"): ed25519 over the exact bytes of manifest.json.

The manifest lists every other file with its size and sha256, so a valid signature plus a passing hash check
authenticates the whole bundle: graphs, packed weights, the native kernel library, the tokenizer and the
validation result. The signature lives in `manifest.sig` (JSON) beside the manifest.

Verification needs the `cryptography` package; it is imported only when keys are given, so a device app
that does not check signatures does not need it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from .errors import BundleError

SIGNATURE = "manifest.sig"
SIG_KIND = "mopeq.signature"
ALGORITHM = "ed25519"

KeyLike = Union[str, Path, bytes]  # a PEM public-key file, PEM bytes, or the raw 32-byte key


@dataclass(frozen=True)
class SignatureInfo:
    key_id: str  # first 16 hex digits of sha256(raw public key)
    algorithm: str = ALGORITHM


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - the toolchain depends on it; a bare device install may not
        raise BundleError("checking bundle signatures needs the `cryptography` package: pip install cryptography") from None
    return InvalidSignature, serialization, ed25519


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def raw_public_key(key: KeyLike) -> bytes:
    """The 32 raw bytes of an ed25519 public key given as a PEM file, PEM bytes or raw bytes."""
    _, serialization, ed25519 = _crypto()
    data = key
    if isinstance(key, (str, Path)):
        p = Path(key)
        if not p.is_file():
            raise BundleError(f"public key file {p} not found")
        data = p.read_bytes()
    if isinstance(data, bytes) and len(data) == 32:
        return data
    try:
        pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{key if isinstance(key, (str, Path)) else 'key'} is not a PEM public key ({e}); "
                          "give the .pub file from `mopeq-export keygen`") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise BundleError("bundle signatures use ed25519 keys; this public key is of another type")
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_signature(root: Path) -> dict | None:
    p = Path(root) / SIGNATURE
    if not p.exists():
        return None
    if not p.is_file() or p.is_symlink():
        raise BundleError(f"{p} is not a regular file; the bundle was tampered with")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        if d.get("kind") != SIG_KIND or d.get("algorithm") != ALGORITHM:
            raise ValueError(f"kind/algorithm not {SIG_KIND}/{ALGORITHM}")
        base64.b64decode(d["signature"], validate=True)
        base64.b64decode(d["public_key"], validate=True)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{p} is malformed ({e}); re-sign the bundle") from None
    return d


def verify_signature(root: Path, trusted_keys: Iterable[KeyLike]) -> SignatureInfo:
    """Refuse the bundle unless manifest.sig is a valid ed25519 signature of manifest.json by a trusted key."""
    InvalidSignature, _, ed25519 = _crypto()
    keys = [raw_public_key(k) for k in trusted_keys]
    if not keys:
        raise BundleError("trusted_keys is empty: give at least one public key, or None to skip the signature check")
    sig = read_signature(root)
    if sig is None:
        raise BundleError(f"{root} is not signed (no {SIGNATURE}) but trusted keys were given; sign it with "
                          "`mopeq-export sign` or build with --sign-key")
    message = (Path(root) / "manifest.json").read_bytes()
    signature = base64.b64decode(sig["signature"])
    for raw in keys:
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except InvalidSignature:
            continue
        return SignatureInfo(key_id(raw))
    claimed = sig.get("key_id", "?")
    raise BundleError(f"{root}: the manifest's signature (key {claimed}) does not verify with any trusted key; "
                      "the manifest was altered after signing or it was signed by another key")
