"""``starlift bench``: decode speed, time to first token, batch throughput, memory, and the
memory-bandwidth roofline, per artifact x backend, with peers measured in the same run.

Every figure is a median over repetitions; comparisons are ratios measured in one process,
interleaved round-robin so that machine noise hits every row alike.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import StarliftError, UsageError

# Rows that are not starlift: what a user would pick instead (the "vs best peer" column compares with these).
PEER_BACKENDS = ("transformers", "optimum-onnx", "onnxruntime-genai", "llama.cpp")
OPTIMUM_PRECISIONS = ("fp32", "int8", "int4")
DEFAULT_OPTIMUM_CACHE = Path("~/.cache/starlift/optimum-onnx")


class PeerError(StarliftError, RuntimeError):
    """A peer (another library measured beside starlift) failed to load or run."""


def memory_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s read by a large reduction (``torch.sum`` of 1 GiB on every core), the best of
    ``reps``. A decode step does the same: it reads every weight once and writes almost
    nothing, so read bandwidth, not copy bandwidth, bounds it. This host's bandwidth drifts
    (a shared machine), so ``run`` samples it before and after the timed rounds and keeps the
    highest."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


GATHER_OPS = {"Gather", "GatherBlockQuantized"}


def decode_read_bytes(model_path: str | Path) -> int:
    """Bytes of weights one decode step reads: every initializer's stored bytes, except tables
    that only Gather ops read (an embedding that is not also the LM head: a decode step reads one
    row of it). Read off the graph and the external-data offsets, without loading the weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            sizes[t.name] = int(ext["length"])
        elif t.raw_data:
            sizes[t.name] = len(t.raw_data)
        else:
            sizes[t.name] = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in sizes:
                readers.setdefault(name, set()).add(node.op_type)
    return sum(size for name, size in sizes.items() if not readers.get(name, set()) <= GATHER_OPS)


def _huge_pages() -> bool:
    from starlift.core.hugepages import active

    return active()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _prompt(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(min(38, vocab - 1), vocab, size=(batch, length)).astype(np.int64)


def run_decode(engine, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """One timed generation through the engine, the loop every starlift API runs: ``batch``
    requests with prompts of ``prompt_len`` tokens submitted at once, greedy, EOS ignored.
    TTFT is the first request's; decode tokens/s counts the tokens made while every request
    was decoding (from the last one's first token to the first one's last), or over the whole span
    when they never decoded together."""
    from starlift.engine import SamplingParams

    ids = _prompt(engine.vocab_size, batch, prompt_len)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [engine.submit(row.tolist(), params) for row in ids]
    # join, then read the queued events' times: the caller wakes once per request, not per token
    times = [[event.time for event in handle.join()] for handle in handles]
    for handle in handles:
        if handle.error is not None:
            raise handle.error
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    tokens = sum(1 for t in times for x in t if start < x <= end)
    if not tokens:  # the requests never decoded together (a tiny model, a few tokens): the whole span's rate
        tokens = sum(len(t) - 1 for t in times)
        start, end = min(t[0] for t in times), max(t[-1] for t in times)
    return {"ttft_s": times[0][0] - t0, "decode_tokens_per_s": tokens / (end - start)}


def latency_by_position(runner, positions: list[int], reps: int = 5, chunk: int = 512) -> dict[int, float]:
    """Median seconds of one decode step with ``p`` tokens already in the cache (the cache
    generation uses: ``runner.create_cache``)."""
    out = {}
    vocab = runner.meta.vocab_size
    for p in positions:
        ids = _prompt(vocab, 1, p)[0]
        cache = runner.create_cache(1)
        try:
            cache.add(0)
            for i in range(0, p, chunk):  # in chunks, as the engine prefills
                cache.prefill(0, ids[i:i + chunk])
            cache.join(0)
            times = []
            for r in range(reps):
                t = time.perf_counter()
                cache.decode(ids[r:r + 1])
                times.append(time.perf_counter() - t)
        finally:
            cache.close()
        out[p] = float(np.median(times))
    return out


class _Row:
    def __init__(self, name: str, path: str, backend: str, make_runner, weight_bytes: int, precision: str,
                 kv_bytes_per_token: int):
        self.name, self.path, self.backend, self.make_runner = name, path, backend, make_runner
        self.weight_bytes, self.precision, self.kv_bytes_per_token = weight_bytes, precision, kv_bytes_per_token
        self.read_bytes = weight_bytes  # weights a decode step reads (artifacts: see decode_read_bytes)
        self.samples: dict[str, list[float]] = {}
        self.runner = None
        self.engine = None  # starlift rows run through the engine; peers keep their own loops
        self.rss = 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.runner.deactivate()

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def _artifact_row(path: Path, backend: str, threads: int | None) -> _Row:
    from starlift.core.artifact import read_manifest
    from starlift.model import Starcoder2Config
    from starlift.runtimes import create_runner

    manifest = read_manifest(path)
    precision = manifest.get("precision", manifest.get("dtype", "fp32"))
    weight_bytes = sum(p.stat().st_size for p in path.glob("model.onnx*"))
    kv_elem = 2 if manifest.get("dtype") in ("fp16", "bf16") else 4
    kv = Starcoder2Config.from_hf(path).kv_cache_bytes(1, bytes_per_value=kv_elem)
    options = {"threads": threads} if threads else {}
    row = _Row(f"{path.name} ({manifest.get('flavour')} {precision})", str(path), backend,
               lambda: create_runner(backend, path, **options), weight_bytes, precision, kv)
    row.read_bytes = decode_read_bytes(path / "model.onnx")
    return row


def _peer_rows(reference: Path, threads: int | None) -> list[_Row]:
    """What a user would pick instead: transformers' eager Starcoder2ForCausalLM."""
    from starlift.model import Starcoder2Config

    config = Starcoder2Config.from_hf(reference)
    kv = config.kv_cache_bytes(1, bytes_per_value=4)
    weight_bytes = config.num_parameters() * 4
    return [_Row("transformers eager fp32", str(reference), "transformers",
                 lambda: TransformersRunner(reference, threads), weight_bytes, "fp32", kv)]


class TransformersRunner:
    """transformers' Starcoder2ForCausalLM behind the runner calls bench uses (a peer, not a starlift runner)."""

    name = "transformers"

    def __init__(self, checkpoint: Path, threads: int | None = None):
        self.checkpoint, self.threads = checkpoint, threads

    def activate(self):
        import torch
        import transformers

        from starlift.runtimes.base import ModelMeta

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = transformers.Starcoder2ForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32).eval()
        c = self.model.config
        self.meta = ModelMeta(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                              c.vocab_size, np.dtype(np.float32), c.max_position_embeddings)
        return self

    def deactivate(self):
        self.model = None

    def reset(self, batch: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def forward(self, ids, mask, pos, logits_to_keep: int = 0):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.array(ids)),
                             attention_mask=torch.from_numpy(np.array(mask)),
                             position_ids=torch.from_numpy(np.array(pos)),
                             cache=self.cache, use_cache=True, logits_to_keep=logits_to_keep)
        self.cache = out.cache
        return out.logits.numpy()

    def decode(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
        """The peer's own loop: prefill (TTFT) then greedy decode steps on one batch."""
        ids = _prompt(self.meta.vocab_size, batch, prompt_len)
        self.reset(batch)
        t0 = time.perf_counter()
        logits = self.forward(ids, np.ones((batch, prompt_len), np.int64),
                              np.broadcast_to(np.arange(prompt_len), (batch, prompt_len)))
        token = logits[:, -1].argmax(-1)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for step in range(new_tokens - 1):
            pos = prompt_len + step
            logits = self.forward(token[:, None], np.ones((batch, pos + 1), np.int64), np.full((batch, 1), pos))
            token = logits[:, -1].argmax(-1)
        return {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / (time.perf_counter() - t1)}

    def latency_by_position(self, positions: list[int], reps: int = 5) -> dict[int, float]:
        out = {}
        for p in positions:
            ids = _prompt(self.meta.vocab_size, 1, p)
            self.reset(1)
            self.forward(ids, np.ones((1, p), np.int64), np.arange(p)[None])
            times = []
            for r in range(reps):
                t = time.perf_counter()
                self.forward(ids[:, :1], np.ones((1, p + r + 1), np.int64), np.array([[p + r]]))
                times.append(time.perf_counter() - t)
            out[p] = float(np.median(times))
        return out


class GenaiPeer:
    """onnxruntime-genai's own generation loop on a starlift artifact (a peer, measured end to end:
    it has no per-step forward call, so no latency-by-position curve)."""

    name = "onnxruntime-genai"

    def __init__(self, artifact: Path):
        self.artifact = artifact

    def activate(self):
        import onnxruntime_genai as og

        from starlift.runtimes.base import ModelMeta

        self.og, self.model = og, og.Model(str(self.artifact))
        config = json.loads((self.artifact / "genai_config.json").read_text())["model"]
        d = config["decoder"]
        self.meta = ModelMeta(d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], config["vocab_size"],
                              np.dtype(np.float32), config["context_length"])
        return self

    def deactivate(self):
        self.model = None

    def decode(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
        og = self.og
        ids = _prompt(self.meta.vocab_size, batch, prompt_len).astype(np.int32)
        params = og.GeneratorParams(self.model)
        total = prompt_len + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        return {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / (time.perf_counter() - t1)}


class WorkerPeer:
    """A peer that runs in a subprocess of another interpreter (its own venv), driven by one JSON
    request per stdin line and one JSON reply per stdout line; the first reply says it is ready.
    Subclasses give the command line (``_command``) and read the ready reply (``_ready``)."""

    name = "worker"
    label = "peer"  # for error messages
    venv_hint = ""

    def __init__(self, python: str | Path, checkpoint: Path, precision: str, threads: int | None = None):
        self.python, self.checkpoint, self.precision = str(python), Path(checkpoint), precision
        self.threads = threads
        self.proc = self.log = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self, reply: dict) -> None:
        self.weight_bytes, self.rss_bytes = int(reply["weight_bytes"]), int(reply["rss_bytes"])

    def activate(self):
        from starlift.model import Starcoder2Config
        from starlift.runtimes.base import ModelMeta

        c = Starcoder2Config.from_hf(self.checkpoint)
        self.meta = ModelMeta(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size,
                              np.dtype(np.float32), c.max_position_embeddings)
        # stderr to a file: exports and conversions log a lot, and a pipe nobody reads would block the worker
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        try:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.log, text=True, bufsize=1, env=env)
        except OSError as e:
            raise UsageError(f"{self.label} {self.python}: cannot run it ({e}); {self.venv_hint}") from None
        ready = self._receive()
        if not ready.get("ready"):
            self._fail(f"unexpected first reply {ready}")
        self._ready(ready)
        return self

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._fail("the worker exited")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self._fail(f"the worker wrote {line[:200]!r} instead of a JSON reply")

    def request(self, req: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail("the worker exited")
        return self._receive()

    def _fail(self, what: str):
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.seek(0)
        lines = [x for x in self.log.read().splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("error: ")]
        detail = errors[-1][len("error: "):] if errors else " | ".join(lines[-5:]) or "no message"
        self.proc = None
        if code == 3:  # the interpreter lacks the peer's library
            raise UsageError(f"{self.label}: {detail}")
        raise PeerError(f"{self.name} peer ({self.precision}, {self.python}): {what} (exit {code}): {detail}")

    def deactivate(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


class OptimumPeer(WorkerPeer):
    """optimum-onnx's export of the checkpoint, run by ``ORTModelForCausalLM`` in a subprocess of an
    interpreter that has optimum-onnx (it needs transformers<4.58; starlift uses 5.x):
    ``optimum_worker.py`` exports (cached in ``cache_dir``), quantizes and answers requests.
    Measured end to end like GenaiPeer, so no latency-by-position curve."""

    name = "optimum-onnx"
    label = "--optimum"
    venv_hint = "pass the python of a venv with optimum-onnx (`make optimum-venv` makes .venv-optimum/bin/python)"
    WORKER = Path(__file__).with_name("optimum_worker.py")

    def __init__(self, python: str | Path, checkpoint: Path, precision: str, cache_dir: str | Path | None = None,
                 threads: int | None = None):
        super().__init__(python, checkpoint, precision, threads)
        self.cache_dir = Path(cache_dir or DEFAULT_OPTIMUM_CACHE).expanduser()

    def _command(self) -> list[str]:
        return [self.python, str(self.WORKER), str(self.checkpoint), "--precision", self.precision,
                "--workdir", str(self.cache_dir)] + (["--threads", str(self.threads)] if self.threads else [])

    def _ready(self, reply: dict) -> None:
        super()._ready(reply)
        self.folder = reply.get("folder")

    def decode(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
        return self.request({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seed": 0})

    def greedy(self, ids, new_tokens: int) -> dict:
        """Greedy tokens and each step's logits for ``ids`` (a batch of equal-length prompts)."""
        return self.request({"cmd": "greedy", "ids": np.asarray(ids).tolist(), "new_tokens": new_tokens})


def _optimum_rows(python: str, reference: Path, precisions, cache_dir, threads: int | None) -> list[_Row]:
    from starlift.model import Starcoder2Config

    config = Starcoder2Config.from_hf(reference)
    kv = config.kv_cache_bytes(1, bytes_per_value=4)
    # weight_bytes is replaced by the exported files' size once the worker has exported them
    return [_Row(f"optimum-onnx {p}", str(reference), "optimum-onnx",
                 lambda p=p: OptimumPeer(python, reference, p, cache_dir, threads), config.num_parameters() * 4, p, kv)
            for p in precisions]


def _has_own_loop(runner) -> bool:
    return isinstance(runner, (GenaiPeer, WorkerPeer))


def _latency(row, positions: list[int]) -> dict[int, float]:
    if _has_own_loop(row.runner):  # measured end to end: no per-step call
        return {}
    if isinstance(row.runner, TransformersRunner):
        return row.runner.latency_by_position(positions)
    return latency_by_position(row.runner, positions)


def _decode(row, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    if row.engine is None:  # a peer: its own loop
        return row.runner.decode(batch, prompt_len, new_tokens)
    return run_decode(row.engine, batch, prompt_len, new_tokens)


def run(paths: list[str], backends: list[str], prompt_len: int = 128, new_tokens: int = 128,
        batches: tuple[int, ...] = (1, 4, 8), reps: int = 3, peers_reference: str | None = None,
        genai: bool = False, optimum_python: str | None = None, optimum_precisions=OPTIMUM_PRECISIONS,
        optimum_cache: str | None = None, llama_cpp: str | None = None, llama_cpp_quants=("f32", "q8_0", "q4_0"),
        llama_cpp_cache: str | None = None,
        threads: int | None = None, positions: list[int] | None = None, progress: bool = True,
        sequential: bool = False) -> dict[str, Any]:
    """Measure every row; rows are loaded together and timed round-robin, or with
    ``sequential`` one at a time (models that do not fit in memory together)."""
    from starlift.api import is_artifact

    if prompt_len < 1 or new_tokens < 2 or reps < 1:
        raise UsageError("--prompt-len must be >= 1, --new-tokens >= 2 and --reps >= 1")
    if optimum_python:
        if not peers_reference:
            raise UsageError("--optimum needs --peers CHECKPOINT: optimum-onnx exports that Hugging Face checkpoint")
        if not Path(optimum_python).is_file() or not os.access(optimum_python, os.X_OK):
            raise UsageError(f"--optimum {optimum_python}: no such interpreter; `make optimum-venv` makes "
                             ".venv-optimum/bin/python")
        bad = [p for p in optimum_precisions if p not in OPTIMUM_PRECISIONS]
        if bad or not optimum_precisions:
            raise UsageError(f"--optimum-precision takes {', '.join(OPTIMUM_PRECISIONS)}, got {bad or 'nothing'}")
    rows: list[_Row] = []
    first: dict[str, _Row] = {}  # per artifact: its manifest, sizes and graph are read once
    for p in paths:
        if not is_artifact(p):
            raise UsageError(f"{p} is not an artifact folder (no manifest.json); export it first")
        for b in backends:
            rows.append(_artifact_row(Path(p), b, threads))
            first.setdefault(p, rows[-1])
    if peers_reference:
        rows.extend(_peer_rows(Path(peers_reference), threads))
    if optimum_python:
        rows.extend(_optimum_rows(optimum_python, Path(peers_reference), optimum_precisions, optimum_cache, threads))
    if llama_cpp:
        if not peers_reference:
            raise UsageError("--llama-cpp needs --peers CHECKPOINT: llama.cpp converts that Hugging Face checkpoint")
        from . import llama_cpp as llama

        rows.extend(llama.rows(llama_cpp, Path(peers_reference), llama_cpp_quants, llama_cpp_cache, threads,
                               n_ctx=prompt_len + new_tokens + 16))
    if genai:
        for p in paths:
            base = first.get(p) or _artifact_row(Path(p), "onnxruntime", threads)
            genai_row = _Row(base.name, base.path, "onnxruntime-genai", lambda p=p: GenaiPeer(Path(p)),
                             base.weight_bytes, base.precision, base.kv_bytes_per_token)
            genai_row.read_bytes = base.read_bytes
            rows.append(genai_row)
    bandwidth = [memory_bandwidth()]
    results = []
    try:
        if sequential:  # one model in memory at a time: rows are not interleaved
            for row in rows:
                _activate(row, prompt_len, max(batches))
                _timed([row], batches, reps, prompt_len, new_tokens, progress)
                results.append(_summarize(row, bandwidth, batches, prompt_len, new_tokens, positions))
                row.close()
        else:
            for row in rows:
                _activate(row, prompt_len, max(batches))
            _timed(rows, batches, reps, prompt_len, new_tokens, progress)
            for row in rows:
                results.append(_summarize(row, bandwidth, batches, prompt_len, new_tokens, positions))
                row.close()
    finally:
        for row in rows:  # subprocess peers and engine threads must not outlive a failed run
            if isinstance(row.runner, WorkerPeer):
                row.runner.deactivate()
            if row.engine is not None:
                row.engine.close()
    bandwidth.append(memory_bandwidth())
    best_bw = max(bandwidth)
    for r in results:  # the roofline against the highest bandwidth seen in the run
        r["roofline_tokens_per_s"] = best_bw / r.pop("step_bytes")
        r["roofline_fraction"] = r["decode_tokens_per_s"] / r["roofline_tokens_per_s"]
    return _compare(results, best_bw, bandwidth, prompt_len, new_tokens, batches, reps, threads, sequential)


def _activate(row: _Row, prompt_len: int, max_batch: int) -> None:
    from starlift.engine import Engine
    from starlift.runtimes.base import Runner

    base = _rss()
    row.runner = row.make_runner().activate()
    if isinstance(row.runner, Runner):
        row.engine = Engine(row.runner, max_batch=max_batch).start()
    row.rss = _rss() - base
    if isinstance(row.runner, WorkerPeer):  # another process: its own RSS growth, its model's size
        row.rss, row.weight_bytes = row.runner.rss_bytes, row.runner.weight_bytes
        row.read_bytes = row.weight_bytes
    if isinstance(row.runner, OptimumPeer):
        graphs = sorted(Path(row.runner.folder).glob("*.onnx")) if row.runner.folder else []
        row.read_bytes = decode_read_bytes(graphs[0]) if len(graphs) == 1 else row.weight_bytes
    _decode(row, 1, min(prompt_len, 16), 4)  # warm-up


def _timed(rows, batches, reps, prompt_len, new_tokens, progress) -> None:
    from starlift.core.progress import progress_bar

    work = [(row, batch) for _ in range(reps) for batch in batches for row in rows
            if batch <= getattr(row.runner, "max_batch", batch)]  # llama.cpp's binding: batch 1 only
    for row, batch in progress_bar(work, desc="bench", enabled=progress):
        r = _decode(row, batch, prompt_len, new_tokens)
        row.add(f"tokens_per_s@{batch}", r["decode_tokens_per_s"])
        if batch == 1:
            row.add("ttft_s", r["ttft_s"])


def _summarize(row, bandwidth, batches, prompt_len, new_tokens, positions) -> dict[str, Any]:
    bandwidth.append(memory_bandwidth())
    context = row.runner.meta.context or 2048
    pos_list = positions or [p for p in (64, 256, 1024, 4096) if p < context]
    lat = _latency(row, pos_list)
    med = {k: float(np.median(v)) for k, v in row.samples.items()}
    tps1 = med["tokens_per_s@1"]
    return {
        "name": row.name, "path": row.path, "backend": row.backend, "precision": row.precision,
        "decode_tokens_per_s": tps1, "ttft_s": med["ttft_s"],
        "throughput_tokens_per_s": {b: med.get(f"tokens_per_s@{b}") for b in batches},
        "batch_scaling": {b: med[f"tokens_per_s@{b}"] / tps1 if f"tokens_per_s@{b}" in med else None
                          for b in batches},
        "rss_bytes": row.rss, "weight_bytes": row.weight_bytes,
        # bytes one decode step reads: weights at their stored precision + the KV cache at mid-run
        "weights_read_per_step_bytes": row.read_bytes,
        "step_bytes": row.read_bytes + row.kv_bytes_per_token * (prompt_len + new_tokens // 2),
        "latency_by_position_s": {str(k): v for k, v in lat.items()},
        "samples": row.samples,
    }


def _compare(results, bandwidth, samples, prompt_len, new_tokens, batches, reps, threads, sequential) -> dict[str, Any]:
    peer = next((r for r in results if r["backend"] == "transformers"), None)
    for r in results:
        if peer:
            r["vs_transformers"] = r["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
            r["ttft_vs_transformers"] = r["ttft_s"] / peer["ttft_s"]
        r["is_peer"] = r["backend"] in PEER_BACKENDS
    for r in results:  # each starlift row against the fastest peer at its precision
        same = [q for q in results if q["is_peer"] and q["precision"] == r["precision"]]
        if not r["is_peer"] and same:
            best = max(same, key=lambda q: q["decode_tokens_per_s"])
            r["best_peer"] = f"{best['backend']}: {best['name']}"
            r["vs_best_peer"] = r["decode_tokens_per_s"] / best["decode_tokens_per_s"]
            # paired: the two rows' batch-1 samples of the same round, taken seconds apart, so a
            # drift of the machine's memory bandwidth hits both; the median of those ratios
            mine, theirs = r["samples"].get("tokens_per_s@1", []), best["samples"].get("tokens_per_s@1", [])
            if mine and len(mine) == len(theirs) and not sequential:  # sequential rows share no round
                ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
                r["vs_best_peer_paired"] = {"median": float(np.median(ratios)), "min": ratios[0], "max": ratios[-1]}
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "memory_bandwidth_bytes_per_s": bandwidth,
                        "memory_bandwidth_samples": samples, "memory_bandwidth_method": "read-only: torch.sum of 1 GiB",
                        "transparent_huge_pages": _huge_pages()},
            "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "batches": list(batches),
                         "reps": reps, "threads": threads, "interleaved": not sequential},
            "results": results}


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"


def format_table(report: dict[str, Any]) -> str:
    bw = report["machine"]["memory_bandwidth_bytes_per_s"] / 1e9
    s = report["settings"]
    lines = [f"bench: prompt {s['prompt_len']}, {s['new_tokens']} new tokens, median of {s['reps']}; "
             f"read bandwidth {bw:.1f} GB/s",
             f"{'row':<28} {'backend':<17} {'tok/s':>8} {'TTFT ms':>8} "
             + " ".join(f"{'b' + str(b) + ' tok/s':>10}" for b in s["batches"])
             + f" {'RSS MiB':>8} {'roofline':>8} {'vs HF':>6} {'vs best peer':>12}"]

    def ratio(r, key, width):
        return f"{r[key]:>{width - 1}.2f}x" if key in r else f"{'-':>{width}}"

    for r in report["results"]:
        lines.append(f"{r['name']:<28} {r['backend']:<17} {r['decode_tokens_per_s']:>8.1f} {r['ttft_s'] * 1e3:>8.1f} "
                     + " ".join(_cell(r["throughput_tokens_per_s"][b], 10) for b in s["batches"])
                     + f" {r['rss_bytes'] / 2**20:>8.0f} {r['roofline_fraction'] * 100:>7.1f}%"
                     + f" {ratio(r, 'vs_transformers', 6)} {ratio(r, 'vs_best_peer', 12)}")
    def paired(r):
        p = r.get("vs_best_peer_paired")
        return f" (paired by round: median {p['median']:.2f}x, {p['min']:.2f}-{p['max']:.2f}x)" if p else ""

    best = [f"{r['name']}/{r['backend']} vs {r['best_peer']}{paired(r)}" for r in report["results"] if "best_peer" in r]
    if best:
        lines.append("vs best peer (fastest peer row at the same precision, batch 1): " + "; ".join(best))
    lines.append("latency per decode step (ms) by position: " + "; ".join(
        f"{r['name']}/{r['backend']}: " + ", ".join(f"{p}:{v * 1e3:.2f}" for p, v in r["latency_by_position_s"].items())
        for r in report["results"]))
    return "\n".join(lines)


def plot(report: dict[str, Any], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['name']}\n{r['backend']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["decode_tokens_per_s"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s (batch 1)")
    s = report["settings"]
    ax.set_title(f"starlift bench: prompt {s['prompt_len']}, {s['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
