"""ONNX Runtime runner: both flavours, CPU by default, CUDA / TensorRT EPs when present.

The KV cache stays in ORT-owned OrtValues: each step binds the previous step's ``present``
outputs as its ``past`` inputs through IO binding, so no step copies the cache through numpy.
(The concat-grow graph itself still writes past + new into each present once per step.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from starlift.errors import UsageError

from .base import ModelMeta, Runner
from .onnx_metadata import meta_from_io

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path, providers: list[str] | None = None, threads: int | None = None,
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None):
        super().__init__()
        self.model_path = Path(model_path)
        self.requested_providers = providers
        self.threads = threads
        if graph_optimization not in OPT_LEVELS:
            raise UsageError(f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, got {graph_optimization!r}")
        self.graph_optimization = graph_optimization
        self.session_config = session_config or {}
        self.session = None

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
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=self._providers(ort))
        self._ort = ort

    def _read_metadata_impl(self) -> ModelMeta:
        inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        meta = meta_from_io(inputs, outputs, kv_type, self.model_path)
        import onnx

        graph = onnx.load(str(self.model_path), load_external_data=False).graph  # the graph only: small
        self._gqa = any(n.op_type == "GroupQueryAttention" for n in graph.node)
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(meta.num_layers) for kv in ("key", "value")]
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        return meta

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def _reset_impl(self, batch: int) -> None:
        m = self.meta
        empty = np.zeros((batch, m.kv_heads, 0, m.head_dim), dtype=m.kv_dtype)
        self._past = [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]

    def _forward_impl(self, input_ids, attention_mask, position_ids):
        if self._gqa and input_ids.shape[0] > 1 and input_ids.shape[1] > 1 and self.past_length > 0:
            raise UsageError(
                "ONNX Runtime's GroupQueryAttention (the ort flavour) cannot take several new tokens on a non-empty "
                f"cache for batch > 1 (got batch {input_ids.shape[0]}, {input_ids.shape[1]} tokens after "
                f"{self.past_length}); prefill each batch in one call, or use the portable flavour")
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        io.bind_cpu_input("position_ids", position_ids)
        for name, value in zip(self._past_names, self._past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits")
        for name in self._present_names:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self._past = list(outputs[1:])
        return outputs[0].numpy().astype(np.float32, copy=False)

    def _deactivate_impl(self) -> None:
        self.session, self._past = None, None
