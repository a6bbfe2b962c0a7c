"""``starlift loadtest URL [--concurrency 16] [--requests 2000] [--disconnect-rate 0.1] [--json F]``."""

from __future__ import annotations

import argparse
import json
import os

from starlift.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000 (any OpenAI-compatible server)")
    p.add_argument("--concurrency", default="16",
                   help="clients sending at once; a comma list (1,4,8,16) runs one round per value")
    p.add_argument("--requests", type=int, default=2000, help="requests per round")
    p.add_argument("--disconnect-rate", type=float, default=0.1,
                   help="fraction of requests whose client leaves mid-stream (default 0.1)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="random prompt token ids per request")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates (ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--vocab", default="100:8000", help="prompt ids are drawn from [LOW, HIGH) (default 100:8000)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("STARLIFT_API_KEY"),
                   help="bearer token to send (default: $STARLIFT_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and disconnects (default: 0)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first, all at once")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--server-pid", type=int, default=None, help="sample this process's RSS (Linux /proc)")
    p.add_argument("--rss-tolerance-mib", type=float, default=32.0,
                   help="RSS growth after warm-up (the first 10%% of requests) that still counts as flat")
    p.add_argument("--label", default=None, help="name of the server in the table and JSON")
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def main(args: argparse.Namespace) -> int:
    from starlift.bench.loadtest import format_table, run_loadtest

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UsageError("starlift loadtest needs httpx: pip install 'starlift[serve]'") from None
    try:
        levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
        low, high = (int(x) for x in args.vocab.split(":"))
    except ValueError:
        raise UsageError("--concurrency takes integers separated by commas, --vocab LOW:HIGH") from None
    results = []
    for c in levels:
        r = run_loadtest(args.url, concurrency=c, requests=args.requests, disconnect_rate=args.disconnect_rate,
                         prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, model=args.model,
                         api_key=args.api_key, seed=args.seed, timeout=args.timeout, server_pid=args.server_pid,
                         vocab=(low, high), temperature=args.temperature, warmup=args.warmup, rss_tolerance_mib=args.rss_tolerance_mib)
        r["label"] = args.label
        results.append(r)
        print(format_table([r]), flush=True)
    if len(results) > 1:
        print(format_table(results))
    for r in results:
        for e in r["errors"]:
            print(f"error seen: {e}")
        if r.get("rss_mib"):
            m = r["rss_mib"]
            print(f"server RSS: {m['start']:.0f} MiB at start, {m['after_warmup']:.0f} after warm-up, "
                  f"max {m['max_after_warmup']:.0f}, end {m['end']:.0f} ({'flat' if r['rss_flat'] else 'GROWING'})")
        print(f"c={r['concurrency']}: {r['statuses']}, 5xx {r['server_errors_5xx']}, disconnected "
              f"{r['disconnected']}, leaked slots {r['leaked_slots'] if r['leaked_slots'] is not None else 'unknown'}"
              f" -> {'PASS' if r['passed'] else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)
    return 0 if all(r["passed"] for r in results) else 1
