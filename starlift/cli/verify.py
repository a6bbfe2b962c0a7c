"""``starlift verify ARTIFACT [--public-key PUB]``: re-hash every file, refuse names leaving the folder,
run the ONNX checker; with a public key, check the manifest's signature and refuse unlisted files.

Loading trusts a stamp of the files' size, mtime, ctime and inode once they were hashed intact;
this command always hashes every byte (and refreshes the stamp)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder written by starlift export / quantize; every byte is hashed")
    p.add_argument("--public-key", default=None,
                   help="trusted signer's public key (KEY.pub) or a folder of them: also require a valid signature "
                        "(default: hashes only, which catch corruption but not tampering)")


def main(args: argparse.Namespace) -> int:
    from starlift.core.artifact import verify

    manifest = verify(args.artifact, public_key=args.public_key)
    signed = ", signature OK" if args.public_key else ""
    graph = manifest.get("onnx_checker", "ONNX checker passed")
    print(f"{args.artifact}: OK ({len(manifest['files'])} files hashed, {manifest.get('flavour')} "
          f"{manifest.get('precision', manifest.get('dtype'))}{signed}; {graph})")
    return 0
