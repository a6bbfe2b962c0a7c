"""``starlift soak PATH [--generations 2000]``: many generations in one process, RSS sampled.

A long-run check, not a test: the report says how much the resident memory grew after the
warm-up (the first tenth of the run); a flat line means no leak per generation.
"""

from __future__ import annotations

import argparse
import json
import time

from starlift.runtimes import BACKENDS

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\nimport sys\n",
           "for i in range(10):", "with open(path) as f:", "# utility functions\n", "try:\n    import json\n"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="artifact folder (or checkpoint with --backend torch)")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS), help="runtime to run on")
    p.add_argument("--generations", type=int, default=2000, help="generations to run (at least 10)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per generation")
    p.add_argument("--samples", type=int, default=20, help="RSS samples over the run")
    p.add_argument("--json", default=None, help="write the report here (default: only the summary is printed)")


def main(args: argparse.Namespace) -> int:
    import psutil

    import starlift
    from starlift.core.errors import UsageError

    if args.generations < 10:
        raise UsageError("--generations must be at least 10")
    gen = starlift.load(args.path, backend=args.backend)
    proc = psutil.Process()
    every = max(1, args.generations // args.samples)
    samples, start = [], time.perf_counter()
    for i in range(args.generations):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            gen.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=i)
        elif i % 3 == 1:
            "".join(gen.stream(prompt, max_new_tokens=args.max_new_tokens))
        else:
            gen.generate([prompt, PROMPTS[(i + 1) % len(PROMPTS)]], max_new_tokens=args.max_new_tokens)
        if i % every == 0 or i == args.generations - 1:
            samples.append((i + 1, proc.memory_info().rss))
    warm = samples[max(1, len(samples) // 10)]
    growth = samples[-1][1] - warm[1]
    report = {"path": str(args.path), "backend": args.backend, "generations": args.generations,
              "seconds": time.perf_counter() - start, "rss_samples": samples,
              "rss_after_warmup_bytes": warm[1], "rss_final_bytes": samples[-1][1],
              "growth_after_warmup_bytes": growth,
              "growth_per_generation_bytes": growth / max(1, samples[-1][0] - warm[0])}
    print(f"{args.generations} generations in {report['seconds']:.0f} s; RSS after warm-up "
          f"{warm[1] / 2**20:.1f} MiB (generation {warm[0]}), final {samples[-1][1] / 2**20:.1f} MiB: "
          f"growth {growth / 2**20:+.2f} MiB ({report['growth_per_generation_bytes']:+.0f} B/generation)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
