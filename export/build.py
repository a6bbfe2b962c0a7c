"""The torch side of an export: load, reference logits, trace, optimize, save.

``export_checkpoint`` (exporter.py) runs it in its own process for small models, and for big
ones in a child process (``python -m starlift.export.build REQUEST.json``) that exits before the
written artifact is validated: what the build holds (torch, its tracer, the graph objects, the
allocator's free lists) goes back to the system instead of sitting under ONNX Runtime's session.
The child hands back small things only: the reference logits (a few MB, ``reference.npz``), the
fusion counts and the tensor map (``result.json``); its stages go to the parent on a pipe, one
name per line, so the parent's progress bar and memory sampling follow it.

The weights are never held whole: the model's parameters are views into a memory map of the
checkpoint; the reference forward drops the pages it read after every layer; the traced graph's
initializers are re-pointed at the checkpoint's safetensors bytes (``ir.ExternalTensor``), so the
save copies them file to file (onnx_ir uses ``copy_file_range``: no user-space copy), and only the
transposed MatMul weights are computed, one read from the file at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import memory
from starlift.core.artifact import MODEL_FILE

# The save (onnx_ir) materializes at most this many bytes of tensors at once (its default is 1 GiB,
# more than a small model's weights; with the weights streamed from the checkpoint file only the
# transposed ones are materialized), and the checkpoint pages it has read are dropped every
# RELEASE_EVERY_BYTES (_PageRelease: a checkpoint converted to another dtype is saved from memory).
SAVE_IN_FLIGHT_BYTES = 32 << 20
RELEASE_EVERY_BYTES = 32 << 20
REFERENCE_FILE, RESULT_FILE = "reference.npz", "result.json"


@dataclass
class BuildRequest:
    """What the build needs (JSON-able: the child reads it from a file)."""

    folder: str
    out: str  # the temporary artifact folder: MODEL_FILE and its data are written here
    flavour: str
    dtype: str
    opset: int
    validate_layers: int
    validate_steps: int
    allow_pickle: bool


def build(req: BuildRequest, stage: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """Write ``req.out/model.onnx`` (+ data); returns ``reference`` (the torch logits the
    validation compares with), ``fusions``, ``tensor_map`` and ``file_weight_bytes`` (the weights
    the save read from the checkpoint file, not from the model in memory)."""
    from starlift.model import Starcoder2Config, load_checkpoint
    from starlift.model.checkpoint import release_mapped_pages

    from . import heads, validate

    folder = Path(req.folder)
    config = Starcoder2Config.from_hf(folder)
    stage("load")
    model = load_checkpoint(folder, dtype=req.dtype, allow_pickle=req.allow_pickle)
    stage("reference")
    if config.head is not None:  # a classifier: one pass over a padded batch, no cache
        with _dropping_pages_per_layer(model):
            reference = heads.reference_outputs(model, heads.make_case(config.vocab_size, config.pad_token_id))
    else:
        case = validate.make_case(config.vocab_size, steps=req.validate_steps)
        if req.validate_layers:  # the reference of the cut graph: a torch model of the same layers
            cut = load_checkpoint(folder, dtype=req.dtype, allow_pickle=req.allow_pickle,
                                  num_layers=req.validate_layers)
            with _dropping_pages_per_layer(cut):
                reference = validate.reference_logits(cut, case)
            del cut
        else:
            with _dropping_pages_per_layer(model):
                reference = validate.reference_logits(model, case)
    # the forward read weights into the process; the save reads them again from the file
    release_mapped_pages()
    stage("trace")
    # the tracer's and the graph passes' imports (torch.export, onnxscript: ~0.1 GiB) come after
    # the reference forward, so the two do not add up
    import onnx_ir as ir

    from starlift.core import tensor_map

    from . import flavours
    from .trace import trace

    weights = checkpoint_tensors(folder, req.dtype)
    graph = trace(model, opset=req.opset, weights=weights)
    from_file = int(graph.meta.get("starlift.file_weight_bytes", 0))
    del model
    gc.collect()
    release_mapped_pages()
    stage("optimize")
    graph = flavours.optimize_portable(graph)
    flavours.check_portable(graph)
    fusions: dict[str, int] = {}
    if req.flavour == "ort":
        graph, fusions = flavours.to_ort(graph, config)
    if config.head is not None:
        heads.drop_cache(graph, config.num_hidden_layers)
    from starlift import __version__

    graph.producer_name, graph.producer_version = "starlift", __version__
    # where the reference's residual stream lives in this graph, after every pass
    tmap = tensor_map.resolve_ir(graph, config.num_hidden_layers)
    stage("save")
    ir.save(graph, Path(req.out) / MODEL_FILE, external_data=MODEL_FILE + ".data", callback=_PageRelease(),
            **_save_in_flight_cap(ir.save))
    # onnxscript's module-level rewrite rules keep a reference to the last graph they matched;
    # dropping the tensors from the graph frees the weights all the same.
    for value in graph.graph.initializers.values():
        value.const_value = None
    graph.graph.initializers.clear()
    del graph, weights
    gc.collect()
    release_mapped_pages()  # whatever still references the weights, their pages go
    return {"reference": reference, "fusions": fusions, "tensor_map": tmap, "file_weight_bytes": from_file}


def checkpoint_tensors(folder: Path, dtype: str) -> dict[str, Any]:
    """The checkpoint's tensors stored in ``dtype``, as ``ir.ExternalTensor``s on their safetensors
    files (name -> tensor; nothing is read): the traced graph's initializers take them in place of
    the model's parameters, so that the save copies the bytes from file to file. Tensors stored
    in another dtype (converted in memory at load) are not listed."""
    import onnx_ir as ir

    from starlift.model.folders import read_safetensors_header, weight_files

    code = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[dtype]
    kind = {"F32": ir.DataType.FLOAT, "F16": ir.DataType.FLOAT16, "BF16": ir.DataType.BFLOAT16}[code]
    out: dict[str, Any] = {}
    for file in weight_files(folder, allow_pickle=True):
        if file.suffix != ".safetensors":
            continue
        real = file.resolve()  # a Hugging Face cache links its snapshot files to blobs elsewhere
        header, data_start = read_safetensors_header(real)
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] != code:
                continue
            begin, end = info["data_offsets"]
            out[name] = ir.ExternalTensor(real.name, data_start + begin, end - begin, kind,
                                          shape=ir.Shape(info["shape"]), name=name, base_dir=str(real.parent))
    return out


def read_external(tensor) -> np.ndarray:
    """An ``ir.ExternalTensor``'s values by a plain read of its bytes: its own ``numpy()`` maps the
    whole file and keeps the map (and every page it touched) until ``release()``."""
    shape = tuple(tensor.shape.numpy())
    with open(tensor.path, "rb") as f:
        f.seek(tensor.offset or 0)
        data = np.fromfile(f, dtype=tensor.dtype.numpy(), count=math.prod(shape))
    return data.reshape(shape)


@contextlib.contextmanager
def _dropping_pages_per_layer(model) -> Iterator[None]:
    """During a forward of ``model``, drop the checkpoint maps' resident pages after every decoder
    layer: the forward reads each weight once per pass, so the process holds one layer (and the
    embedding, which the tied LM head reads whole) instead of the model. Dropped pages are read
    again from the page cache on the next pass."""
    from starlift.model.checkpoint import release_mapped_pages

    def drop(*_) -> None:  # a forward hook that returns something replaces the layer's output
        release_mapped_pages()

    hooks = [layer.register_forward_hook(drop) for layer in model.model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _save_in_flight_cap(save) -> dict:
    """``max_in_flight_bytes`` for ``ir.save`` where onnx-ir has it (1.x); the oldest onnx-ir that
    pyproject allows (0.1.16) has no cap and saves as before, with a higher peak."""
    import inspect

    if "max_in_flight_bytes" in inspect.signature(save).parameters:
        return {"max_in_flight_bytes": SAVE_IN_FLIGHT_BYTES}
    return {}


class _PageRelease:
    """``ir.save``'s per-tensor callback: every RELEASE_EVERY_BYTES of weights handed to the writer,
    drop the checkpoint maps' resident pages (``release_mapped_pages``). Without it every page the
    save reads from a memory-mapped parameter stays in the process until the save ends (measured:
    the 113M fp32 export's save stage at 0.93 GiB for 0.42 GiB of weights, before the weights were
    streamed from the file). A page dropped while a writer thread still reads it is read again."""

    def __init__(self) -> None:
        self.pending = 0

    def __call__(self, tensor, info) -> None:
        from starlift.model.checkpoint import release_mapped_pages

        self.pending += int(tensor.nbytes)
        if self.pending >= RELEASE_EVERY_BYTES:
            self.pending = 0
            release_mapped_pages()


# ---- the child process --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m starlift.export.build REQUEST.json --status-fd N``: run ``build``, write its
    result beside the request; stage names go to file descriptor N, one per line."""
    parser = argparse.ArgumentParser(prog="python -m starlift.export.build")
    parser.add_argument("request")
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args(argv)
    request_path = Path(args.request)
    work = request_path.parent
    status = os.fdopen(args.status_fd, "w", buffering=1)

    def stage(name: str) -> None:
        status.write(name + "\n")

    try:
        req = BuildRequest(**json.loads(request_path.read_text()))
        out = build(req, stage)
        reference = out.pop("reference")
        arrays = {"head": reference} if isinstance(reference, np.ndarray) else {f"step{i}": r for i, r in enumerate(reference)}
        np.savez(work / REFERENCE_FILE, **arrays)
        out["peak_rss_bytes"] = memory.peak_rss_bytes()
        (work / RESULT_FILE).write_text(json.dumps(out))
        return 0
    except BaseException as e:  # the parent re-raises it with its type and message
        if not isinstance(e, Exception) or type(e).__module__ != "starlift.core.errors":
            traceback.print_exc()
        (work / RESULT_FILE).write_text(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}}))
        return 1
    finally:
        status.close()


def read_result(work: Path) -> dict[str, Any]:
    """What ``main`` wrote in ``work``: the result dict with ``reference`` loaded, or the error raised
    again with its type (a ``starlift.core.errors`` class; anything else as a ``StarliftError``)."""
    from starlift.core import errors

    path = work / RESULT_FILE
    if not path.is_file():
        raise errors.StarliftError("the export's build process ended without a result (killed, or out of memory?); "
                                   "see the messages above, or run it with more memory")
    result = json.loads(path.read_text())
    if "error" in result:
        kind = getattr(errors, result["error"]["type"], None)
        if not (isinstance(kind, type) and issubclass(kind, errors.StarliftError)):
            raise errors.StarliftError(f"the export's build process failed: {result['error']['type']}: "
                                       f"{result['error']['message']} (traceback above)")
        raise kind(result["error"]["message"])
    with np.load(work / REFERENCE_FILE) as data:
        result["reference"] = data["head"] if "head" in data else [data[f"step{i}"] for i in range(len(data.files))]
    return result


def request_dict(req: BuildRequest) -> dict[str, Any]:
    return asdict(req)


if __name__ == "__main__":
    sys.exit(main())
