"""``starlift bench-serve``: the engine under many callers, measured in one process per artifact.

Per artifact, on one runner:

- **offline**: ``starlift bench``'s own measurement (``speed.run_decode``): ``concurrency``
  requests submitted at once by one caller, and one request alone (single-stream decode);
- **direct**: one sequence decoded greedily by a plain loop over the same runner's cache, with
  no engine (prefill, then ``cache.decode`` and argmax per token: the path generation took
  before the engine), alternating with the engine's single stream, so the engine's cost per
  token is a ratio taken in the same run;
- **streams**: ``concurrency`` caller threads each submit one request at the same moment and
  read its stream; the aggregate decode throughput counts the tokens made while every stream
  was decoding (the same window as offline), and the end-to-end figure counts every token from
  the first submit to the last token. Offline and streams rounds alternate, so the ratio of
  each pair is taken seconds apart;
- **poisson**: requests arrive at exponential intervals at a rate that keeps about
  ``concurrency`` in flight (Little's law from the streams' mean latency, or ``rate``);
  throughput, time to first token and inter-token latency (p50/p99), and the mean in flight;
- **long prompt**: ``concurrency - 1`` streams decode, then a ``long_prompt``-token request
  arrives; the running streams' inter-token latency while it is prefilled, with the engine's
  chunked prefill and with the whole prompt in one chunk (what an engine without chunking does).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import UsageError


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _consume(handle, out: list) -> None:
    out.extend(event.time for event in handle)


def streams(engine, concurrency: int, prompt_len: int, new_tokens: int, seed: int = 1) -> dict[str, float]:
    """``concurrency`` threads each submit one request at once and read its stream."""
    from starlift.bench.speed import _prompt
    from starlift.engine import SamplingParams

    ids = _prompt(engine.vocab_size, concurrency, prompt_len, seed=seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(concurrency)]
    submitted = [0.0] * concurrency
    go = threading.Barrier(concurrency)

    def client(i: int) -> None:
        go.wait()
        submitted[i] = time.perf_counter()
        _consume(engine.submit(ids[i].tolist(), params), times[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(len(t) != new_tokens for t in times):
        raise UsageError("a stream ended early; the engine reported an error")
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    window = sum(1 for t in times for x in t if start < x <= end)
    if window:  # tokens made while every stream was decoding
        decode = window / (end - start)
    else:  # the streams never decoded together (short streams, a busy machine): the whole span's rate
        decode = sum(len(t) - 1 for t in times) / (max(t[-1] for t in times) - min(t[0] for t in times))
    first = min(submitted)
    return {"decode_tokens_per_s": decode,
            "end_to_end_tokens_per_s": sum(len(t) for t in times) / (max(t[-1] for t in times) - first),
            "mean_latency_s": float(np.mean([t[-1] - s for t, s in zip(times, submitted, strict=True)])),
            "ttft_p50_s": _pct([t[0] - s for t, s in zip(times, submitted, strict=True)], 50),
            "itl_p50_s": _pct(np.concatenate([np.diff(t) for t in times]), 50)}


def direct_decode(runner, prompt_len: int, new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Greedy decode of one sequence without the engine: the cache driven by a plain loop."""
    from starlift.bench.speed import _prompt

    ids = _prompt(runner.meta.vocab_size, 1, prompt_len, seed=seed)[0]
    cache = runner.create_cache(1)
    try:
        cache.add(0)
        token = np.array([int(cache.prefill(0, ids).argmax())], np.int64)
        cache.join(0)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = np.array([int(cache.decode(token)[0].argmax())], np.int64)
        return {"decode_tokens_per_s": (new_tokens - 1) / (time.perf_counter() - start)}
    finally:
        cache.close()


def poisson(engine, rate: float, requests: int, prompt_len: int, new_tokens: int, seed: int = 2) -> dict[str, Any]:
    """``requests`` arrivals at exponential intervals of mean 1/``rate`` seconds."""
    from starlift.bench.speed import _prompt
    from starlift.engine import SamplingParams

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=requests)
    ids = _prompt(engine.vocab_size, requests, prompt_len, seed=seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(requests)]
    submitted = [0.0] * requests
    threads = []
    start = time.perf_counter()
    due = start
    for i in range(requests):
        due += gaps[i]
        time.sleep(max(0.0, due - time.perf_counter()))
        submitted[i] = time.perf_counter()
        handle = engine.submit(ids[i].tolist(), params, wait=True)
        t = threading.Thread(target=_consume, args=(handle, times[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    end = max(t[-1] for t in times)
    ttft = [t[0] - s for t, s in zip(times, submitted, strict=True)]
    itl = np.concatenate([np.diff(t) for t in times])
    busy = sum(t[-1] - s for t, s in zip(times, submitted, strict=True))
    return {"rate_per_s": rate, "requests": requests, "seconds": end - start,
            "throughput_tokens_per_s": sum(len(t) for t in times) / (end - start),
            "mean_in_flight": busy / (end - start),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99)}


def long_prompt(engine, running: int, prompt_len: int, long_len: int) -> dict[str, Any]:
    """``running`` streams decode; a ``long_len``-token request arrives. The running streams'
    inter-token gaps that overlap its prefill (from its arrival to its first token), and before."""
    from starlift.bench.speed import _prompt
    from starlift.engine import SamplingParams

    ids = _prompt(engine.vocab_size, running, prompt_len, seed=3)
    long_ids = _prompt(engine.vocab_size, 1, long_len, seed=4)[0].tolist()
    room = (engine.context or 1 << 20) - prompt_len
    params = SamplingParams(max_new_tokens=min(100_000, room), ignore_eos=True)  # until cancelled
    handles = [engine.submit(row.tolist(), params) for row in ids]
    times: list[list[float]] = [[] for _ in range(running)]
    readers = [threading.Thread(target=_consume, args=(h, t)) for h, t in zip(handles, times, strict=True)]
    for t in readers:
        t.start()
    while min(len(t) for t in times) < 8:  # every stream decoding
        time.sleep(0.005)
    arrived = time.perf_counter()
    first = next(iter(engine.submit(long_ids, SamplingParams(max_new_tokens=1)))).time
    time.sleep(0.3)  # a few steps more: the gap that spans the prefill's end
    for h in handles:
        h.cancel()
    for t in readers:
        t.join()
    before, during = [], []
    for t in times:
        for a, b in zip(t[:-1], t[1:], strict=True):
            if b <= arrived:
                before.append(b - a)
            elif a < first:
                during.append(b - a)
    return {"running_streams": running, "long_prompt_tokens": long_len, "prefill_s": first - arrived,
            "prefill_chunk": engine.prefill_chunk,
            "itl_before_p50_s": _pct(before, 50),
            "itl_during_p50_s": _pct(during, 50), "itl_during_p99_s": _pct(during, 99),
            "itl_during_max_s": float(max(during)) if during else float("nan")}


def run(paths: list[str], backend: str = "onnxruntime", concurrency: int = 8, prompt_len: int = 128,
        new_tokens: int = 128, reps: int = 3, requests: int = 48, rate: float | None = None, long_len: int = 2000,
        prefill_chunk: int | None = None, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from starlift.api import is_artifact
    from starlift.bench.speed import _huge_pages, run_decode
    from starlift.core.artifact import read_manifest
    from starlift.engine import Engine
    from starlift.engine.engine import DEFAULT_PREFILL_CHUNK
    from starlift.runtimes import create_runner

    if concurrency < 1 or prompt_len < 1 or new_tokens < 2 or reps < 1 or requests < 1 or long_len < 1:
        raise UsageError("--concurrency, --prompt-len, --reps, --requests and --long-prompt must be >= 1, "
                         "--new-tokens >= 2")
    for p in paths:
        if not is_artifact(p):
            raise UsageError(f"{p} is not an artifact folder (no manifest.json); export it first")
    chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    options = {"threads": threads} if threads else {}
    results = []
    bar = tqdm(total=len(paths) * (2 * reps + 4), desc="bench-serve", disable=not progress, leave=False)
    for path in paths:
        manifest = read_manifest(path)
        runner = create_runner(backend, Path(path), **options).activate()
        row: dict[str, Any] = {"path": str(path), "backend": backend, "flavour": manifest.get("flavour"),
                               "precision": manifest.get("precision", manifest.get("dtype"))}
        try:
            with Engine(runner, max_batch=concurrency, max_queue=max(64, requests), prefill_chunk=chunk) as engine:
                row["cache"] = engine.stats()["cache"]
                run_decode(engine, concurrency, min(prompt_len, 16), 8)  # warm-up
                direct_decode(runner, min(prompt_len, 16), 8)  # warm-up
                offline, single, live, direct = [], [], [], []
                for _ in range(reps):  # alternating: each pair seconds apart
                    offline.append(run_decode(engine, concurrency, prompt_len, new_tokens)["decode_tokens_per_s"])
                    live.append(streams(engine, concurrency, prompt_len, new_tokens))
                    single.append(run_decode(engine, 1, prompt_len, new_tokens)["decode_tokens_per_s"])
                    direct.append(direct_decode(runner, prompt_len, new_tokens)["decode_tokens_per_s"])
                    bar.update(2)
                ratios = [s["decode_tokens_per_s"] / o for s, o in zip(live, offline, strict=True)]
                row["offline"] = {"batch": concurrency, "decode_tokens_per_s": float(np.median(offline)),
                                  "single_stream_decode_tokens_per_s": float(np.median(single)),
                                  "samples": offline, "single_samples": single,
                                  "direct_single_decode_tokens_per_s": float(np.median(direct)),
                                  "direct_samples": direct,
                                  "single_vs_direct_per_round": [a / b for a, b in zip(single, direct, strict=True)]}
                row["offline"]["single_vs_direct_median"] = float(np.median(row["offline"]["single_vs_direct_per_round"]))
                row["streams"] = {key: float(np.median([s[key] for s in live])) for key in live[0]}
                row["streams"].update({"concurrency": concurrency, "samples": live,
                                       "vs_offline_median": float(np.median(ratios)),
                                       "vs_offline_per_round": ratios})
                mean_latency = row["streams"]["mean_latency_s"]
                arrival = rate or concurrency / mean_latency
                row["poisson"] = poisson(engine, arrival, requests, prompt_len, new_tokens)
                bar.update()
                row["long_prompt"] = [long_prompt(engine, concurrency - 1, prompt_len, long_len)]
                bar.update()
            if long_len > chunk:  # the same arrival with the whole prompt in one chunk
                with Engine(runner, max_batch=concurrency, prefill_chunk=long_len) as engine:
                    run_decode(engine, 1, 16, 4)
                    row["long_prompt"].append(long_prompt(engine, concurrency - 1, prompt_len, long_len))
            bar.update(2)
        finally:
            runner.deactivate()
        results.append(row)
    bar.close()
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "transparent_huge_pages": _huge_pages()},
            "settings": {"concurrency": concurrency, "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": reps,
                         "requests": requests, "rate": rate, "long_prompt": long_len, "prefill_chunk": chunk,
                         "threads": threads, "backend": backend},
            "results": results}


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    c = s["concurrency"]
    lines = [f"bench-serve: prompt {s['prompt_len']}, {s['new_tokens']} new tokens, {c} streams, "
             f"median of {s['reps']}, prefill chunk {s['prefill_chunk']}",
             f"{'artifact':<28} {'cache':<7} {'1 stream':>9} {'offline b' + str(c):>11} {str(c) + ' streams':>11} "
             f"{'ratio':>6} {'end-to-end':>11} {'direct 1':>9} {'1/direct':>8}"]
    for r in report["results"]:
        o, st = r["offline"], r["streams"]
        lines.append(f"{Path(r['path']).name + ' (' + str(r['precision']) + ')':<28} {r['cache']:<7} "
                     f"{o['single_stream_decode_tokens_per_s']:>9.1f} {o['decode_tokens_per_s']:>11.1f} "
                     f"{st['decode_tokens_per_s']:>11.1f} {st['vs_offline_median']:>5.2f}x "
                     f"{st['end_to_end_tokens_per_s']:>11.1f} {o['direct_single_decode_tokens_per_s']:>9.1f} "
                     f"{o['single_vs_direct_median']:>7.3f}x")
    lines.append("poisson arrivals (tok/s; ms):")
    for r in report["results"]:
        p = r["poisson"]
        lines.append(f"  {Path(r['path']).name}: {p['requests']} requests at {p['rate_per_s']:.2f}/s, "
                     f"{p['mean_in_flight']:.1f} in flight: {p['throughput_tokens_per_s']:.1f} tok/s, "
                     f"TTFT p50 {p['ttft_p50_s'] * 1e3:.0f} p99 {p['ttft_p99_s'] * 1e3:.0f}, "
                     f"inter-token p50 {p['itl_p50_s'] * 1e3:.1f} p99 {p['itl_p99_s'] * 1e3:.1f}")
    lines.append(f"a {s['long_prompt']}-token prompt arriving while {c - 1} streams decode (inter-token ms):")
    for r in report["results"]:
        for lp in r["long_prompt"]:
            lines.append(f"  {Path(r['path']).name}, chunk {lp['prefill_chunk']}: before p50 "
                         f"{lp['itl_before_p50_s'] * 1e3:.1f}; during p50 {lp['itl_during_p50_s'] * 1e3:.1f} "
                         f"p99 {lp['itl_during_p99_s'] * 1e3:.1f} max {lp['itl_during_max_s'] * 1e3:.1f}; "
                         f"its prefill {lp['prefill_s'] * 1e3:.0f} ms")
    return "\n".join(lines)
