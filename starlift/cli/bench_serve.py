"""``starlift bench-serve PATH... [--concurrency 8] [--prompt-len 128] [--new-tokens 128] [--requests 48]
[--rate R] [--long-prompt 2000] [--prefill-chunk N] [--json F]``."""

from __future__ import annotations

import argparse
import json

from starlift.runtimes import BACKENDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="artifact folders")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS), help="the runner under the engine")
    p.add_argument("--concurrency", type=int, default=8, help="streams at once (and the engine's max_batch)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per stream")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens each stream generates")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds of offline batch and streams")
    p.add_argument("--requests", type=int, default=48, help="requests in the Poisson arrival run")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals per second (default: keeps about --concurrency in flight, by Little's law "
                        "from the streams' mean latency)")
    p.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt that arrives while streams run")
    p.add_argument("--prefill-chunk", type=int, default=None, help="the engine's prompt tokens per iteration")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's own choice)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from starlift.bench import serve

    report = serve.run(args.paths, backend=args.backend, concurrency=args.concurrency, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, reps=args.reps, requests=args.requests, rate=args.rate,
                       long_len=args.long_prompt, prefill_chunk=args.prefill_chunk, threads=args.threads,
                       progress=not args.no_progress)
    print(serve.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
