"""``starlift export CHECKPOINT OUT [--flavour] [--dtype] [--opset] [--force]``."""

from __future__ import annotations

import argparse

from starlift.cli import add_artifact_output_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="Hugging Face StarCoder2 folder, a bundled name (starcoder2-nano), or a Hub id "
                   "(org/name) already in the local Hugging Face cache")
    p.add_argument("out", help="artifact folder to write (atomically; missing parent folders are created)")
    p.add_argument("--flavour", default="portable", choices=["portable", "ort"],
                   help="portable: standard ONNX ops for any runtime; ort: fused for ONNX Runtime")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weight and KV-cache dtype; LayerNorm, softmax and logits stay fp32")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17..23")
    p.add_argument("--validate-layers", type=int, default=None, metavar="N",
                   help="validate the graph cut after N layers (embedding, N layers, final norm, LM head) instead of "
                        "the whole graph; 0 = the whole graph (default: whole up to 1 GiB of weights, else 2 layers)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle weights (*.bin); they are loaded with weights_only=True")
    add_artifact_output_options(p, "export")


def main(args: argparse.Namespace) -> int:
    from starlift.core.memory import parse_size
    from starlift.export import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.out, flavour=args.flavour, dtype=args.dtype, opset=args.opset,
                                 force=args.force, sign_key=args.sign_key, progress=not args.no_progress, allow_pickle=args.allow_pickle,
                                 validate_layers=args.validate_layers,
                                 max_memory=parse_size(args.max_memory) if args.max_memory else None)
    v = manifest["validation"]
    verdict = (f"max |logit error| {v['max_abs_error']:.2e} <= {v['tolerance']:g}" if v.get("passed")
               else f"not validated ({v.get('skipped')})")
    if v.get("graph") == "cut":
        verdict += f" (on the graph cut after {v['layers']} of {v['of_layers']} layers)"
    print(f"wrote {args.out}: {manifest['flavour']} {manifest['dtype']}, "
          f"{manifest['size']['onnx_bytes'] / 2**20:.1f} MiB (x{manifest['size']['ratio']:.3f} of the weights), "
          f"{verdict}")
    return 0
