"""What ONNX Runtime's thread spinning costs and leaves behind: one artifact, three session
configurations side by side (the runner's default, ``session.force_spinning_stop=1``; ORT's own
default, ``force_spinning_stop=0``; no spinning at all, ``intra_op.allow_spinning=0``), each
generating the same greedy request in turn; then the machine's busy share in the 100 ms after it
(from /proc/stat: every process, so run it on a quiet machine, under the machine-wide lock).

    python scripts/ort-spin-tail/tail.py ARTIFACT [PROMPT_TOKENS NEW_TOKENS REPS THREADS]

Prints, per configuration, the median time to first token, the median request time and the
median busy share after it (a spinning tail of one core of two reads as about 20% over 100 ms).
"""

import statistics
import sys
import time

from starlift.engine import Engine, SamplingParams
from starlift.runtimes import create_runner

CONFIGS = {
    "force_spinning_stop=1 (starlift's default)": {"session.force_spinning_stop": "1"},
    "force_spinning_stop=0 (ONNX Runtime's)": {"session.force_spinning_stop": "0"},
    "allow_spinning=0": {"session.intra_op.allow_spinning": "0"},
}


def busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # not idle / iowait, all


def main(artifact: str, prompt_tokens: int = 233, new_tokens: int = 64, reps: int = 15, threads: int = 2) -> None:
    engines = {}
    for name, config in CONFIGS.items():
        runner = create_runner("onnxruntime", artifact, threads=threads, session_config=config).activate()
        engines[name] = (runner, Engine(runner, max_batch=1, prefill_chunk=1 << 20).start())
    ids = list(range(100, 100 + prompt_tokens))
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(reps):
            for name, (_, engine) in engines.items():  # interleaved: noise hits each alike
                time.sleep(0.15)  # the previous configuration's tail ends first
                t = time.perf_counter()
                events = list(engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
                total = time.perf_counter() - t
                b0, t0 = busy()
                time.sleep(0.1)
                b1, t1 = busy()
                results[name].append((events[0].time - t, total, 100 * (b1 - b0) / max(1, t1 - t0)))
    finally:
        for runner, engine in engines.values():
            engine.close()
            runner.deactivate()
    for name, rows in results.items():
        print(f"{name:44s} TTFT {1e3 * statistics.median(r[0] for r in rows):8.1f} ms   request "
              f"{1e3 * statistics.median(r[1] for r in rows):8.1f} ms   busy after {statistics.median(r[2] for r in rows):3.0f}%")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:6]))
