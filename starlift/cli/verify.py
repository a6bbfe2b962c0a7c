"""``starlift verify ARTIFACT``: re-hash every file, refuse names leaving the folder, run the ONNX checker."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder written by starlift export / quantize")


def main(args: argparse.Namespace) -> int:
    from starlift.core.artifact import verify

    manifest = verify(args.artifact)
    print(f"{args.artifact}: OK ({len(manifest['files'])} files, {manifest.get('flavour')} {manifest.get('dtype')})")
    return 0
