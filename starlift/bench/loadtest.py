"""``starlift loadtest``: many streaming clients against any OpenAI-compatible server.

``concurrency`` clients (asyncio tasks over one httpx connection pool) each send one streaming
``/v1/completions`` request at a time until ``requests`` were sent. Prompts are random token ids
(the same for every server, given the seed), so starlift and llama.cpp's ``llama-server``
see the same number of prompt tokens; ``ignore_eos`` makes every request generate
``max_tokens``. A fraction ``disconnect_rate`` of the requests closes its connection after a
random number of chunks (0: right after the headers, while the request may still wait).

Measured on the client: throughput (tokens received per second of wall time), time to first
token and inter-token latency (p50/p99), statuses. After the run the server's ``/metrics`` is
read until its active sequences and queue reach 0 (starlift's or llama.cpp's names): a
request still holding a row then is a leaked slot. With ``server_pid``, the server's RSS is
sampled (Linux ``/proc``): after warm-up it must stay flat.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import StarliftError, UsageError

# (active, queued) gauges of the servers we know: starlift's and llama-server's (--metrics)
GAUGES = [("starlift_active_sequences", "starlift_queue_depth"),
          ("llamacpp:requests_processing", "llamacpp:requests_deferred")]


@dataclass
class Result:
    status: int = 0
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    disconnect_after: int | None = None  # chunks read before closing on purpose
    completed: bool = False
    error: str | None = None


def _pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = _rss_mib(self.pid)
            if rss is not None:
                self.samples.append((time.perf_counter(), rss))
            self.stop.wait(self.every)


def _gauges(text: str) -> tuple[float, float] | None:
    for active, queued in GAUGES:
        a = re.search(rf"^{re.escape(active)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        q = re.search(rf"^{re.escape(queued)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if a:
            return float(a.group(1)), float(q.group(1)) if q else 0.0
    return None


async def _one(client, url: str, body: dict, headers: dict, cut: int | None, timeout: float) -> Result:
    r = Result(disconnect_after=cut)
    r.sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                r.error = resp.text[:300]
                return r
            if cut == 0:
                return r  # closing the unread stream drops the connection: the server sees a disconnect
            usage = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    r.completed = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = str(chunk["error"])[:300]
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    r.chunk_times.append(time.perf_counter())
                    if cut is not None and len(r.chunk_times) >= cut:
                        break  # leave mid-stream
            r.tokens = usage["completion_tokens"] if (usage and r.completed) else len(r.chunk_times)
    except Exception as e:  # noqa: BLE001 - a failed request is a result to count, not a crash of the tool
        r.error = f"{type(e).__name__}: {e}"[:300]
    return r


async def _run(url: str, concurrency: int, requests: int, disconnect_rate: float, prompt_tokens: int,
               max_tokens: int, model: str | None, api_key: str | None, seed: int, timeout: float,
               vocab: tuple[int, int], temperature: float,
               warmup: int) -> tuple[list[Result], float, float, str | None]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if model is None:
            try:
                resp = await client.get(f"{url}/v1/models", headers=headers)
                model = resp.json()["data"][0]["id"] if resp.status_code == 200 else None
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise StarliftError(f"cannot reach {url}/v1/models ({e}); is the server running?") from None
        if warmup:  # unmeasured requests first (the server's first calls allocate and tune)
            wrng = np.random.default_rng(seed + 10**6)
            await asyncio.gather(*(_one(client, f"{url}/v1/completions",
                                        {"prompt": wrng.integers(vocab[0], vocab[1], size=prompt_tokens).tolist(),
                                         "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                                         "ignore_eos": True, **({"model": model} if model else {})},
                                        headers, None, timeout) for _ in range(warmup)))
        rng = np.random.default_rng(seed)
        plans = []
        for _ in range(requests):
            ids = rng.integers(vocab[0], vocab[1], size=prompt_tokens).tolist()
            cut = int(rng.integers(0, max_tokens)) if rng.random() < disconnect_rate else None
            plans.append((ids, cut))
        results: list[Result | None] = [None] * requests
        next_i = iter(range(requests))
        first_done = {"t": None}

        async def client_task() -> None:
            for i in next_i:
                ids, cut = plans[i]
                body = {"prompt": ids, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                        "ignore_eos": True, "stream_options": {"include_usage": True}}
                if model:
                    body["model"] = model
                results[i] = await _one(client, f"{url}/v1/completions", body, headers, cut, timeout)
                if first_done["t"] is None:
                    first_done["t"] = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(*(client_task() for _ in range(concurrency)))
        end = time.perf_counter()
        return [r for r in results if r is not None], start, end, model


async def _settle(url: str, api_key: str | None, within: float) -> dict[str, Any]:
    """Poll /metrics until nothing is active or queued (a leaked slot never gets there)."""
    import httpx

    deadline = time.perf_counter() + within
    last = None
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            try:
                resp = await client.get(f"{url}/metrics")
                last = _gauges(resp.text) if resp.status_code == 200 else None
            except httpx.HTTPError:
                last = None
            if last is None:
                return {"checked": False, "active": None, "queued": None}
            if last == (0.0, 0.0) or time.perf_counter() > deadline:
                return {"checked": True, "active": last[0], "queued": last[1]}
            await asyncio.sleep(0.2)


def run_loadtest(url: str, *, concurrency: int = 16, requests: int = 2000, disconnect_rate: float = 0.1,
                 prompt_tokens: int = 64, max_tokens: int = 64, model: str | None = None, api_key: str | None = None,
                 seed: int = 0, timeout: float = 300.0, server_pid: int | None = None, warmup: int = 0,
                 vocab: tuple[int, int] = (100, 8000), temperature: float = 0.0,
                 rss_tolerance_mib: float = 32.0) -> dict[str, Any]:
    if concurrency < 1 or requests < 1 or prompt_tokens < 1 or max_tokens < 1:
        raise UsageError("--concurrency, --requests, --prompt-tokens and --max-tokens must be >= 1")
    if not 0 <= disconnect_rate <= 1:
        raise UsageError(f"--disconnect-rate must be in [0, 1], got {disconnect_rate}")
    url = url.rstrip("/")
    sampler = _RssSampler(server_pid) if server_pid else None
    if sampler is not None:
        if _rss_mib(server_pid) is None:
            raise UsageError(f"--server-pid {server_pid}: no such process (or no /proc here)")
        sampler.start()
    try:
        results, start, end, model = asyncio.run(_run(url, concurrency, requests, disconnect_rate, prompt_tokens,
                                                      max_tokens, model, api_key, seed, timeout, vocab, temperature,
                                                      warmup))
        settled = asyncio.run(_settle(url, api_key, within=15.0))
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status else "no-response"
        statuses[key] = statuses.get(key, 0) + 1
    ok = [r for r in results if r.status == 200]
    full = [r for r in ok if r.disconnect_after is None]
    ttft = [r.chunk_times[0] - r.sent for r in ok if r.chunk_times]
    itl = np.concatenate([np.diff(r.chunk_times) for r in ok if len(r.chunk_times) > 1] or [np.zeros(0)])
    tokens = sum(r.tokens for r in ok)
    out: dict[str, Any] = {
        "url": url, "model": model, "concurrency": concurrency, "requests": len(results),
        "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "disconnect_rate": disconnect_rate,
        "warmup_requests": warmup,
        "seconds": end - start, "tokens": tokens, "throughput_tokens_per_s": tokens / (end - start),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99), "statuses": statuses,
        "server_errors_5xx": sum(1 for r in results if r.status >= 500),
        "failed": sum(1 for r in results if r.error is not None and r.status == 200),
        "disconnected": sum(1 for r in results if r.disconnect_after is not None),
        "completed": sum(1 for r in full if r.completed),
        "short": sum(1 for r in full if r.completed and r.tokens != max_tokens),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "after": settled,
        "leaked_slots": int(settled["active"] + settled["queued"]) if settled["checked"] else None,
    }
    if sampler is not None and sampler.samples:
        n_warm = max(1, len(results) // 10)
        sends = sorted(r.sent for r in results)
        t_warm = sends[min(n_warm, len(sends) - 1)]
        after = [rss for t, rss in sampler.samples if t >= t_warm] or [sampler.samples[-1][1]]
        out["rss_mib"] = {"start": sampler.samples[0][1], "after_warmup": after[0], "max_after_warmup": max(after),
                          "end": after[-1], "growth_after_warmup": max(after) - after[0],
                          "tolerance": rss_tolerance_mib}
        out["rss_flat"] = max(after) - after[0] <= rss_tolerance_mib
    out["passed"] = (out["server_errors_5xx"] == 0 and out["failed"] == 0 and out["leaked_slots"] in (0, None)
                     and out.get("rss_flat", True) and out["completed"] == len(full))
    return out


def format_table(results: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.1f}"

    head = ("server", "conc", "reqs", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "5xx", "disc",
            "leaked", "RSS growth")
    rows = [head]
    for r in results:
        rss = r.get("rss_mib")
        rows.append((r.get("label") or r["url"], str(r["concurrency"]), str(r["requests"]),
                     f"{r['throughput_tokens_per_s']:.1f}", ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]),
                     ms(r["itl_p50_s"]), ms(r["itl_p99_s"]), str(r["server_errors_5xx"]), str(r["disconnected"]),
                     "?" if r["leaked_slots"] is None else str(r["leaked_slots"]),
                     "-" if rss is None else f"{rss['growth_after_warmup']:+.1f} MiB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(times in ms; TTFT/ITL measured by the client)"
