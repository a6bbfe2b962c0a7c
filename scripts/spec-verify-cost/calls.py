"""Where a speculative request's time goes: the engine's cache calls, timed one by one, on the
edit requests of `starlift bench --workload latency` (held-out files, --edit-tokens 200, 64 new
tokens, greedy), plain decoding against prompt lookup (docs/performance/latency.md, section 8).

    python scripts/spec-verify-cost/calls.py ARTIFACT [THREADS]

Prints, per mode, the count, total and mean milliseconds of each cache call: ``decode`` (one
token per row), ``extend`` (a verification: the last token and the draft in one call; it runs
through ``prefill``, so the prefill row counts those calls too) and ``decode_many``. Run it
twice per mode (the first pass warms up) and under the machine-wide lock for absolute times.
"""

import collections
import sys
import time

from starlift.bench.latency import edit_requests
from starlift.engine import Engine, SamplingParams
from starlift.model import Tokenizer
from starlift.runtimes import create_runner

CALLS = ("decode", "decode_many", "prefill", "extend", "rollback")


def main(artifact: str, threads: int) -> None:
    tokenizer = Tokenizer.from_pretrained(artifact)
    requests = edit_requests(tokenizer)
    runner = create_runner("onnxruntime", artifact, threads=threads)
    times = collections.defaultdict(list)
    create_cache = runner.create_cache

    def timed_cache(rows):
        cache = create_cache(rows)
        for name in CALLS:
            call = getattr(cache, name)

            def timed(*args, _call=call, _name=name, **kwargs):
                t = time.perf_counter()
                out = _call(*args, **kwargs)
                times[_name].append(time.perf_counter() - t)
                return out
            setattr(cache, name, timed)
        return cache

    runner.create_cache = timed_cache  # before the engine starts: it makes its cache then
    with Engine(runner, max_batch=1, prefill_chunk=1 << 20) as engine:
        for speculative in (None, "prompt-lookup", None, "prompt-lookup"):
            times.clear()
            t = time.perf_counter()
            for r in requests:
                params = SamplingParams(max_new_tokens=r.new_tokens, temperature=0.0, ignore_eos=True,
                                        speculative=speculative, draft_tokens=8)
                engine.submit(r.ids, params).join()
            total = time.perf_counter() - t
            print(f"{speculative or 'plain'}: {total * 1e3:.0f} ms for {len(requests)} requests")
            for name, spans in times.items():
                print(f"  {name:12s} {len(spans):4d} calls  {sum(spans) * 1e3:8.1f} ms  "
                      f"{sum(spans) / len(spans) * 1e3:6.3f} ms each")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
