"""``export_checkpoint``: a Hugging Face StarCoder2 folder -> a validated, hashed artifact folder.

Stages: load (memory-mapped) -> reference logits -> trace -> optimize/flavour -> save (external
data, one tensor at a time) -> release the torch model -> validate in ONNX Runtime -> package
(configs, manifest) -> rename the temporary folder into place. Any failure removes everything.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import graphcut as cut
from starlift.core import memory, tensor_map, tolerance
from starlift.core.artifact import LOGITS_TO_KEEP, MODEL_FILE, genai_config, verify, write_manifest
from starlift.core.errors import ParityError, UsageError
from starlift.core.fsutil import atomic_output_dir, check_output_dir, sha256_file
from starlift.core.memory import CUT_LAYERS, FULL_VALIDATION_BYTES, StagePeaks
from starlift.core.signing import check_signing_key, sign_artifact
from starlift.model import Starcoder2Config, load_checkpoint, resolve_checkpoint
from starlift.model.checkpoint import release_mapped_pages, weight_files

from . import flavours, heads, validate
from .trace import trace

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
NUMPY_KV = {"fp32": np.float32, "fp16": np.float16}
# The save (onnx_ir) materializes at most this many bytes of tensors at once (its default is 1 GiB,
# more than a small model's weights), and the checkpoint pages it has read are dropped every
# RELEASE_EVERY_BYTES (_PageRelease).
SAVE_IN_FLIGHT_BYTES = 128 << 20
RELEASE_EVERY_BYTES = 128 << 20


def _save_in_flight_cap(save) -> dict:
    """``max_in_flight_bytes`` for ``ir.save`` where onnx-ir has it (1.x); the oldest onnx-ir that
    pyproject allows (0.1.16) has no cap and saves as before, with a higher peak."""
    import inspect

    if "max_in_flight_bytes" in inspect.signature(save).parameters:
        return {"max_in_flight_bytes": SAVE_IN_FLIGHT_BYTES}
    return {}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from starlift import __version__

    return {"starlift": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _progress(total: int, enabled: bool):
    from starlift.core.progress import progress_bar

    return progress_bar(total=total, desc="export", unit="stage", enabled=enabled)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, flavour: str = "portable", dtype: str = "fp32",
                      opset: int = 18, force: bool = False, progress: bool = True, validate_steps: int = 8,
                      allow_pickle: bool = False, sign_key: str | Path | None = None,
                      validate_layers: int | None = None, max_memory: int | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to the artifact folder ``out``; returns the manifest.

    ``validate_layers``: 0 validates the whole graph, N > 0 a cut of its first N layers plus the
    final norm and head (starlift/core/graphcut.py), None chooses (whole up to FULL_VALIDATION_BYTES of weights).
    ``max_memory``: bytes the export may use (default: the machine's available memory); an
    export whose estimated peak is larger is refused before it starts.

    ``sign_key``: a private key (``starlift keygen``) that signs the manifest before OUT appears."""
    import onnx_ir as ir

    if flavour not in flavours.FLAVOURS:
        raise UsageError(f"unknown flavour {flavour!r}; choose one of {', '.join(flavours.FLAVOURS)}")
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if not 17 <= opset <= 23:
        raise UsageError(f"opset {opset} is not supported; use 17..23 (LayerNormalization needs 17)")
    folder = resolve_checkpoint(checkpoint)
    config = Starcoder2Config.from_hf(folder)  # fail on a bad config before any heavy work
    check_output_dir(out, force)
    if sign_key is not None:
        check_signing_key(sign_key)  # a wrong key fails now, not after the export
    bytes_per = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    if validate_layers is None:
        big = config.num_parameters() * bytes_per > FULL_VALIDATION_BYTES
        validate_layers = CUT_LAYERS if big and config.num_hidden_layers > CUT_LAYERS else 0
    if config.head is not None:
        validate_layers = 0  # a classifier's validation is one pass of its own (export/heads.py), whole
    if validate_layers < 0 or validate_layers >= max(config.num_hidden_layers, 1) and validate_layers:
        raise UsageError(f"--validate-layers {validate_layers}: use 0 (the whole graph) or 1..{config.num_hidden_layers - 1}")
    estimate = memory.estimate_export(config.to_hf(), dtype, validate_layers=validate_layers,
                                      checkpoint_dtype=_stored_dtype(folder))
    memory.check_fits("export", estimate, max_memory,
                      fix="validate a cut graph (--validate-layers 1), free memory, or export on a larger machine")

    stages = ["load", "reference", "trace", "optimize", "save", "validate", "package"]
    bar = _progress(len(stages), progress)
    peaks = StagePeaks()

    def stage(name: str) -> None:
        bar.set_description(f"export: {name}")
        peaks.stage(name)

    try:
        with peaks, atomic_output_dir(out, force=force) as tmp:
            stage("load")
            model = load_checkpoint(folder, dtype=dtype, allow_pickle=allow_pickle)
            bar.update()
            stage("reference")
            if config.head is None:
                case = validate.make_case(config.vocab_size, steps=validate_steps)
                # a cut validation computes its reference on the cut model (validate stage): a forward
                # of the whole model would read every weight for a comparison that does not use it
                reference = validate.reference_logits(model, case) if not validate_layers else None
            else:  # a classifier: one pass over a padded batch, no cache
                case = heads.make_case(config.vocab_size, config.pad_token_id)
                reference = heads.reference_outputs(model, case)
            # the forward read every weight into the process; the save reads each again (from the
            # page cache) when it writes it, so none needs to stay resident in between
            release_mapped_pages()
            bar.update()
            stage("trace")
            graph = trace(model, opset=opset)
            bar.update()
            stage("optimize")
            graph = flavours.optimize_portable(graph)
            flavours.check_portable(graph)
            fusions: dict[str, int] = {}
            if flavour == "ort":
                graph, fusions = flavours.to_ort(graph, config)
            if config.head is not None:
                heads.drop_cache(graph, config.num_hidden_layers)
            graph.producer_name, graph.producer_version = "starlift", _versions()["starlift"]
            # where the reference's residual stream lives in this graph, after every pass
            tmap = tensor_map.resolve_ir(graph, config.num_hidden_layers)
            bar.update()
            stage("save")
            ir.save(graph, tmp / MODEL_FILE, external_data=MODEL_FILE + ".data", callback=_PageRelease(),
                    **_save_in_flight_cap(ir.save))
            # onnxscript's module-level rewrite rules keep a reference to the last graph they
            # matched; dropping the tensors from the graph frees the weights all the same.
            for value in graph.graph.initializers.values():
                value.const_value = None
            graph.graph.initializers.clear()
            del graph, model
            gc.collect()
            release_mapped_pages()  # whatever still references the weights, their pages go
            bar.update()
            stage("validate")
            if dtype == "bf16":
                # ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul & co: the artifact
                # is checked by the ONNX checker here and for parity by runtimes that run bf16.
                validation = {"skipped": "onnxruntime CPU has no bfloat16 kernels", "passed": None}
            elif config.head is not None:
                candidate = heads.onnx_outputs(str(tmp / MODEL_FILE), case)
                # the policy's bound for the head's outputs: as deep as the logits, at their scale
                bound = tolerance.logit_checks(dtype, tolerance.Shape.of(config), float(np.abs(reference).max()),
                                               against="same-dtype")["max_abs_error"].bound
                validation = heads.compare(reference, candidate, case, bound)
                validation.update({"backend": "onnxruntime", "reference": f"starlift torch model ({dtype})",
                                   "batch": int(case.ids.shape[0]), "tokens": int(case.ids.shape[1]),
                                   "padding": "full, left and right rows" if config.pad_token_id is not None
                                   else "full rows (no pad_token_id)"})
            else:
                graph_path, what = tmp / MODEL_FILE, {"graph": "whole"}
                if validate_layers:
                    graph_path = cut.write_cut(tmp / MODEL_FILE, validate_layers, tmp / "validate-cut.onnx")
                    cut_model = load_checkpoint(folder, dtype=dtype, allow_pickle=allow_pickle,
                                                num_layers=validate_layers)
                    reference = validate.reference_logits(cut_model, case)
                    del cut_model
                    what = {"graph": "cut", "layers": validate_layers, "of_layers": config.num_hidden_layers,
                            "how": f"the artifact's graph cut after {validate_layers} of {config.num_hidden_layers} "
                                   "layers (embedding, those layers, final norm, LM head), reading the artifact's "
                                   "own model.onnx.data, against the torch model of the same layers; the other "
                                   "layers are checked for a complete fusion, not run"}
                try:
                    candidate = validate.onnx_logits(str(graph_path), case, NUMPY_KV[dtype])
                finally:
                    if validate_layers:
                        graph_path.unlink(missing_ok=True)
                # the bound of the graph that ran: a cut is as deep as its own layers
                shape = tolerance.Shape.of(config)
                if validate_layers:
                    shape = dataclasses.replace(shape, num_layers=validate_layers)
                validation = validate.compare(reference, candidate, case.mask, case.prompt_len, dtype, shape)
                validation.update({"backend": "onnxruntime", "reference": f"starlift torch model ({dtype})",
                                   "batch": int(case.ids.shape[0]), "prompt_tokens": case.prompt_len,
                                   "decode_steps": case.steps, **what})
                if not validation["passed"]:
                    raise ParityError(
                        f"the exported graph's logits differ from the reference by {validation['max_abs_error']:.3g} "
                        f"(tolerance {validation['tolerance']:.3g} for {dtype}); the artifact was removed. "
                        "Report this with the checkpoint's config.json"
                    )
            bar.update()
            stage("package")
            _package(folder, tmp, config, flavour=flavour, dtype=dtype, opset=opset, fusions=fusions,
                     validation=validation, tensor_map=tmap,
                     memory_info={"estimate_bytes": estimate, "peak_rss_bytes": peaks.result()})
            manifest = verify(tmp, stamp=False)
            if sign_key is not None:
                sign_artifact(tmp, sign_key)
            bar.update()
    finally:
        bar.close()
    return manifest


class _PageRelease:
    """``ir.save``'s per-tensor callback: every RELEASE_EVERY_BYTES of weights handed to the writer,
    drop the checkpoint maps' resident pages (``release_mapped_pages``). Without it every page the
    save reads stays in the process until the save ends: the whole checkpoint on top of the
    interpreter (measured: the 113M fp32 export's save stage at 0.93 GiB for 0.42 GiB of weights).
    A page dropped while a writer thread still reads it is read again from the file."""

    def __init__(self) -> None:
        self.pending = 0

    def __call__(self, tensor, info) -> None:
        self.pending += int(tensor.nbytes)
        if self.pending >= RELEASE_EVERY_BYTES:
            self.pending = 0
            release_mapped_pages()


def _stored_dtype(folder: Path) -> str | None:
    """The dtype the checkpoint's weights are stored in (from the first safetensors header)."""
    from starlift.model.checkpoint import read_safetensors_header

    for file in weight_files(folder, allow_pickle=True):
        if file.suffix == ".safetensors":
            header, _ = read_safetensors_header(file)
            kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(kinds.pop()) if len(kinds) == 1 else None
    return None


def _package(checkpoint: Path, tmp: Path, config: Starcoder2Config, *, flavour: str, dtype: str, opset: int,
             fusions: dict[str, int], validation: dict[str, Any], tensor_map: dict[str, Any],
             memory_info: dict[str, Any] | None = None) -> None:
    shutil.copyfile(checkpoint / "config.json", tmp / "config.json")
    tokenizer = checkpoint / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    if config.head is not None:
        _package_head(checkpoint, tmp, config, flavour=flavour, dtype=dtype, opset=opset, fusions=fusions,
                      validation=validation)
        return
    gen_path = checkpoint / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    generation.setdefault("bos_token_id", config.bos_token_id)
    generation.setdefault("eos_token_id", config.eos_token_id)
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    eos = generation.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    # the ort flavour's GroupQueryAttention updates a shared past/present buffer in place, so
    # onnxruntime-genai may preallocate it (17% faster decode measured on the 113M int4 artifact,
    # same tokens); the portable graph concatenates and must not share
    genai = genai_config(config, flavour=flavour, share_buffer=flavour == "ort", eos_token_id=eos,
                         bos_token_id=generation.get("bos_token_id"), pad_token_id=config.pad_token_id)
    (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    onnx_bytes = sum(p.stat().st_size for p in tmp.glob(MODEL_FILE + "*"))
    bytes_per = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    write_manifest(tmp, {
        "task": "text-generation",
        "flavour": flavour,
        "dtype": dtype,
        "precision": dtype,
        "opset": opset,
        "kv_cache": {"layout": "concat", "shape": "[batch, kv_heads, past, head_dim]",
                     "description": "present = concat(past, new); feed present back as past",
                     # GroupQueryAttention also runs on a preallocated [batch, kv_heads, capacity,
                     # head_dim] buffer bound as both past and present: it writes new keys in place,
                     # and reads each row's length from the mask (rows of different lengths share it)
                     "shared_buffer": bool(fusions.get("group_query_attention")),
                     "per_row_lengths": bool(fusions.get("group_query_attention"))},
        "fusions": fusions,
        # optional inputs: a caller that does not feed them gets their default
        "optional_inputs": {LOGITS_TO_KEEP: {
            "dtype": "int64", "shape": [], "default": 0,
            "description": "logits for the last N positions only, [batch, min(N, seq), vocab]; 0 = every position"}},
        "size": {"onnx_bytes": onnx_bytes, "weight_bytes": config.num_parameters() * bytes_per,
                 "ratio": onnx_bytes / (config.num_parameters() * bytes_per)},
        "source": {"checkpoint": checkpoint.name,
                   "files": {p.name: sha256_file(p) for p in [checkpoint / "config.json",
                                                               *weight_files(checkpoint, allow_pickle=True)]}},
        "versions": _versions(),
        "validation": validation,
        "tensor_map": tensor_map,
        # what this export took on the machine that made it (sampled RSS per stage, bytes)
        "build_memory": memory_info or {},
    })


def _package_head(checkpoint: Path, tmp: Path, config: Starcoder2Config, *, flavour: str, dtype: str, opset: int,
                  fusions: dict[str, int], validation: dict[str, Any]) -> None:
    """A classifier's manifest: its task, labels and how it pools; no cache, no generation configs."""
    head = config.head
    onnx_bytes = sum(p.stat().st_size for p in tmp.glob(MODEL_FILE + "*"))
    bytes_per = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    sequence = head.task == "text-classification"
    write_manifest(tmp, {
        "task": head.task,
        "flavour": flavour,
        "dtype": dtype,
        "precision": dtype,
        "opset": opset,
        "head": {
            "architecture": head.architecture,
            "labels": list(head.labels),
            "problem_type": head.problem_type,
            "pad_token_id": config.pad_token_id,
            "inputs": list(heads.HEAD_INPUTS),
            "logits": "[batch, labels]" if sequence else "[batch, seq, labels]",
            "pooling": ("the last token that is not pad_token_id, as transformers pools" if config.pad_token_id
                        is not None else "the last token; batch > 1 is refused (no pad_token_id)")
            if sequence else None,
        },
        "kv_cache": None,
        "fusions": fusions,
        "size": {"onnx_bytes": onnx_bytes, "weight_bytes": config.num_parameters() * bytes_per,
                 "ratio": onnx_bytes / (config.num_parameters() * bytes_per)},
        "source": {"checkpoint": checkpoint.name,
                   "files": {p.name: sha256_file(p) for p in [checkpoint / "config.json",
                                                               *weight_files(checkpoint, allow_pickle=True)]}},
        "versions": _versions(),
        "validation": validation,
    })
