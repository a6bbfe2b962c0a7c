"""ONNX Runtime runner: both flavours, CPU by default, CUDA / TensorRT EPs when present.

Graphs whose GroupQueryAttention reads each row's own length from the attention mask (the ort
flavour, ``starlift.kv_cache.per_row_lengths`` in the model's metadata) get a ``SlotPool``: one
preallocated buffer per layer key/value, ``[slots, kv_heads, capacity, head_dim]``, bound through
IO binding as both past and present, so the kernel writes each new key and value in place and
no step copies the cache (capacity doubles when it runs out: O(n) copying in total). Concat
graphs (portable, and ort artifacts exported before per-row lengths) get the generic
``ConcatBatch``: ORT-owned OrtValues, each step's ``present`` bound as the next ``past``.

A 4-bit artifact quantized with ``--int8-gemm`` has a second graph beside ``model.onnx``,
``int8_gemm.onnx`` (quantize/int8_gemm.py): the same contract, its matmuls on the integer
GEMM. The runner opens it as a second session and sends it the wide steps, where the integer
GEMM is faster than the 4-bit kernel: a row's step of at least ``min_tokens`` new tokens (a
prompt, a prefill chunk) and a decode step of at least ``min_rows`` rows (both numbers are the
graph's metadata). One-row decode steps and speculative verifications stay on ``model.onnx``
(a verification must compute what a plain decode step would). Both sessions bind the same
cache buffers.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from starlift.core.artifact import (
    GEMM_FILE,
    GEMM_MIN_ROWS_KEY,
    GEMM_MIN_TOKENS_KEY,
    LOGITS_TO_KEEP,
    PER_ROW_LENGTHS_KEY,
    past_names,
    present_names,
)
from starlift.core.errors import StarliftError, UsageError

from .base import ModelMeta, Past, Runner
from .kv import KVCache
from .onnx_metadata import has_group_query_attention, meta_from_io

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
# ONNX Runtime's intra-op threads keep spinning after a run returns (~45 ms of one core on two
# threads, measured after every request: scripts/ort-spin-tail/tail.py), so each call of a
# generation loop left a core busy behind it: taken from the caller's next job, from the editor
# the completion serves, and in `starlift bench` from the next row timed. force_spinning_stop
# ends the spin when the run returns; they still spin inside a run, between its kernels. Measured
# by that script the same speed as the default (nano-edit int4, a 233-token prompt and 64 new:
# 64.5 against 66.2 ms; 113M int4 block 128, 1,024 and 32 new: 1,018 against 1,015 ms), where
# allow_spinning=0 cost 1.42x on nano (91.7 ms). A caller's session_config overrides it.
DEFAULT_SESSION_CONFIG = {"session.force_spinning_stop": "1"}
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path, providers: list[str] | None = None, threads: int | None = None,
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None,
                 kv_buffer: str = "auto", initial_capacity: int = 256, profile: bool = False,
                 int8_gemm: bool = True):
        super().__init__()
        self.model_path = Path(model_path)
        self.requested_providers = providers
        self.threads = threads
        if graph_optimization not in OPT_LEVELS:
            raise UsageError(f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, got {graph_optimization!r}")
        self.graph_optimization = graph_optimization
        self.session_config = {**DEFAULT_SESSION_CONFIG, **(session_config or {})}
        if kv_buffer not in ("auto", "shared", "concat"):
            raise UsageError(f"kv_buffer must be auto, shared or concat, got {kv_buffer!r}")
        # kv_buffer: "shared" = the slot pool (in-place buffers, rows with their own lengths),
        # "concat" = the left-padded concat batch, "auto" = the slot pool where the graph allows it
        self.kv_buffer, self.initial_capacity = kv_buffer, max(1, initial_capacity)
        self.shared_kv = False
        self.session = None
        # int8_gemm: open the artifact's int8_gemm.onnx when it has one (False: model.onnx only)
        self.use_gemm_graph, self.gemm_session = int8_gemm, None
        self.gemm_min_tokens = self.gemm_min_rows = None
        # profile=True turns on ORT's kernel profiler (a JSON trace, see end_profiling);
        # run_seconds always sums the time spent inside ORT's run call, so a caller can tell
        # the runtime's share of a step from its own Python's.
        self.profile, self.run_seconds = profile, 0.0

    def _providers(self, ort) -> list[str]:
        available = ort.get_available_providers()
        if self.requested_providers is None:
            return ["CPUExecutionProvider"]
        wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in self.requested_providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UsageError(f"requested provider(s) {', '.join(missing)}, but available providers are: "
                             f"{', '.join(available)}")
        return wanted

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.graph_optimization])
        if self.threads:
            opts.intra_op_num_threads = self.threads
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        if self.profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), "starlift-ort-profile")
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=self._providers(ort))
        self._ort = ort
        gemm = self.model_path.with_name(GEMM_FILE)
        if self.use_gemm_graph and gemm.is_file():
            if self.profile:
                opts.profile_file_prefix += "-int8-gemm"
            self.gemm_session = ort.InferenceSession(str(gemm), opts, providers=self._providers(ort))
            custom = self.gemm_session.get_modelmeta().custom_metadata_map or {}
            try:
                self.gemm_min_tokens = max(2, int(custom[GEMM_MIN_TOKENS_KEY]))
                self.gemm_min_rows = max(2, int(custom[GEMM_MIN_ROWS_KEY]))
            except (KeyError, ValueError) as e:
                raise StarliftError(f"{gemm} has no valid {GEMM_MIN_TOKENS_KEY} / {GEMM_MIN_ROWS_KEY} metadata ({e}): "
                                    "the artifact is damaged, quantize it again") from None

    def session_for(self, rows: int, new_tokens: int):
        """The session that runs a step of ``rows`` rows of ``new_tokens`` tokens each."""
        if self.gemm_session is not None and (new_tokens >= self.gemm_min_tokens
                                              or (new_tokens == 1 and rows >= self.gemm_min_rows)):
            return self.gemm_session
        return self.session

    def _read_metadata_impl(self) -> ModelMeta:
        inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        meta = meta_from_io(inputs, outputs, kv_type, self.model_path)
        self._gqa = has_group_query_attention(self.model_path)
        # an input with a default is listed among the overridable initializers, not the inputs;
        # artifacts exported before it have no such input
        self._has_keep = LOGITS_TO_KEEP in inputs or any(
            i.name == LOGITS_TO_KEEP for i in self.session.get_overridable_initializers())
        self._keep_values: dict[int, object] = {}
        self._float_logits = next(o.type for o in self.session.get_outputs() if o.name == "logits") == "tensor(float)"
        custom = self.session.get_modelmeta().custom_metadata_map or {}
        self.per_row_lengths = self._gqa and custom.get(PER_ROW_LENGTHS_KEY) == "true"
        if self.kv_buffer == "shared" and not self._gqa:
            raise UsageError(f"{self.model_path} concatenates its KV cache in the graph (portable flavour); an in-place "
                             "shared buffer needs the ort flavour's GroupQueryAttention: export with --flavour ort")
        if self.kv_buffer == "shared" and not self.per_row_lengths:
            raise UsageError(f"{self.model_path} was exported before GroupQueryAttention read each row's length from "
                             "the attention mask, so its rows cannot share one buffer: re-export it with this starlift "
                             "(or use kv_buffer='concat')")
        self.shared_kv = self.per_row_lengths and self.kv_buffer != "concat"
        self._past_names, self._present_names = past_names(meta.num_layers), present_names(meta.num_layers)
        return meta

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    # ---- caches ----------------------------------------------------------------------------
    def create_cache(self, max_batch: int) -> KVCache:
        self._require_active()
        if self.shared_kv:
            return SlotPool(self, max_batch, self.initial_capacity)
        return super().create_cache(max_batch)

    def empty_past(self, batch: int) -> Past:
        m = self.meta
        return [self._ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, m.kv_heads, 0, m.head_dim), m.kv_dtype))
                for _ in self._past_names]

    def past_to_numpy(self, past: Past) -> list[np.ndarray]:
        return [v.numpy() for v in past]

    def past_from_numpy(self, arrays: list[np.ndarray]) -> Past:
        # a CPU OrtValue wraps the array's memory and keeps a reference to it: no copy
        return [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays]

    def bind_logits_to_keep(self, io, logits_to_keep: int) -> None:
        """Feed ``logits_to_keep`` when the graph has that input (older artifacts compute every
        position; ``Runner.run`` cuts them). Bound as an OrtValue: IO binding's bind_cpu_input cannot find an input that has an
        initializer (its default), bind_ortvalue_input can. One OrtValue per value, kept."""
        if not self._has_keep:
            return
        value = self._keep_values.get(logits_to_keep)
        if value is None:
            value = self._keep_values[logits_to_keep] = self._ort.OrtValue.ortvalue_from_numpy(
                np.array(logits_to_keep, np.int64))
        io.bind_ortvalue_input(LOGITS_TO_KEEP, value)

    def _timed_run(self, io, session=None) -> None:
        start = time.perf_counter()
        (session or self.session).run_with_iobinding(io)
        self.run_seconds += time.perf_counter() - start

    def _run_impl(self, input_ids, attention_mask, position_ids, past, logits_to_keep=0):
        b, t = input_ids.shape
        if self._gqa and b > 1 and t > 1 and attention_mask.shape[1] > t:
            raise UsageError(
                "ONNX Runtime's GroupQueryAttention (the ort flavour) cannot take several new tokens on a non-empty "
                f"cache for batch > 1 (got batch {b}, {t} tokens after {attention_mask.shape[1] - t}); prefill each "
                "batch in one call, or use the portable flavour")
        session = self.session_for(b, t)
        io = session.io_binding()
        io.bind_output("logits")  # outputs come back in binding order: logits first
        for name, value in zip(self._past_names, past, strict=True):
            io.bind_ortvalue_input(name, value)
        for name in self._present_names:
            io.bind_output(name)
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        io.bind_cpu_input("position_ids", position_ids)
        if logits_to_keep:
            self.bind_logits_to_keep(io, logits_to_keep)
        self._timed_run(io, session)
        outputs = io.get_outputs()
        return outputs[0].numpy().astype(np.float32, copy=False), list(outputs[1:])

    def end_profiling(self) -> str:
        """Stop ORT's profiler; returns the path of its JSON trace (only with profile=True), both
        sessions' events on one clock when the artifact has an integer-GEMM graph."""
        if not self.profile or self.session is None:
            raise UsageError("profiling was not enabled: create the runner with profile=True")
        path = self.session.end_profiling()
        if self.gemm_session is not None:  # one trace: the integer-GEMM session's events join it
            import json

            other = self.gemm_session.end_profiling()
            shift = (self.gemm_session.get_profiling_start_time_ns()
                     - self.session.get_profiling_start_time_ns()) // 1000  # µs, each trace's own zero
            events = json.loads(Path(other).read_text())
            for event in events:
                if "ts" in event:
                    event["ts"] += shift
            Path(path).write_text(json.dumps(json.loads(Path(path).read_text()) + events))
            os.remove(other)
        return path

    def _deactivate_impl(self) -> None:
        self.session = self.gemm_session = None


class SlotPool(KVCache):
    """One preallocated buffer per layer key/value, ``[slots, kv_heads, capacity, head_dim]``,
    each slot (row) with its own length, bound as both past and present of GroupQueryAttention.

    Decoding rows stay compacted at the bottom: slot i holds ``rows[i]``, so a decode step runs
    all of them as the contiguous view ``buf[0:n]``, with a right-padded mask whose last 1 in
    each row is that row's length (the graph's seqlens_k). When a row retires, the last row
    moves into its slot (copying only its used length). A prefill chunk runs batch 1 on its own
    slot's view ``buf[i:i+1]`` (ORT's GroupQueryAttention takes several new tokens on a
    non-empty cache only for batch 1). IO bindings are built once per decode width and per slot,
    and rebuilt only when the buffers grow.
    """

    kind = "slots"

    def __init__(self, runner: OnnxRuntimeRunner, max_batch: int, capacity: int):
        super().__init__(runner, max_batch)
        m = runner.meta
        self._ort = runner._ort
        self.capacity = max(1, min(capacity, m.context or capacity))
        self._buffers = self._allocate(self.capacity)
        self._slot: dict = {}
        self._lens = np.zeros(max_batch, np.int64)  # used length per slot
        self._free = set(range(max_batch))
        self._bindings: dict = {}
        self._logits = np.empty((max_batch, 1, m.vocab_size), np.float32) if runner._float_logits else None
        self._ones = np.ones((1, self.capacity), np.int64)

    def _allocate(self, capacity: int) -> list[np.ndarray]:
        m = self.runner.meta
        return [np.zeros((self.max_batch, m.kv_heads, capacity, m.head_dim), m.kv_dtype)
                for _ in self.runner._past_names]

    def __contains__(self, seq) -> bool:
        return seq in self._slot

    def length(self, seq) -> int:
        return int(self._lens[self._slot[seq]])

    def add(self, seq) -> None:
        if seq in self._slot:
            raise StarliftError(f"sequence {seq!r} is already in the cache")
        if not self._free:
            raise StarliftError(f"all {self.max_batch} slots are taken")
        slot = min(self._free)  # decoding rows hold [0, n): a free slot is above them
        self._free.remove(slot)
        self._slot[seq] = slot
        self._lens[slot] = 0

    # ---- binding -------------------------------------------------------------------------
    def _bind(self, rows: slice, session):
        """An IO binding of ``session`` with past and present of every layer bound to ``buf[rows]``."""
        io = session.io_binding()
        io.bind_output("logits")  # first: outputs come back in binding order; rebinding keeps the slot
        runner = self.runner
        for past, present, buf in zip(runner._past_names, runner._present_names, self._buffers, strict=True):
            view = self._ort.OrtValue.ortvalue_from_numpy(buf[rows])  # contiguous: rows are the leading axis
            io.bind_ortvalue_input(past, view)
            io.bind_ortvalue_output(present, view)  # the same memory: updated in place
        return io

    def _grow(self, needed: int) -> None:
        context = self.runner.meta.context
        if context and needed > context:
            raise UsageError(f"{needed} tokens exceed the model's context of {context}")
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, context) if context else capacity
        used = int(self._lens.max())
        grown = self._allocate(capacity)
        for new, old in zip(grown, self._buffers, strict=True):
            new[:, :, :used] = old[:, :, :used]
        self._buffers, self.capacity, self._bindings = grown, capacity, {}

    def _copy(self, src: int, dst: int) -> None:
        n = int(self._lens[src])
        for buf in self._buffers:
            buf[dst, :, :n] = buf[src, :, :n]
        self._lens[dst] = n

    # ---- steps ---------------------------------------------------------------------------
    def prefill(self, seq, ids, all_logits: bool = False, exact_step: bool = False) -> np.ndarray:
        """``exact_step``: on model.onnx whatever the width (a speculative verification)."""
        slot = self._slot[seq]
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)
        done, t = int(self._lens[slot]), ids.shape[1]
        self._check_room(seq, t)
        if done + t > self.capacity:
            self._grow(done + t)
        session = self.runner.session if exact_step else self.runner.session_for(1, t)
        key = ("prefill", slot, session is self.runner.session)
        io = self._bindings.get(key)
        if io is None:
            io = self._bindings[key] = self._bind(slice(slot, slot + 1), session)
        mask = np.ones((1, done + t), np.int64)
        positions = np.arange(done, done + t, dtype=np.int64)[None]
        self.runner.check_inputs(ids, mask, positions)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        # the binding is kept per slot, so logits_to_keep is bound on every chunk: 1 (the graph
        # skips the LM head for every position but the last), or 0 (all) for all_logits
        self.runner.bind_logits_to_keep(io, 0 if all_logits else 1)
        io.bind_output("logits")
        self.runner._timed_run(io, session)
        self._lens[slot] = done + t
        logits = io.get_outputs()[0].numpy().astype(np.float32, copy=False)
        return logits[0] if all_logits else logits[0, -1]

    def join(self, seq) -> None:
        n, slot = len(self.rows), self._slot[seq]
        if slot != n:  # the first slot above the decoding rows: move (or swap) this one there
            other = next((s for s, i in self._slot.items() if i == n), None)
            if other is None:
                self._copy(slot, n)
                self._free.add(slot)
                self._free.discard(n)
                self._lens[slot] = 0
            else:  # a sequence still prefilling holds slot n: swap the two
                mine, theirs = int(self._lens[slot]), int(self._lens[n])
                for buf in self._buffers:
                    held = buf[slot, :, :mine].copy()
                    buf[slot, :, :theirs] = buf[n, :, :theirs]
                    buf[n, :, :mine] = held
                self._lens[slot], self._lens[n] = theirs, mine
                self._slot[other] = slot
            self._slot[seq] = n
        self.rows.append(seq)

    def decode(self, tokens) -> np.ndarray:
        n = len(self.rows)
        if not n:
            raise StarliftError("no sequence has joined the decode batch")
        lens = self._lens[:n]
        total = int(lens[0] if n == 1 else lens.max()) + 1
        if total > self.capacity:
            self._grow(total)
        key = ("decode", n)
        io = self._bindings.get(key)
        if io is None:
            io = self._bindings[key] = self._bind(slice(0, n), self.runner.session_for(n, 1))
            if self._logits is not None:  # a decode step writes its logits into our buffer
                self._bindings[key, "logits"] = self._ort.OrtValue.ortvalue_from_numpy(self._logits[:n])
                io.bind_ortvalue_output("logits", self._bindings[key, "logits"])
        ids = np.asarray(tokens, np.int64).reshape(n, 1)
        # right-padded: row b holds 1 up to its new token at index lens[b] (the graph's seqlens_k)
        if n == 1:  # all ones: a view of a row kept for that
            if self._ones.shape[1] < total:
                self._ones = np.ones((1, max(total, 2 * self._ones.shape[1])), np.int64)
            mask = self._ones[:, :total]  # contiguous: one row
        else:
            mask = (np.arange(total)[None, :] <= lens[:, None]).astype(np.int64)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", lens[:, None])  # read during the run, before lens moves
        if self._logits is None:
            io.bind_output("logits")
        self.runner._timed_run(io, self.runner.session_for(n, 1))
        self._lens[:n] += 1
        if self._logits is not None:
            return self._logits[:n, 0]
        return io.get_outputs()[0].numpy().astype(np.float32, copy=False)[:, -1]

    # ---- speculative decoding: GroupQueryAttention takes several new tokens for batch 1 only ---
    def decode_many(self, tokens) -> list[np.ndarray]:
        if len(self.rows) != 1 or len(tokens) != 1:
            raise StarliftError("the slot pool decodes several tokens for a batch of one row only; with more rows "
                                "decode one token each, then extend() a row alone")
        return [self.extend(self.rows[0], np.asarray(tokens[0], np.int64))]

    def extend(self, seq, ids) -> np.ndarray:
        # a decoding row's slot is a batch-1 view like a prefilling one's: the prefill call, every
        # position's logits (logits_to_keep=0 computes exactly the len(ids) positions fed)
        return self.prefill(seq, ids, all_logits=True, exact_step=True)

    def rollback(self, drops: dict) -> None:
        # the row's length is its mask's last 1: keys past it are never read, and overwritten next
        for seq, n in drops.items():
            if n:
                self._lens[self._slot[seq]] -= n

    def remove(self, seq) -> None:
        slot = self._slot.pop(seq)
        n = len(self.rows)
        if slot < n:  # a decoding row: the last row moves into its slot
            last = n - 1
            if slot != last:
                moved = self.rows[last]
                self._copy(last, slot)
                self.rows[slot] = moved
                self._slot[moved] = slot
            self.rows.pop()
            slot = last
        self._lens[slot] = 0
        self._free.add(slot)

    def close(self) -> None:
        super().close()
        self._buffers, self._bindings, self._slot = [], {}, {}
