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


MAX_KEY_BYTES = 64 << 10  # a PEM public key is a few hundred bytes
MAX_SIGNATURE_BYTES = 64 << 10


def _read_key_file(p: Path, what: str = "public key") -> bytes:
    """The bytes of a key file, refused clearly when it is absent, a folder, a device or absurdly large."""
    import stat as _stat

    try:
        st = p.stat()
    except FileNotFoundError:
        raise BundleError(f"{what} file {p} not found") from None
    except OSError as e:
        raise BundleError(f"cannot read the {what} file {p}: {e.strerror}") from None
    if _stat.S_ISDIR(st.st_mode):
        example = "NAME.key" if "sign" in what else "NAME.pub"
        raise BundleError(f"{what} {p} is a folder; give the key file itself (e.g. {example} from `keygen`)")
    if not _stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} {p} is not a regular file (a device or pipe); give the key file itself")
    if st.st_size > MAX_KEY_BYTES:
        raise BundleError(f"{what} {p} has {st.st_size} bytes; a key file has a few hundred: give the key file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {what} file {p}: {e.strerror}") from None


def raw_public_key(key: KeyLike) -> bytes:
    """The 32 raw bytes of an ed25519 public key given as a PEM file, PEM bytes or raw bytes."""
    _, serialization, ed25519 = _crypto()
    data = key
    if isinstance(key, (str, Path)):
        data = _read_key_file(Path(key))
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


def parse_signature(data: bytes, source: str) -> dict:
    """manifest.sig's record from its bytes: every field present and of its type (else one clear error)."""
    try:
        d = json.loads(data.decode("utf-8"))
        if not isinstance(d, dict) or d.get("kind") != SIG_KIND or d.get("algorithm") != ALGORITHM:
            raise ValueError(f"kind/algorithm not {SIG_KIND}/{ALGORITHM}")
        for field in ("key_id", "public_key", "signature"):
            if not isinstance(d.get(field), str):
                raise ValueError(f"no {field!r} string")
        base64.b64decode(d["signature"], validate=True)
        base64.b64decode(d["public_key"], validate=True)
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise BundleError(f"{source} is malformed ({e}); re-sign the bundle") from None
    return d


def verify_signature(manifest_bytes: bytes, sig: dict | None, trusted_keys: Iterable[KeyLike],
                     label: str) -> SignatureInfo:
    """Refuse unless `sig` (manifest.sig's record) is a valid ed25519 signature of exactly `manifest_bytes` (the
    bytes the manifest was parsed from) by one of the trusted keys."""
    InvalidSignature, _, ed25519 = _crypto()
    keys = [raw_public_key(k) for k in trusted_keys]
    if not keys:
        raise BundleError("trusted_keys is empty: give at least one public key, or None to skip the signature check")
    if sig is None:
        raise BundleError(f"{label} is not signed (no {SIGNATURE}) but trusted keys were given; sign it with "
                          "`mopeq-export sign` or build with --sign-key")
    signature = base64.b64decode(sig["signature"])
    for raw in keys:
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return SignatureInfo(key_id(raw))
    raise BundleError(f"{label}: the manifest's signature (key {sig['key_id']}) does not verify with any trusted "
                      "key; the manifest was altered after signing or it was signed by another key")
