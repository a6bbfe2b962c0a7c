"""``starlift profile``: where a decode step's (or, with ``--prefill N``, a prefill's) time goes on ONNX Runtime.

Two passes over the same greedy generation through the engine (the loop every starlift API
runs: ``batch`` requests submitted at once), counting only the steps where every request
decodes (prefill chunks and the ramp up and down are left out):

1. unprofiled: wall time per step (from one step's start to the next's, so the engine's whole
   loop is in it), split into the time inside ORT's run call and the rest (starlift's own
   Python: scheduling, binding inputs, the cache bookkeeping, sampling, handing events to the
   callers), so the Python overhead per step is measured rather than guessed;
2. with ORT's kernel profiler: each kernel's time, summed by op type, and ORT's own framework
   time between kernels (a run's duration minus its kernels).

ORT's profiler is the tool made for this; this module only reads its JSON trace (documented
event fields: ``cat``, ``name``, ``dur`` in microseconds, ``args.op_name``).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import UsageError


def _greedy(runner, prompt, steps: int) -> tuple[float, float, int, int]:
    """Generate ``steps`` + 1 tokens for every row of ``prompt`` on a fresh engine; returns the
    wall and in-ORT seconds of the full-batch decode steps, how many there were, and how many
    model runs came before the first of them."""
    from starlift.engine import Engine, SamplingParams

    batch = prompt.shape[0]
    with Engine(runner, max_batch=batch, trace=True) as engine:
        params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
        handles = [engine.submit(row.tolist(), params) for row in prompt]
        for handle in handles:
            handle.wait()
            if handle.error is not None:
                raise handle.error
        trace = engine.trace
    # (start, end, decoded rows, prefill tokens, prefill calls, seconds in the runtime)
    full = [i for i, it in enumerate(trace) if it[2] == batch and it[4] == 0 and i + 1 < len(trace)]
    if not full:
        raise UsageError("no decode step ran with every request in the batch; raise --steps")
    wall = sum(trace[i + 1][0] - trace[i][0] for i in full)  # a step's wall runs to the next step's start
    inside = sum(trace[i][5] for i in full)
    runs_before = sum((1 if it[2] else 0) + it[4] for it in trace[:full[0]])
    return wall, inside, len(full), runs_before


# an If's time is its branch's nodes' time, which the trace records on their own (the ort
# flavour's attention runs inside one): counted once, under the nodes that did the work
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _kernels(trace_path: str, runs_to_skip: int, runs: int) -> tuple[dict[str, float], float, int]:
    """Kernel microseconds by op type and total run microseconds over ``runs`` model runs after
    the first ``runs_to_skip`` (prefill chunks and the ramp up), from ORT's trace."""
    events = json.loads(Path(trace_path).read_text())
    all_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])
    kept = all_runs[runs_to_skip:runs_to_skip + runs]
    if not kept:
        raise UsageError("the profiler recorded no decode steps")
    start, end = kept[0]["ts"], kept[-1]["ts"] + kept[-1]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and start <= e["ts"] <= end:
            op = e.get("args", {}).get("op_name", "?")
            if op not in CONTROL_FLOW:
                by_op[op] += e["dur"]
    return dict(by_op), float(sum(r["dur"] for r in kept)), len(kept)


def run(path: str | Path, prompt_len: int = 128, steps: int = 64, batch: int = 1,
        threads: int | None = None, reps: int = 3) -> dict[str, Any]:
    from starlift.api import is_artifact
    from starlift.bench.speed import _prompt
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    path = Path(path)
    if not is_artifact(path):
        raise UsageError(f"{path} is not an artifact folder (no manifest.json); export it first")
    if prompt_len < 1 or steps < 2 or batch < 1 or reps < 1:
        raise UsageError("--prompt-len, --batch and --reps must be >= 1 and --steps >= 2")
    options = {"threads": threads} if threads else {}
    with OnnxRuntimeRunner(path / "model.onnx", **options) as runner:
        prompt = _prompt(runner.meta.vocab_size, batch, prompt_len)
        _greedy(runner, prompt[:, :16], batch + 4)  # warm-up
        per_step = []
        for _ in range(reps):
            wall, inside, n, _ = _greedy(runner, prompt, steps)
            per_step.append((wall / n, inside / n))
    wall, in_ort = min(per_step)
    trace = None
    try:
        with OnnxRuntimeRunner(path / "model.onnx", profile=True, **options) as runner:
            _, _, n, before = _greedy(runner, prompt, steps)
            trace = runner.end_profiling()
        by_op, run_us, n = _kernels(trace, before, n)
    finally:
        if trace and os.path.exists(trace):
            os.remove(trace)
    kernels_us = sum(by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "path": str(path), "batch": batch, "prompt_len": prompt_len, "steps": steps,
        "step_ms": wall * 1e3, "tokens_per_s": batch / wall,
        "ort_run_ms": in_ort * 1e3, "python_overhead_ms": (wall - in_ort) * 1e3,
        "python_overhead_fraction": (wall - in_ort) / wall,
        "profiled": {"run_ms": run_us / n / 1e3, "kernels_ms": kernels_us / n / 1e3,
                     "framework_ms": (run_us - kernels_us) / n / 1e3,
                     "by_op_ms": {op: us / n / 1e3 for op, us in ops},
                     "by_op_fraction": {op: us / kernels_us for op, us in ops}},
    }


def run_prefill(path: str | Path, prompt_len: int = 1024, threads: int | None = None, reps: int = 3,
                session_config: dict[str, str] | None = None) -> dict[str, Any]:
    """Where a prefill's time goes: a ``prompt_len``-token prompt on an empty cache, as generation
    runs it (logits of the last position only), timed unprofiled (best of ``reps``) against the
    same prefill computing every position's logits, then once more under ORT's kernel profiler."""
    from starlift.api import is_artifact
    from starlift.bench.speed import _prompt
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    path = Path(path)
    if not is_artifact(path):
        raise UsageError(f"{path} is not an artifact folder (no manifest.json); export it first")
    if prompt_len < 1 or reps < 1:
        raise UsageError("--prefill and --reps must be >= 1")
    options = {"threads": threads} if threads else {}
    if session_config:
        options["session_config"] = session_config

    def prefill(runner, keep: int) -> float:
        ids = _prompt(runner.meta.vocab_size, 1, prompt_len)
        single = runner.single_batch(1)
        start = time.perf_counter()
        single.forward(ids, np.ones_like(ids), np.arange(prompt_len)[None], logits_to_keep=keep)
        return time.perf_counter() - start

    with OnnxRuntimeRunner(path / "model.onnx", **options) as runner:
        prefill(runner, 1)  # warm-up
        last = [prefill(runner, 1) for _ in range(reps)]
        every = [prefill(runner, 0) for _ in range(reps)]
    trace = None
    try:
        with OnnxRuntimeRunner(path / "model.onnx", profile=True, **options) as runner:
            prefill(runner, 1)
            prefill(runner, 1)
            trace = runner.end_profiling()
        by_op, run_us, n = _kernels(trace, 1, 1)
    finally:
        if trace and os.path.exists(trace):
            os.remove(trace)
    kernels_us = sum(by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "path": str(path), "prefill_len": prompt_len, "session_config": session_config or {},
        "prefill_ms": min(last) * 1e3, "prefill_all_logits_ms": min(every) * 1e3,
        "prefill_tokens_per_s": prompt_len / min(last),
        "profiled": {"run_ms": run_us / n / 1e3, "kernels_ms": kernels_us / n / 1e3,
                     "framework_ms": (run_us - kernels_us) / n / 1e3,
                     "by_op_ms": {op: us / n / 1e3 for op, us in ops},
                     "by_op_fraction": {op: us / kernels_us for op, us in ops}},
    }


def format_report(r: dict[str, Any], top: int = 12) -> str:
    p = r["profiled"]
    if "prefill_len" in r:
        head = [f"{r['path']}: prefill of {r['prefill_len']} tokens, batch 1, empty cache",
                f"prefill {r['prefill_ms']:.1f} ms ({r['prefill_tokens_per_s']:.0f} tok/s) with the last position's "
                f"logits; {r['prefill_all_logits_ms']:.1f} ms computing every position's"]
    else:
        head = [f"{r['path']}: batch {r['batch']}, prompt {r['prompt_len']}, {r['steps']} decode steps",
                f"step {r['step_ms']:.3f} ms ({r['tokens_per_s']:.1f} tok/s): inside ORT {r['ort_run_ms']:.3f} ms, "
                f"starlift Python {r['python_overhead_ms']:.3f} ms ({r['python_overhead_fraction'] * 100:.1f}%)"]
    lines = [*head,
             f"profiled run {p['run_ms']:.3f} ms: kernels {p['kernels_ms']:.3f} ms, "
             f"ORT framework between kernels {p['framework_ms']:.3f} ms",
             f"{'op type':<32} {'ms/step':>8} {'share':>7}"]
    for op, ms in list(p["by_op_ms"].items())[:top]:
        lines.append(f"{op:<32} {ms:>8.3f} {p['by_op_fraction'][op] * 100:>6.1f}%")
    rest = list(p["by_op_ms"].items())[top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more op types)':<32} {sum(v for _, v in rest):>8.3f} "
                     f"{sum(p['by_op_fraction'][k] for k, _ in rest) * 100:>6.1f}%")
    return "\n".join(lines)
