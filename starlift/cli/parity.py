"""``starlift parity PATH --reference CHECKPOINT [--backend B ...] [--text FILE] [--localize] [--json OUT]``,
or ``starlift parity --url http://HOST:PORT --reference CHECKPOINT``: a running server's logprobs.

Exit code 0 only when every backend passes every check: pipelines gate releases on it. The
default text and windows are the quantize gate's, so an artifact that passed its gate passes here.
"""

from __future__ import annotations

import argparse

from starlift.core import tolerance
from starlift.core.errors import UsageError
from starlift.runtimes import BACKENDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=None,
                   help="artifact folder (or a checkpoint folder with --backend torch); omit it with --url")
    p.add_argument("--url", default=None,
                   help="instead of a folder, a running `starlift serve` endpoint (http://HOST:PORT): its "
                        "/v1/completions logprobs, one teacher-forced request per position")
    p.add_argument("--api-key", default=None, help="with --url: the server's bearer token (default: $STARLIFT_API_KEY)")
    p.add_argument("--top-logprobs", type=int, default=5, help="with --url: logprobs compared per position (default 5)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="with --url: reference tokens before the first compared position (default 64)")
    p.add_argument("--reference", required=True, help="the checkpoint the artifact must match")
    p.add_argument("--backend", action="append", default=None, choices=list(BACKENDS),
                   help="backend to check (repeatable; default: onnxruntime)")
    p.add_argument("--text", default=None,
                   help="a UTF-8 text file to teacher-force (default: the quantize gate's text, a built-in snippet "
                        "and four standard-library modules)")
    p.add_argument("--windows", type=int, default=4, help="windows of up to 1024 tokens read from the text (default 4)")
    p.add_argument("--window-tokens", type=int, default=1024,
                   help="tokens per window (default 1024; fewer keep a big model's reference pass small)")
    p.add_argument("--steps", type=int, default=32, help="cached decode steps inside the first window (default 32)")
    p.add_argument("--greedy-steps", type=int, default=16, help="greedy tokens compared with the reference's")
    p.add_argument("--precision", default=None, choices=list(tolerance.PRECISIONS),
                   help="tolerance set (default: the artifact's precision)")
    p.add_argument("--localize", action="store_true",
                   help="per backend, compare the residual stream layer by layer with the reference's and report "
                        "the first layer and sub-block over tolerance (onnxruntime, openvino)")
    p.add_argument("--localize-tokens", type=int, default=None,
                   help="prefill length of the localization probe (default: the sliding window + 16, at least 64)")
    p.add_argument("--plot", default=None, help="with --localize: write the error curves to this PNG (matplotlib)")
    p.add_argument("--json", default=None, help="write the report as JSON here (default: only the table is printed)")
    p.add_argument("--reference-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype the torch reference holds its weights in; it computes in fp32 (default fp32; fp16 "
                        "halves its memory for big checkpoints, e.g. starcoder2-7b: 14.4 GB instead of 28.8)")


def main(args: argparse.Namespace) -> int:
    from starlift.evaluation import parity

    if args.plot and not args.localize:
        raise UsageError("--plot draws the localization curves: add --localize")
    text = None
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"{args.text} is not valid UTF-8 ({e.reason} at byte {e.start}); pass a UTF-8 text file") from e
        except OSError as e:
            raise UsageError(f"cannot read {args.text}: {e.strerror}") from e
    if args.url:
        return _over_http(args, text)
    if args.path is None:
        raise UsageError("give an artifact folder to check, or --url of a running server")
    report = parity.run(args.path, args.reference, args.backend or ["onnxruntime"], text=text, steps=args.steps,
                        greedy_steps=args.greedy_steps, precision=args.precision, windows=args.windows,
                        window_tokens=args.window_tokens, localize=args.localize,
                        localize_tokens=args.localize_tokens, reference_dtype=args.reference_dtype)
    print(parity.format_table(report))
    if args.plot:
        from starlift.evaluation import localize

        localize.plot_report(report, args.plot)
    if args.json:
        parity.write_json(report, args.json)
    return 0 if report["passed"] else 1


def _over_http(args: argparse.Namespace, text: str | None) -> int:
    import os

    from starlift.evaluation import http_parity, parity

    if args.path is not None:
        raise UsageError(f"give either an artifact folder ({args.path}) or --url, not both")
    if args.backend or args.localize:
        raise UsageError("--backend and --localize check artifact folders; with --url the server is the backend")
    report = http_parity.run(args.url, args.reference, text=text, prompt_tokens=args.prompt_tokens, steps=args.steps,
                             top_logprobs=args.top_logprobs, greedy_steps=args.greedy_steps, precision=args.precision,
                             api_key=args.api_key or os.environ.get("STARLIFT_API_KEY"))
    print(http_parity.format_table(report))
    if args.json:
        parity.write_json(report, args.json)
    return 0 if report["passed"] else 1
