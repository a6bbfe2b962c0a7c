"""TensorRT runner: the portable flavour built into a strongly typed engine, cached on disk.

UNVERIFIED: the engine/CUDA half of this file was written from the TensorRT 10/11 and cuda-python
documentation on a machine without TensorRT or an NVIDIA GPU, and has never run. The pure helpers
(graph checks, profile shapes, cache key) are tested everywhere.

Device memory and streams come from cuda-python's runtime bindings (``cudart``), not torch: they
are what TensorRT's own samples use, they are a small wheel, and they do not tie the runner to a
CUDA build of torch (starlift installs the CPU build).

KV cache: the exported graph is concat-grow (``present = concat(past, new)``), and TensorRT writes
``present`` into a buffer of its own, so the runner's past handles (``_DeviceKV``) hold, per
layer key/value, two device buffers sized for ``max_context``, used in turn: a call reads
``past`` from set A and writes ``present`` to set B, the next call the reverse. The engine's
``ConcatBatch`` drives them like any backend's handles (a sequence prefilled alone, joined into
the decode batch with left padding): only those joins and retirements copy to and from the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from starlift.core.artifact import past_names, present_names
from starlift.core.errors import StarliftError, UsageError
from starlift.core.fsutil import sha256_file

from .base import ModelMeta, Runner
from .onnx_metadata import artifact_context, meta_from_io

DEFAULT_CACHE_DIR = Path("~/.cache/starlift/tensorrt")
PREFILL, DECODE = 0, 1  # optimization profile indices, in the order profile_shapes returns them
CONTROL_FLOW = {"If", "Loop", "Scan"}
MISSING_TRT = ("the tensorrt backend needs TensorRT and an NVIDIA GPU; pip install tensorrt on a CUDA machine "
               "(or use --backend onnxruntime here)")
_ONNX_KV_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 16: "tensor(bfloat16)"}


# ---- pure helpers (no TensorRT needed) ----------------------------------------------------------
def _load_structure(path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file; pass the model.onnx of an artifact `starlift export` wrote")
    return onnx.load(str(path), load_external_data=False)


def check_portable_onnx(path) -> None:
    """Refuse graphs TensorRT cannot parse: contrib ops (the "ort" flavour) and control flow."""
    graph = _load_structure(path).graph
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise StarliftError(f"TensorRT cannot run {', '.join(foreign)} in {path} (ONNX Runtime contrib ops of the "
                            "'ort' flavour); export with --flavour portable")
    loops = sorted({n.op_type for n in graph.node if n.op_type in CONTROL_FLOW})
    if loops:
        raise StarliftError(f"{path} has control flow ({', '.join(loops)}), which the TensorRT runner does not "
                            "build; starlift's portable flavour has none: export with --flavour portable")


def decoder_io(path) -> ModelMeta:
    """Layers, KV heads, head dim, vocabulary and KV dtype from the ONNX inputs and outputs."""
    graph = _load_structure(path).graph

    def shapes(values):
        return {v.name: tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in v.type.tensor_type.shape.dim) for v in values}

    kv = next((v for v in graph.input if v.name.startswith("past_key_values.")), None)
    kv_type = _ONNX_KV_TYPES.get(kv.type.tensor_type.elem_type, "unknown") if kv is not None else "unknown"
    return meta_from_io(shapes(graph.input), shapes(graph.output), kv_type, Path(path))


def profile_shapes(num_layers: int, kv_heads: int, head_dim: int, max_batch: int, max_context: int,
                   max_prefill: int) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """(min, opt, max) per input for two profiles: [PREFILL, DECODE].

    Both accept batch 1..max_batch (opt 1) and past 0..max_context-1. Prefill takes 1..max_prefill
    new tokens (opt max_prefill, past 0); its past range is not pinned to 0 so that a long prompt
    can be fed in chunks. Decode takes exactly one token (opt past max_context // 2), so TensorRT
    tunes its kernels for the step that dominates generation. The mask's total length is
    past + seq: 1..max_context in both. TensorRT checks each dimension separately; the runner
    refuses past + seq > max_context before TensorRT sees it.
    """
    if min(num_layers, kv_heads, head_dim, max_batch, max_context, max_prefill) < 1:
        raise UsageError("profile sizes must all be at least 1")
    if max_prefill > max_context:
        raise UsageError(f"max_prefill ({max_prefill}) cannot exceed max_context ({max_context})")
    mid = min(max_context // 2, max_context - 1)
    batch = (1, 1, max_batch)
    # (seq, past, total), each as (min, opt, max)
    plans = [((1, max_prefill, max_prefill), (0, 0, max_context - 1), (1, max_prefill, max_context)),
             ((1, 1, 1), (0, mid, max_context - 1), (1, mid + 1, max_context))]
    profiles = []
    for seq, past, total in plans:
        shapes = {"input_ids": tuple(zip(batch, seq, strict=True)),
                  "attention_mask": tuple(zip(batch, total, strict=True)),
                  "position_ids": tuple(zip(batch, seq, strict=True))}
        kv = tuple((b, kv_heads, p, head_dim) for b, p in zip(batch, past, strict=True))
        for i in range(num_layers):
            shapes[f"past_key_values.{i}.key"] = kv
            shapes[f"past_key_values.{i}.value"] = kv
        profiles.append(shapes)
    return profiles


def choose_profile(tokens: int, past: int) -> int:
    """DECODE for one token on a non-empty cache, PREFILL otherwise (the prompt, or a chunk of it)."""
    return DECODE if tokens == 1 and past > 0 else PREFILL


def onnx_sha256(path) -> str:
    """sha256 of model.onnx and every external data file it names (the weights live there)."""
    path = Path(path)
    model = _load_structure(path)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    locations = sorted({e.value for t in tensors for e in t.external_data if e.key == "location"})
    h = hashlib.sha256(sha256_file(path).encode())
    for name in locations:
        h.update(f"\0{name}\0{sha256_file(path.parent / name)}".encode())
    return h.hexdigest()


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, profiles: list[dict]) -> str:
    """An engine is only valid for one graph + weights, one TensorRT version, one GPU model, one set of profiles."""
    profiles = [{name: [list(s) for s in mom] for name, mom in sorted(p.items())} for p in profiles]
    blob = json.dumps({"format": "starlift-tensorrt/1", "onnx": onnx_sha256, "tensorrt": trt_version,
                       "gpu": gpu_name, "profiles": profiles}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{key}.engine"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the runner (needs TensorRT, cuda-python and a GPU; UNVERIFIED) -----------------------------
def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise StarliftError("the tensorrt backend needs cuda-python for device memory: pip install cuda-python") from e
    return cudart


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, model_path, cache_dir=None, max_batch: int = 8, max_context: int | None = None,
                 max_prefill: int | None = None, device: int = 0):
        super().__init__()
        self.model_path = Path(model_path)
        self.cache_dir, self.device, self.max_batch = cache_dir, device, max_batch
        self.max_context = max_context or artifact_context(self.model_path)
        if self.max_context is None:
            raise UsageError(f"{self.model_path.parent} has no config.json with max_position_embeddings; "
                             "pass max_context=N")
        self.max_prefill = max_prefill or min(self.max_context, 512)
        if max_batch < 1 or self.max_prefill > self.max_context:
            raise UsageError(f"need max_batch >= 1 and max_prefill <= max_context, got {max_batch}, "
                             f"{self.max_prefill}, {self.max_context}")
        self.engine_path: Path | None = None
        self._buffers: set[int] = set()
        self._io: dict[str, int] = {}

    def _cuda(self, result):
        """cuda-python calls return (error, *values): raise on error, return the values."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise StarliftError(f"CUDA error {err} on device {self.device}")
        return values[0] if len(values) == 1 else values

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise StarliftError(MISSING_TRT) from e
        self._trt, self._cudart = trt, _import_cudart()
        err, count = self._cudart.cudaGetDeviceCount()
        if err != self._cudart.cudaError_t.cudaSuccess or count == 0:
            raise StarliftError(f"no CUDA device is visible ({err}): {MISSING_TRT}")
        if not 0 <= self.device < count:
            raise UsageError(f"device {self.device} does not exist; this machine has {count} CUDA device(s)")
        self._cuda(self._cudart.cudaSetDevice(self.device))
        gpu = self._cuda(self._cudart.cudaGetDeviceProperties(self.device)).name
        gpu = (gpu.decode(errors="replace") if isinstance(gpu, bytes) else str(gpu)).rstrip("\0")

        check_portable_onnx(self.model_path)
        self._meta = decoder_io(self.model_path)
        m = self._meta
        profiles = profile_shapes(m.num_layers, m.kv_heads, m.head_dim, self.max_batch, self.max_context,
                                  self.max_prefill)
        key = engine_cache_key(onnx_sha256(self.model_path), trt.__version__, gpu, profiles)
        self.engine_path = engine_cache_path(self.cache_dir, key)
        logger = trt.Logger(trt.Logger.WARNING)
        if self.engine_path.is_file():
            plan = self.engine_path.read_bytes()
        else:
            plan = self._build(logger, profiles)
            _write_atomic(self.engine_path, plan)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise StarliftError(f"TensorRT {trt.__version__} cannot load {self.engine_path}; delete it to rebuild")
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda(self._cudart.cudaStreamCreate())
        self._profile = None
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._np = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}

    def _build(self, logger, profiles) -> bytes:
        trt = self._trt
        builder = trt.Builder(logger)
        # Strongly typed: the ONNX dtypes are kept as exported (no silent fp16). TensorRT 11 always
        # builds strongly typed and keeps the flag only for compatibility.
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network = builder.create_network(0 if flag is None else 1 << int(flag))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.model_path)):  # reads model.onnx.data next to it
            errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
            raise StarliftError(f"TensorRT's ONNX parser rejected {self.model_path}: {errors}")
        config = builder.create_builder_config()
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise StarliftError(f"TensorRT failed to build an engine for {self.model_path}; see its log above")
        return bytes(plan)

    def _read_metadata_impl(self) -> ModelMeta:
        m = self._meta
        self._past_names, self._present_names = past_names(m.num_layers), present_names(m.num_layers)
        return dataclasses.replace(m, context=self.max_context)  # Runner.forward enforces the engine's context

    def _malloc(self, nbytes: int) -> int:
        ptr = int(self._cuda(self._cudart.cudaMalloc(max(1, nbytes))))
        self._buffers.add(ptr)
        return ptr

    def _free(self, ptr: int) -> None:
        if ptr in self._buffers:
            self._buffers.discard(ptr)
            self._cudart.cudaFree(ptr)

    def _free_buffers(self) -> None:
        for ptr in list(self._buffers):
            self._cudart.cudaFree(ptr)
        self._buffers = set()

    def _io_buffers(self) -> dict[str, int]:
        """Device buffers for the small inputs and the logits, sized for the largest call."""
        if not self._io:
            m, ctx, pre, b = self.meta, self.max_context, self.max_prefill, self.max_batch
            self._io = {"input_ids": self._malloc(b * pre * 8), "position_ids": self._malloc(b * pre * 8),
                        "attention_mask": self._malloc(b * ctx * 8),
                        "logits": self._malloc(b * pre * m.vocab_size * self._np["logits"].itemsize)}
        return self._io

    # ---- KV handles ------------------------------------------------------------------------
    def create_cache(self, max_batch: int):
        if max_batch > self.max_batch:
            raise UsageError(f"a cache of {max_batch} sequences exceeds the engine's max_batch of {self.max_batch}; "
                             f"create the runner with max_batch={max_batch}")
        return super().create_cache(max_batch)

    def empty_past(self, batch: int) -> _DeviceKV:
        if batch > self.max_batch:
            raise UsageError(f"batch {batch} exceeds the engine's max_batch of {self.max_batch}; "
                             f"create the runner with max_batch={batch}")
        return _DeviceKV(self, batch)

    def past_to_numpy(self, past: _DeviceKV) -> list[np.ndarray]:
        cudart, m = self._cudart, self.meta
        dtype = self._np[self._past_names[0]]
        out = []
        for name_index in range(len(self._past_names)):
            # the cache's [B, G, length, D] tensor fills the front of its [B, G, max_context, D] buffer
            host = np.empty((past.batch, m.kv_heads, past.length, m.head_dim), dtype)
            self._cuda(cudart.cudaMemcpy(host.ctypes.data, past.current[name_index], host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            out.append(host)
        return out

    def past_from_numpy(self, arrays: list[np.ndarray]) -> _DeviceKV:
        cudart = self._cudart
        kv = _DeviceKV(self, arrays[0].shape[0], arrays[0].shape[2])
        dtype = self._np[self._past_names[0]]
        for ptr, array in zip(kv.current, arrays, strict=True):
            host = np.ascontiguousarray(array, dtype=dtype)
            self._cuda(cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return kv

    def _run_impl(self, input_ids, attention_mask, position_ids, past: _DeviceKV, logits_to_keep=0):
        # TensorRT's ONNX parser reads an input that has an initializer (logits_to_keep) as a
        # constant weight: the engine computes every position and Runner.run cuts them.
        b, t = input_ids.shape
        if t > self.max_prefill:
            raise UsageError(f"{t} tokens in one call exceed max_prefill={self.max_prefill}; feed the prompt in "
                             f"chunks or create the runner with a larger max_prefill")
        if b != past.batch or attention_mask.shape[1] != past.length + t:
            raise UsageError(f"the past holds batch {past.batch} x {past.length} tokens; got batch {b} and a mask of "
                             f"{attention_mask.shape[1]} for {t} new tokens")
        cudart, context, stream, io = self._cudart, self._context, self._stream, self._io_buffers()
        profile = choose_profile(t, past.length)
        if profile != self._profile:
            if not context.set_optimization_profile_async(profile, int(stream)):
                raise StarliftError(f"TensorRT refused optimization profile {profile}")
            self._profile = profile
        hosts = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        hosts = {name: np.ascontiguousarray(a, dtype=self._np[name]) for name, a in hosts.items()}  # alive to sync
        for name, array in hosts.items():
            self._cuda(cudart.cudaMemcpyAsync(io[name], array.ctypes.data, array.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            self._bind(name, array.shape, io[name])
        m = self.meta
        for past_name, present_name, src_ptr, dst_ptr in zip(self._past_names, self._present_names, past.current,
                                                              past.other, strict=True):
            self._bind(past_name, (b, m.kv_heads, past.length, m.head_dim), src_ptr)
            context.set_tensor_address(present_name, dst_ptr)
        context.set_tensor_address("logits", io["logits"])
        if not context.execute_async_v3(int(stream)):
            raise StarliftError("TensorRT execute_async_v3 failed; see its log above")
        logits = np.empty((b, t, m.vocab_size), dtype=self._np["logits"])
        self._cuda(cudart.cudaMemcpyAsync(logits.ctypes.data, io["logits"], logits.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        self._cuda(cudart.cudaStreamSynchronize(stream))
        past.flip(t)  # this call's present is the next call's past: the same handle, consumed
        return logits.astype(np.float32, copy=False), past

    def _bind(self, name: str, shape: tuple, ptr: int) -> None:
        if not self._context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise StarliftError(f"TensorRT refused shape {tuple(shape)} for {name} (outside the engine's profiles)")
        self._context.set_tensor_address(name, ptr)

    def _deactivate_impl(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamSynchronize(self._stream)
            self._free_buffers()
            self._cudart.cudaStreamDestroy(self._stream)
        self._io = {}
        self._context = self._engine = self._runtime = self._stream = None


class _DeviceKV:
    """The KV handles of one concat cache on the GPU: per past input, two device buffers sized
    for ``max_context``, used in turn (a call reads ``current`` as past and writes ``other`` as
    present, then they swap). A [B, G, P, D] contiguous tensor fits the first B*G*P*D elements
    of a [B, G, max_context, D] allocation for every P, so no call copies or reallocates."""

    def __init__(self, runner: TensorRTRunner, batch: int, length: int = 0):
        m = runner.meta
        nbytes = batch * m.kv_heads * runner.max_context * m.head_dim * runner._np[runner._past_names[0]].itemsize
        self.runner, self.batch, self.length = runner, batch, length
        self.sets = [[runner._malloc(nbytes) for _ in runner._past_names] for _ in range(2)]
        self._in = 0

    @property
    def current(self) -> list[int]:
        return self.sets[self._in]

    @property
    def other(self) -> list[int]:
        return self.sets[1 - self._in]

    def flip(self, new_tokens: int) -> None:
        self._in, self.length = 1 - self._in, self.length + new_tokens

    def __del__(self):  # a handle the cache dropped frees its device memory
        runner = self.runner
        if runner is not None and runner.is_active:
            for ptr in (p for pair in self.sets for p in pair):
                runner._free(ptr)
        self.runner = None
