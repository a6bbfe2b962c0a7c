"""``starlift sign ARTIFACT --key KEYFILE``: a detached Ed25519 signature over the artifact's manifest."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder written by starlift export / quantize")
    p.add_argument("--key", required=True, help="private key written by `starlift keygen` "
                   "(encrypted keys read their passphrase from $STARLIFT_KEY_PASSPHRASE)")


def main(args: argparse.Namespace) -> int:
    from starlift.core.artifact import verify
    from starlift.core.signing import SIGNATURE, sign_artifact

    verify(args.artifact, check_onnx=False)  # sign only what still matches its manifest
    record = sign_artifact(args.artifact, args.key)
    print(f"signed {args.artifact} ({SIGNATURE}) with key {record['key_fingerprint']}")
    return 0
