"""ONNX Runtime runner: both flavours, CPU by default, CUDA / TensorRT EPs when present.

Graphs with GroupQueryAttention (the ort flavour) get a preallocated KV buffer shared between
past and present: both are bound through IO binding to the same memory, the kernel writes each
new key and value in place, and no step copies the cache (capacity doubles when it runs out,
so growth costs O(n) in total). Concat graphs (portable) keep the cache in ORT-owned OrtValues,
each step's ``present`` bound as the next ``past``; the graph writes past + new once per step.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from starlift.core.artifact import LOGITS_TO_KEEP, past_names, present_names
from starlift.core.errors import UsageError

from .base import ModelMeta, Runner
from .onnx_metadata import has_group_query_attention, meta_from_io

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path, providers: list[str] | None = None, threads: int | None = None,
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None,
                 kv_buffer: str = "auto", initial_capacity: int = 256, profile: bool = False):
        super().__init__()
        self.model_path = Path(model_path)
        self.requested_providers = providers
        self.threads = threads
        if graph_optimization not in OPT_LEVELS:
            raise UsageError(f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, got {graph_optimization!r}")
        self.graph_optimization = graph_optimization
        self.session_config = session_config or {}
        if kv_buffer not in ("auto", "shared", "concat"):
            raise UsageError(f"kv_buffer must be auto, shared or concat, got {kv_buffer!r}")
        self.kv_buffer, self.initial_capacity = kv_buffer, max(1, initial_capacity)
        self.shared_kv = False
        self.session = None
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
        self._float_logits = next(o.type for o in self.session.get_outputs() if o.name == "logits") == "tensor(float)"
        if self.kv_buffer == "shared" and not self._gqa:
            raise UsageError(f"{self.model_path} concatenates its KV cache in the graph (portable flavour); an in-place "
                             "shared buffer needs the ort flavour's GroupQueryAttention: export with --flavour ort")
        self.shared_kv = self._gqa and self.kv_buffer != "concat"
        self._past_names, self._present_names = past_names(meta.num_layers), present_names(meta.num_layers)
        return meta

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def _reset_impl(self, batch: int) -> None:
        m = self.meta
        if self.shared_kv:
            # GroupQueryAttention writes the new keys into the past buffer in place when the
            # present output is bound to the same memory; capacity doubles when it runs out.
            self._buffers = [np.zeros((batch, m.kv_heads, self.initial_capacity, m.head_dim), m.kv_dtype)
                             for _ in self._past_names]
        else:
            self._buffers = [np.zeros((batch, m.kv_heads, 0, m.head_dim), m.kv_dtype) for _ in self._past_names]
        self._past = [self._ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self._bind_shared()

    def _bind_shared(self) -> None:
        """One IO binding per cache buffer: past and present bound to the same memory, once, so a
        decode step binds only its three small inputs (fewer Python calls per token)."""
        self._io, self._logits = None, None
        self._bound_keep = None
        if self.shared_kv:
            self._io = self.session.io_binding()
            self._io.bind_output("logits")  # first: outputs come back in binding order; rebinding keeps the slot
            for past, present, value in zip(self._past_names, self._present_names, self._past, strict=True):
                self._io.bind_ortvalue_input(past, value)
                self._io.bind_ortvalue_output(present, value)  # the same memory: updated in place

    def _grow(self, needed: int) -> None:
        capacity = self._buffers[0].shape[2]
        while capacity < needed:
            capacity *= 2
        if self.meta.context:
            capacity = min(capacity, self.meta.context)
        used = self.past_length
        grown = []
        for old in self._buffers:
            new = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], old.dtype)
            new[:, :, :used] = old[:, :, :used]
            grown.append(new)
        self._buffers = grown
        self._past = [self._ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self._bind_shared()

    def _forward_impl(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        if self._gqa and input_ids.shape[0] > 1 and input_ids.shape[1] > 1 and self.past_length > 0:
            raise UsageError(
                "ONNX Runtime's GroupQueryAttention (the ort flavour) cannot take several new tokens on a non-empty "
                f"cache for batch > 1 (got batch {input_ids.shape[0]}, {input_ids.shape[1]} tokens after "
                f"{self.past_length}); prefill each batch in one call, or use the portable flavour")
        if self.shared_kv and self.past_length + input_ids.shape[1] > self._buffers[0].shape[2]:
            self._grow(self.past_length + input_ids.shape[1])
        if self.shared_kv:
            io = self._io  # the cache stays bound between steps: only the new inputs are bound
        else:
            io = self.session.io_binding()
            io.bind_output("logits")  # outputs come back in binding order: logits first
            for name, value in zip(self._past_names, self._past, strict=True):
                io.bind_ortvalue_input(name, value)
            for name in self._present_names:
                io.bind_output(name)
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        io.bind_cpu_input("position_ids", position_ids)
        if self._has_keep and logits_to_keep != self._bound_keep:
            # the shared binding keeps it between steps: rebound only when it changes
            # bound as an OrtValue: IO binding's bind_cpu_input cannot find an input that has an
            # initializer (its default), bind_ortvalue_input can
            self._keep = self._ort.OrtValue.ortvalue_from_numpy(np.array(logits_to_keep, np.int64))
            io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep)
            self._bound_keep = logits_to_keep if self.shared_kv else 0
        decode = self.shared_kv and input_ids.shape[1] == 1 and self._float_logits
        if decode:
            # a decode step writes its logits into a buffer of ours: no output wrappers to build
            shape = (input_ids.shape[0], 1, self.meta.vocab_size)
            if self._logits is None or self._logits.shape != shape:
                self._logits = np.empty(shape, np.float32)
                self._logits_value = self._ort.OrtValue.ortvalue_from_numpy(self._logits)
            io.bind_ortvalue_output("logits", self._logits_value)
        else:
            io.bind_output("logits")
        start = time.perf_counter()
        self.session.run_with_iobinding(io)
        self.run_seconds += time.perf_counter() - start
        if decode:
            return self._logits.copy()  # the buffer is rewritten by the next step
        outputs = io.get_outputs()
        if not self.shared_kv:
            self._past = list(outputs[1:])
        return outputs[0].numpy().astype(np.float32, copy=False)

    def end_profiling(self) -> str:
        """Stop ORT's profiler; returns the path of its JSON trace (only with profile=True)."""
        if not self.profile or self.session is None:
            raise UsageError("profiling was not enabled: create the runner with profile=True")
        return self.session.end_profiling()

    def _deactivate_impl(self) -> None:
        self.session, self._past, self._buffers, self._io, self._logits = None, None, None, None, None
