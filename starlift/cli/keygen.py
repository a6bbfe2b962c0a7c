"""``starlift keygen KEYFILE``: a new Ed25519 signing key (KEYFILE, 0600) and its public key (KEYFILE.pub)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("keyfile", help="private key file to write (mode 0600); the public key goes to KEYFILE.pub")
    p.add_argument("--force", action="store_true", help="replace existing key files (default: refuse)")


def main(args: argparse.Namespace) -> int:
    import os

    from starlift.core.signing import PASSPHRASE_ENV, generate_keypair

    info = generate_keypair(args.keyfile, force=args.force)
    how = f"encrypted with ${PASSPHRASE_ENV}" if os.environ.get(PASSPHRASE_ENV) else "unencrypted"
    print(f"wrote {info['private_key']} (private, mode 0600, {how}) and {info['public_key']} (public: give it to "
          f"whoever loads your artifacts); fingerprint {info['fingerprint']}")
    return 0
