"""``starlift profile ARTIFACT``: where a decode step's time goes (ORT kernels by op type, ORT's
framework time, starlift's Python per token)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder (runs on ONNX Runtime, CPU)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before the measured steps")
    p.add_argument("--steps", type=int, default=64, help="decode steps measured after the prefill")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--reps", type=int, default=3, help="unprofiled repetitions; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--top", type=int, default=12, help="op types listed")
    p.add_argument("--prefill", type=int, default=None, metavar="N",
                   help="profile a prefill of N tokens instead of decode steps (logits of the last position, as "
                        "generation computes them; also timed computing every position's; default: decode steps)")
    p.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                   help="an ONNX Runtime session config entry, e.g. session.disable_prepacking=1 (repeatable; "
                        "default: none)")
    p.add_argument("--json", default=None, help="write the full report here (default: only the summary is printed)")


def main(args: argparse.Namespace) -> int:
    from starlift.bench.profile import format_report, run, run_prefill
    from starlift.core.errors import UsageError

    config = {}
    for entry in args.session_config:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise UsageError(f"--session-config takes KEY=VALUE, got {entry!r}")
        config[key] = value
    if args.prefill is not None:
        report = run_prefill(args.artifact, prompt_len=args.prefill, threads=args.threads, reps=args.reps,
                             session_config=config)
    else:
        report = run(args.artifact, prompt_len=args.prompt_len, steps=args.steps, batch=args.batch,
                     threads=args.threads, reps=args.reps)
    print(format_report(report, top=args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
