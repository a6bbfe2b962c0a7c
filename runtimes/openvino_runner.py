"""OpenVINO runner: the portable flavour on the CPU plugin, f32 by default, bf16 on request.

OpenVINO defaults to bf16 inference on CPUs with AMX/AVX512-BF16; parity needs f32, so the
precision hint is always set explicitly.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from starlift.core.artifact import LOGITS_TO_KEEP, past_names, present_names
from starlift.core.errors import StarliftError, UsageError
from starlift.core.extras import require

from .base import ModelMeta, Runner
from .onnx_metadata import artifact_context, kv_inputs_from_names

PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


def port_shape(port) -> tuple:
    """An OpenVINO port's shape, None for each dynamic dimension."""
    return tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())


def compile_model(core, model, device: str, precision: str, threads: int | None, source: Path):
    """Compile a model read by ``core`` for ``device`` with an explicit precision hint (never the
    CPU's bf16 default); a graph OpenVINO cannot compile gets an error naming the flavour it runs."""
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return core.compile_model(model, device, config)
    except RuntimeError as e:
        raise StarliftError(f"OpenVINO cannot compile {source} ({str(e).strip().splitlines()[0]}); it runs the "
                            "portable flavour: export with --flavour portable") from e


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, model_path, device: str = "CPU", precision: str = "f32", threads: int | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model_path, self.device, self.precision, self.threads = Path(model_path), device, PRECISIONS[precision], threads

    def _activate_impl(self) -> None:
        require("openvino", purpose="the openvino backend")
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.model_path))
        self._has_keep = _feedable_logits_to_keep(model)
        self.compiled = compile_model(core, model, self.device, self.precision, self.threads, self.model_path)
        self.model = model
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _read_metadata_impl(self) -> ModelMeta:
        # every name of every port: a port may carry several (bf16 graphs name logits "logits" and "linear_N")
        inputs = {n: port_shape(p) for p in self.model.inputs for n in p.get_names()}
        outputs = {n: port_shape(p) for p in self.model.outputs for n in p.get_names()}
        layers, kv_heads, head_dim = kv_inputs_from_names(inputs)
        kv_port = next(p for p in self.model.inputs if p.get_any_name().startswith("past_key_values."))
        kv_type = kv_port.get_element_type().get_type_name()
        self._kv_ov_type = kv_port.get_element_type()
        self._bf16 = kv_type == "bf16"
        np_dtype = {"f32": np.float32, "f16": np.float16}.get(kv_type)
        if np_dtype is None and kv_type != "bf16":
            raise StarliftError(f"{self.model_path}: KV cache type {kv_type} is not supported")
        self._past_names, self._present_names = past_names(layers), present_names(layers)
        return ModelMeta(layers, kv_heads, head_dim, outputs["logits"][-1], np.dtype(np_dtype or np.float32),
                         artifact_context(self.model_path))

    def empty_past(self, batch: int):
        import openvino as ov

        m = self.meta
        return [ov.Tensor(self._kv_ov_type, [batch, m.kv_heads, 0, m.head_dim]) for _ in self._past_names]

    def past_to_numpy(self, past) -> list[np.ndarray]:
        # bf16 has no numpy type: its bits travel as uint16 (zero bits are 0.0, the padding)
        return [t.data.view(np.uint16).copy() if self._bf16 else t.data.copy() for t in past]

    def past_from_numpy(self, arrays):
        import openvino as ov

        if not self._bf16:
            return [ov.Tensor(np.ascontiguousarray(a)) for a in arrays]
        out = []
        for a in arrays:
            t = ov.Tensor(ov.Type.bf16, list(a.shape))
            t.data.view(np.uint16)[...] = a
            out.append(t)
        return out

    def _run_impl(self, input_ids, attention_mask, position_ids, past, logits_to_keep=0):
        import openvino as ov

        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self._has_keep:
            feed[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        feed.update(zip(self._past_names, past, strict=True))
        with self._lock:  # one infer request: callers on other threads (a session beside the engine) take turns
            self.request.infer(feed)
            # Output buffers are reused by the next infer(): keep copies for the cache.
            present = [ov.Tensor(out.data.copy()) if not self._bf16 else _copy_bf16(out)
                       for out in (self.request.get_tensor(name) for name in self._present_names)]
            logits = np.array(self.request.get_tensor("logits").data, dtype=np.float32)
        return logits, present

    def _deactivate_impl(self) -> None:
        self.request = self.compiled = self.model = None


def _feedable_logits_to_keep(model) -> bool:
    """Make the graph's ``logits_to_keep`` input feedable again; False when the graph has none.

    OpenVINO's ONNX frontend reads a graph input that also has an initializer (the ONNX way to
    give an input a default) as a constant, so the input disappears from the model. The constant
    is swapped back for a parameter of the same name (OpenVINO's documented graph-editing API:
    ``Output.replace`` and ``Model.add_parameters``); it is then fed on every call."""
    import openvino as ov

    const = next((op for op in model.get_ops() if op.get_type_name() == "Constant"
                  and LOGITS_TO_KEEP in op.output(0).get_names()), None)
    if const is None:
        return any(LOGITS_TO_KEEP in p.get_names() for p in model.inputs)
    param = ov.opset13.parameter([], ov.Type.i64, name=LOGITS_TO_KEEP)
    param.output(0).set_names({LOGITS_TO_KEEP})
    const.output(0).replace(param.output(0))
    model.add_parameters([param])
    model.validate_nodes_and_infer_types()
    return True


def _copy_bf16(tensor):
    import openvino as ov

    copy = ov.Tensor(ov.Type.bf16, list(tensor.shape))
    tensor.copy_to(copy)
    return copy
