"""``starlift profile``: where a decode step's (or, with ``--prefill N``, a prefill's) time goes on ONNX Runtime.

Two passes over the same greedy generation (``generate_tokens``, the loop every starlift API
uses), after a prefill that is not counted:

1. unprofiled: wall time per token, split into the time inside ORT's run call and the rest
   (starlift's own Python: binding inputs, the cache bookkeeping, sampling), so the Python
   overhead per token is measured rather than guessed;
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


def _greedy(runner, prompt: np.ndarray, steps: int) -> float:
    from starlift.engine.generation import SamplingParams, generate_tokens

    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    tokens = generate_tokens(runner, prompt.tolist(), params, eos_token_id=None)
    next(tokens)  # prefill + first token: not part of the per-step figures
    runner.run_seconds = 0.0
    start = time.perf_counter()
    for _ in tokens:
        pass
    return time.perf_counter() - start


def _kernels(trace_path: str, runs_to_skip: int) -> tuple[dict[str, float], float, int]:
    """Kernel microseconds by op type and total run microseconds, over the runs after the
    first ``runs_to_skip`` (the prefill), from ORT's trace."""
    events = json.loads(Path(trace_path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kept = runs[runs_to_skip:]
    if not kept:
        raise UsageError("the profiler recorded no decode steps")
    start = kept[0]["ts"]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
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
        _greedy(runner, prompt[:, :16], 4)  # warm-up
        walls, inside = [], []
        for _ in range(reps):
            walls.append(_greedy(runner, prompt, steps))
            inside.append(runner.run_seconds)
    best = int(np.argmin(walls))
    wall, in_ort = walls[best] / steps, inside[best] / steps
    trace = None
    try:
        with OnnxRuntimeRunner(path / "model.onnx", profile=True, **options) as runner:
            _greedy(runner, prompt, steps)
            trace = runner.end_profiling()
        # the profiled session ran: warm-up (none), the prefill (1 run), then `steps` decode runs
        by_op, run_us, n = _kernels(trace, 1)
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
        runner.reset(1)
        start = time.perf_counter()
        runner.forward(ids, np.ones_like(ids), np.arange(prompt_len)[None], logits_to_keep=keep)
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
        by_op, run_us, n = _kernels(trace, 1)
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
