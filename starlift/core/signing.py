"""Artifact signatures: Ed25519 over the manifest, which already hashes every file.

The manifest's sha256 values catch corruption, not tampering: whoever can write the folder can
change a weight and rewrite the manifest. A detached signature over the manifest's exact bytes,
checked against a public key the deployment trusts, closes that: any changed file changes its
hash, any changed hash changes the manifest, and a changed manifest no longer matches the
signature. Files the manifest does not list are refused by a signed verification too.

Why Ed25519 through ``cryptography``: small keys and signatures, no parameters to get wrong, and
the library every Python TLS stack already depends on. Keyless signing (sigstore: an OIDC identity
and a transparency log) needs network access these machines do not have; the signature file
carries a ``scheme`` so a ``"sigstore"`` bundle can sit beside ``"ed25519"`` later.

Files: ``signature.json`` in the artifact folder::

    {"format": "starlift-signature/1", "scheme": "ed25519",
     "key_fingerprint": "SHA256:<base64 of sha256(raw public key)>",
     "manifest_sha256": "<hex>", "signature": "<base64>", "signed_at": "<UTC ISO 8601>"}

Keys are PEM files: the private key PKCS#8 (written 0600), the public key SubjectPublicKeyInfo
beside it as ``KEYFILE.pub``. A trust store is a public-key file or a folder of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ArtifactError, StarliftError, UsageError

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "starlift-signature/1"
SCHEME = "ed25519"
PUBLIC_SUFFIXES = (".pub", ".pem")
PASSPHRASE_ENV = "STARLIFT_KEY_PASSPHRASE"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:  # an extra: the core install runs unsigned artifacts without it
        raise StarliftError("artifact signatures need the cryptography package: pip install 'starlift[sign]'") from e
    return serialization, ed25519


def fingerprint(public_key) -> str:
    """``SHA256:<base64>`` of the raw 32-byte public key (the OpenSSH fingerprint style)."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_keypair(keyfile: str | Path, force: bool = False) -> dict[str, str]:
    """Write a new Ed25519 private key to ``keyfile`` (0600) and its public key to ``keyfile.pub``."""
    serialization, ed25519 = _crypto()
    keyfile = Path(keyfile)
    public = keyfile.with_name(keyfile.name + ".pub")
    for path in (keyfile, public):
        if path.exists() and not force:
            raise UsageError(f"{path} exists; pass --force to replace it (the old key can then no longer sign)")
    if not keyfile.absolute().parent.is_dir():
        raise UsageError(f"cannot write {keyfile}: its folder {keyfile.absolute().parent} does not exist")
    key = ed25519.Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in (keyfile, public):
        if force and path.exists():
            path.unlink()
    _write_new(keyfile, private_pem, 0o600)
    _write_new(public, public_pem, 0o644)
    return {"private_key": str(keyfile), "public_key": str(public), "fingerprint": fingerprint(key.public_key())}


def _load_private(keyfile: str | Path):
    serialization, ed25519 = _crypto()
    path = Path(keyfile)
    if not path.is_file():
        raise UsageError(f"{path} is not a file; create a signing key with `starlift keygen {path}`")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase.encode() if passphrase else None)
    except TypeError as e:  # encrypted without a passphrase, or a passphrase for a plain key
        raise UsageError(f"{path} is encrypted: set {PASSPHRASE_ENV} to its passphrase") from e
    except ValueError as e:
        raise UsageError(f"{path} is not a PEM private key ({e}); `starlift keygen` writes one") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path} is a {type(key).__name__}, not an Ed25519 key; create one with `starlift keygen`")
    return key


def check_signing_key(keyfile: str | Path) -> str:
    """Load the private key now (so a long export or quantization cannot fail at its last step); its fingerprint."""
    return fingerprint(_load_private(keyfile).public_key())


def _load_public_file(path: Path):
    serialization, ed25519 = _crypto()
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise UsageError(f"{path} is a private key; give its public key ({path.name}.pub), which is what servers "
                         "should hold")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise UsageError(f"{path} is not a PEM public key ({e}); `starlift keygen KEY` writes KEY.pub") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def trusted_keys(spec: str | Path) -> dict[str, Any]:
    """Public keys by fingerprint from a key file, or from every *.pub / *.pem file in a folder."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PUBLIC_SUFFIXES)
        if not files:
            raise UsageError(f"{path} holds no public keys (*.pub or *.pem files); copy the signer's KEY.pub into it")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"{path} does not exist; pass the signer's public key file (KEY.pub) or a folder of them")
    keys = {}
    for f in files:
        key = _load_public_file(f)
        keys[fingerprint(key)] = key
    return keys


def sign_artifact(folder: str | Path, keyfile: str | Path) -> dict[str, str]:
    """Write ``signature.json`` over the folder's manifest.json with the private key in ``keyfile``."""
    from .artifact import MANIFEST, read_manifest

    folder = Path(folder)
    read_manifest(folder)  # a folder that is an artifact, with a manifest of the right format
    key = _load_private(keyfile)
    manifest_bytes = (folder / MANIFEST).read_bytes()
    record = {
        "format": SIGNATURE_FORMAT,
        "scheme": SCHEME,
        "key_fingerprint": fingerprint(key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
        "signed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fd, tmp = tempfile.mkstemp(prefix=".signature-", dir=folder)  # then one rename: never half-written
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def check_signature(folder: Path, manifest_bytes: bytes, keys: dict[str, Any]) -> dict[str, Any]:
    """Refuse unless ``signature.json`` is a valid signature of ``manifest_bytes`` by a trusted key."""
    path = folder / SIGNATURE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not signed (no {SIGNATURE}); sign it with `starlift sign {folder} --key KEY` "
                            "on the build machine, or load it without a public key")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-sign the artifact") from e
    if not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT:
        raise ArtifactError(f"{path} is not a {SIGNATURE_FORMAT} file; re-sign the artifact")
    if record.get("scheme") != SCHEME:
        raise ArtifactError(f"{path} uses signature scheme {record.get('scheme')!r}; this starlift verifies {SCHEME!r}")
    key = keys.get(record.get("key_fingerprint"))
    if key is None:
        raise ArtifactError(f"{folder} is signed by key {record.get('key_fingerprint')}, which is not among the trusted "
                            f"keys ({', '.join(sorted(keys))}); add the signer's public key or re-sign with a trusted key")
    try:
        signature = base64.b64decode(record.get("signature", ""), validate=True)
        key.verify(signature, manifest_bytes)
    except Exception as e:  # cryptography's InvalidSignature, or a malformed base64/length
        raise ArtifactError(f"{folder}: the signature does not match manifest.json (the manifest was changed after "
                            "signing, or the signature belongs to another artifact); refusing it") from e
    return record
