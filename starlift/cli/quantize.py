"""``starlift quantize ARTIFACT OUT --mode fp16|bf16|int8|int4 [...]``."""

from __future__ import annotations

import argparse

from starlift.cli import add_artifact_output_options


def _block_size(value: str):
    return value if value == "auto" else int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="an fp32 artifact folder written by starlift export")
    p.add_argument("out", help="output artifact folder (written atomically)")
    p.add_argument("--mode", required=True, choices=["fp16", "bf16", "int8", "int4"], help="precision of OUT")
    p.add_argument("--block-size", type=_block_size, default=32, choices=[16, 32, 64, 128, 256, "auto"],
                   help="weights sharing one scale (and zero point); larger blocks are smaller and faster and "
                        "lose more (int4 on the 113M shape, AVX-512: 128 prefills and decodes about 1.2x faster "
                        "than 32; docs/guide/quantize.md). auto: the largest of 128, 64, 32 that passes the "
                        "quality gate")
    p.add_argument("--algo", default="rtn", choices=["rtn", "hqq", "gptq"],
                   help="int4 weight rounding: round to nearest; HQQ (float zero points, which ONNX Runtime's "
                        "CPU kernels run about 9x slower than rtn's); GPTQ (needs --calibration). hqq and gptq "
                        "need starlift[export]")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute type on CPU: 4 = int8 compute (default: 5-9x faster than 0 = unset "
                        "on this CPU, same top-1 on starcoder2-nano)")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric weights (default: asymmetric with zero points; on starcoder2-nano int4 top-1 "
                        "0.942 asymmetric vs 0.931 symmetric)")
    p.add_argument("--int8-method", default="nbits", choices=["nbits", "dynamic", "dynamic-row"],
                   help="int8: weight-only MatMulNBits (default), dynamic int8 activations with one scale per "
                        "tensor (onnxruntime's quantize_dynamic), or one scale per row (token): int8 x int8 "
                        "MatMuls whose rows do not depend on their batch-mates")
    p.add_argument("--head-bits", type=int, default=None, choices=[4, 8, 32],
                   help="bits of the head, 32 = kept in float (default: 8 for the LM head, 32 for a classifier's)")
    p.add_argument("--head-block-size", type=int, default=None, choices=[16, 32, 64, 128, 256],
                   help="block size of the LM head's scales (default: 128 for int4's 8-bit head, else --block-size)")
    p.add_argument("--int8-gemm", action="store_true",
                   help="int4: also write int8_gemm.onnx, which runs prompts and decode steps of several sequences "
                        "on the int8 x int8 GEMM, its weights the 4-bit ones on one grid per column (faster on CPUs "
                        "without AVX-512 VNNI; one more byte per weight; docs/guide/quantize.md)")
    p.add_argument("--calibration", default=None, help="code text for GPTQ calibration (required by --algo gptq)")
    p.add_argument("--eval-text", default=None, help="code text for the quality measurement (default: a built-in snippet and four stdlib modules)")
    p.add_argument("--eval-windows", type=int, default=4, help="windows of up to 1024 tokens to measure on")
    p.add_argument("--exclude", action="append", default=None, help="node name to keep in float (repeatable; default: none)")
    p.add_argument("--allow-quality-loss", action="store_true", help="keep the output even below the quality gate")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="int4/int8 one weight at a time from the source's data file (default: for fp16 sources "
                        "and sources above 2 GiB)")
    p.add_argument("--quality-layers", type=int, default=None, metavar="N",
                   help="measure quality on both graphs cut after N layers (default: whole graphs up to 2 GiB of "
                        "source weights, else 2 layers; 0 = whole)")
    add_artifact_output_options(p, "quantization")


def main(args: argparse.Namespace) -> int:
    from starlift.cli.generate import _read_prompt_file
    from starlift.core.memory import parse_size
    from starlift.quantize import quantize_artifact

    text = _read_prompt_file(args.eval_text) if args.eval_text else None
    m = quantize_artifact(args.artifact, args.out, mode=args.mode, block_size=args.block_size, algo=args.algo,
                          accuracy_level=args.accuracy_level, symmetric=args.symmetric,
                          int8_method=args.int8_method, head_bits=args.head_bits,
                          head_block_size=args.head_block_size, calibration=args.calibration,
                          exclude=args.exclude, eval_text=text, eval_windows=args.eval_windows, force=args.force, sign_key=args.sign_key,
                          allow_quality_loss=args.allow_quality_loss, progress=not args.no_progress,
                          stream=args.stream, quality_layers=args.quality_layers,
                          max_memory=parse_size(args.max_memory) if args.max_memory else None,
                          int8_gemm=args.int8_gemm)
    q = m["quality"]
    if "label_agreement" in q:  # a classifier: judged on its labels and probabilities
        print(f"wrote {args.out}: {args.mode}, {m['size']['onnx_bytes'] / 2**20:.1f} MiB "
              f"(x{m['size']['ratio_to_fp32']:.3f} of fp32); label agreement {q['label_agreement']:.3f}, "
              f"max |prob change| {q['max_prob_error']:.3g} over {q['rows']} outputs"
              + ("" if q["passed"] else " (BELOW THE QUALITY GATE, kept by --allow-quality-loss)"))
        return 0
    source = m["size"].get("source_dtype", "fp32")  # a streamed int4/int8 may come from an fp16 export
    print(f"wrote {args.out}: {args.mode}, {m['size']['onnx_bytes'] / 2**20:.1f} MiB "
          f"(x{m['size']['ratio_to_fp32']:.3f} of the {source} source); top-1 {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.2e}, "
          f"perplexity {q['perplexity_fp32']:.3f} -> {q['perplexity']:.3f}"
          + (f" (graphs cut after {q['layers']} of {q['of_layers']} layers)" if q.get("graph") == "cut" else "")
          + ("" if q["passed"] else " (BELOW THE QUALITY GATE, kept by --allow-quality-loss)"))
    search = m["quantization"].get("block_size_search")
    if search:
        print(f"  block size {search['chosen']}, "
              + ("the largest the gate passed" if q["passed"] else "none passed the gate: kept by --allow-quality-loss")
              + "".join(f"; {r['block_size']}: top-1 {r['top1_agreement']:.3f}, below it" for r in search["rejected"]))
    if "int8_gemm" in q:
        g, wide = m["quantization"]["int8_gemm"], q["int8_gemm"]
        print(f"  {g['file']} (prompts of {g['min_tokens']}+ tokens, decode steps of {g['min_rows']}+ rows, on the "
              f"integer GEMM): top-1 {wide['top1_agreement']:.3f}, mean KL {wide['mean_kl']:.2e}, "
              f"perplexity {wide['perplexity']:.3f}")
    return 0
