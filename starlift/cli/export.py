"""``starlift export CHECKPOINT OUT [--flavour] [--dtype] [--opset] [--force]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="Hugging Face StarCoder2 folder, a bundled name (starcoder2-nano), or a Hub id "
                   "(org/name) already in the local Hugging Face cache")
    p.add_argument("out", help="artifact folder to write (atomically; missing parent folders are created)")
    p.add_argument("--flavour", default="portable", choices=["portable", "ort"],
                   help="portable: standard ONNX ops for any runtime; ort: fused for ONNX Runtime")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight and KV-cache dtype; LayerNorm, softmax and logits stay fp32")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17..23")
    p.add_argument("--sign-key", default=None, help="sign the artifact with this private key as it is written "
                   "(see `starlift keygen`; default: unsigned)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle weights (*.bin); they are loaded with weights_only=True")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")


def main(args: argparse.Namespace) -> int:
    from starlift.export import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.out, flavour=args.flavour, dtype=args.dtype, opset=args.opset,
                                 force=args.force, sign_key=args.sign_key, progress=not args.no_progress, allow_pickle=args.allow_pickle)
    v = manifest["validation"]
    verdict = (f"max |logit error| {v['max_abs_error']:.2e} <= {v['tolerance']:g}" if v.get("passed")
               else f"not validated ({v.get('skipped')})")
    print(f"wrote {args.out}: {manifest['flavour']} {manifest['dtype']}, "
          f"{manifest['size']['onnx_bytes'] / 2**20:.1f} MiB (x{manifest['size']['ratio']:.3f} of the weights), "
          f"{verdict}")
    return 0
