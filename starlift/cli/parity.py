"""``starlift parity PATH --reference CHECKPOINT [--backend B ...] [--text FILE] [--steps N] [--json OUT]``.

Exit code 0 only when every backend passes every check: pipelines gate releases on it.
"""

from __future__ import annotations

import argparse

from starlift.core.errors import UsageError
from starlift.runtimes import BACKENDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="artifact folder (or a checkpoint folder with --backend torch)")
    p.add_argument("--reference", required=True, help="the checkpoint the artifact must match")
    p.add_argument("--backend", action="append", default=None, choices=list(BACKENDS),
                   help="backend to check (repeatable; default: onnxruntime)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to teacher-force (default: built-in code)")
    p.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps")
    p.add_argument("--greedy-steps", type=int, default=16, help="greedy tokens compared with the reference's")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16", "int8", "int4"],
                   help="tolerance set (default: the artifact's precision)")
    p.add_argument("--json", default=None, help="write the report as JSON here (default: only the table is printed)")


def main(args: argparse.Namespace) -> int:
    from starlift.evaluation import parity

    text = None
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"{args.text} is not valid UTF-8 ({e.reason} at byte {e.start}); pass a UTF-8 text file") from e
        except OSError as e:
            raise UsageError(f"cannot read {args.text}: {e.strerror}") from e
    report = parity.run(args.path, args.reference, args.backend or ["onnxruntime"], text=text, steps=args.steps,
                        greedy_steps=args.greedy_steps, precision=args.precision)
    print(parity.format_table(report))
    if args.json:
        parity.write_json(report, args.json)
    return 0 if report["passed"] else 1
