"""``export_checkpoint``: a Hugging Face StarCoder2 folder -> a validated, hashed artifact folder.

Stages: load (memory-mapped) -> reference logits -> trace -> optimize/flavour -> save (external
data, one tensor at a time) -> validate in ONNX Runtime -> package (configs, manifest) -> rename
the temporary folder into place. Any failure removes everything.

The first five are the build (export/build.py, torch); for models above ISOLATE_BYTES of
weights it runs in a child process that has exited before the validation starts, so the
validating process never holds torch, the tracer's objects and ONNX Runtime's copy of the
weights at the same time. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import graphcut as cut
from starlift.core import memory, tolerance
from starlift.core.artifact import LOGITS_TO_KEEP, MODEL_FILE, genai_config, verify, write_manifest
from starlift.core.errors import ParityError, UsageError
from starlift.core.fsutil import atomic_output_dir, check_output_dir, sha256_file
from starlift.core.memory import CUT_LAYERS, FULL_VALIDATION_BYTES, ISOLATE_BYTES, StagePeaks
from starlift.core.signing import check_signing_key, sign_artifact
from starlift.model import Starcoder2Config, resolve_checkpoint
from starlift.model.folders import read_safetensors_header, weight_files

from . import flavours, heads, validate
from .build import BuildRequest

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
NUMPY_KV = {"fp32": np.float32, "fp16": np.float16}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from starlift import __version__

    def of(name: str) -> str:  # the installed version, without importing torch into this process
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"starlift": __version__, "torch": of("torch"), "onnx": of("onnx"),
            "onnxruntime": of("onnxruntime"), "python": platform.python_version()}


def _progress(total: int, enabled: bool):
    from starlift.core.progress import progress_bar

    return progress_bar(total=total, desc="export", unit="stage", enabled=enabled)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, flavour: str = "portable", dtype: str = "fp32",
                      opset: int = 18, force: bool = False, progress: bool = True, validate_steps: int = 8,
                      allow_pickle: bool = False, sign_key: str | Path | None = None,
                      validate_layers: int | None = None, max_memory: int | None = None,
                      isolate: bool | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to the artifact folder ``out``; returns the manifest.

    ``validate_layers``: 0 validates the whole graph, N > 0 a cut of its first N layers plus the
    final norm and head (starlift/core/graphcut.py), None chooses (whole up to FULL_VALIDATION_BYTES of weights).
    ``max_memory``: bytes the export may use (default: the machine's available memory); an
    export whose estimated peak is larger is refused before it starts.
    ``isolate``: build (load, reference, trace, save) in a child process that exits before the
    validation; None: when the weights exceed ISOLATE_BYTES (below, the child's start-up, a few
    seconds of imports, costs more than the memory it saves).

    ``sign_key``: a private key (``starlift keygen``) that signs the manifest before OUT appears."""
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
    weight_bytes = config.num_parameters() * bytes_per
    if validate_layers is None:
        big = weight_bytes > FULL_VALIDATION_BYTES
        validate_layers = CUT_LAYERS if big and config.num_hidden_layers > CUT_LAYERS else 0
    if config.head is not None:
        validate_layers = 0  # a classifier's validation is one pass of its own (export/heads.py), whole
    if validate_layers < 0 or validate_layers >= max(config.num_hidden_layers, 1) and validate_layers:
        raise UsageError(f"--validate-layers {validate_layers}: use 0 (the whole graph) or 1..{config.num_hidden_layers - 1}")
    if isolate is None:
        isolate = weight_bytes > ISOLATE_BYTES
    estimate = memory.estimate_export(config.to_hf(), dtype, validate_layers=validate_layers,
                                      checkpoint_dtype=_stored_dtype(folder), isolated=isolate)
    memory.check_fits("export", estimate, max_memory,
                      fix="validate a cut graph (--validate-layers 1), free memory, or export on a larger machine")

    stages = ["load", "reference", "trace", "optimize", "save", "validate", "package"]
    bar = _progress(len(stages), progress)
    peaks = StagePeaks()

    def stage(name: str) -> None:
        if peaks.current is not None:
            bar.update()
        bar.set_description(f"export: {name}")
        peaks.stage(name)

    try:
        with peaks, atomic_output_dir(out, force=force) as tmp:
            request = BuildRequest(folder=str(folder), out=str(tmp), flavour=flavour, dtype=dtype, opset=opset,
                                   validate_layers=validate_layers, validate_steps=validate_steps,
                                   allow_pickle=allow_pickle)
            if isolate:
                built = _build_in_child(request, stage, peaks)
            else:
                from .build import build

                built = build(request, stage)
            reference, fusions, tmap = built["reference"], built["fusions"], built["tensor_map"]
            stage("validate")
            if dtype == "bf16":
                # ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul & co: the artifact
                # is checked by the ONNX checker here and for parity by runtimes that run bf16.
                validation = {"skipped": "onnxruntime CPU has no bfloat16 kernels", "passed": None}
            elif config.head is not None:
                case = heads.make_case(config.vocab_size, config.pad_token_id)
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
                case = validate.make_case(config.vocab_size, steps=validate_steps)
                graph_path, what = tmp / MODEL_FILE, {"graph": "whole"}
                if validate_layers:
                    graph_path = cut.write_cut(tmp / MODEL_FILE, validate_layers, tmp / "validate-cut.onnx")
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
            if isolate and validation.get("passed") is not None:
                validation["processes"] = ("the reference logits came from the build process (torch, the checkpoint's "
                                           "weights), which had exited before this graph ran in ONNX Runtime")
            stage("package")
            build_memory = {"estimate_bytes": estimate, "peak_rss_bytes": peaks.result(),
                            "isolated_build": isolate,
                            # weights the save read from the checkpoint's file (the rest: converted in memory)
                            "weights_from_file_bytes": built.get("file_weight_bytes")}
            if isolate:
                build_memory["build_process_peak_rss_bytes"] = built.get("peak_rss_bytes")
                build_memory["how"] = ("stage peaks are sampled RSS of this process plus the build process while it "
                                       "ran (a sum, not a maximum); process_peak is this process's high-water mark, "
                                       "build_process_peak_rss_bytes the build process's")
            _package(folder, tmp, config, flavour=flavour, dtype=dtype, opset=opset, fusions=fusions,
                     validation=validation, tensor_map=tmap, memory_info=build_memory)
            manifest = verify(tmp, stamp=False)
            if sign_key is not None:
                sign_artifact(tmp, sign_key)
            bar.update()
    finally:
        bar.close()
    return manifest


def _build_in_child(request: BuildRequest, stage, peaks: StagePeaks) -> dict[str, Any]:
    """``build.build`` in ``python -m starlift.export.build`` (see build.py); its stages drive
    ``stage``, its RSS is sampled with this process's while it runs. Returns its result."""
    from .build import read_result, request_dict

    work = Path(request.out) / ".build"
    work.mkdir()
    (work / "request.json").write_text(json.dumps(request_dict(request)))
    read_end, write_end = os.pipe()
    # Not glibc's huge pages (the console script turns them on for the runtimes, hugepages.py):
    # a build runs no decode loop, and 2 MiB pages round its allocations up.
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(
        t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb"))}
    try:
        # -c, not -m: `-m starlift.export.build` imports the package first, whose exporter imports
        # build, and runpy then warns that the module it is about to run is already loaded
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from starlift.export.build import main; sys.exit(main())",
                                 str(work / "request.json"), "--status-fd", str(write_end)],
                                pass_fds=(write_end,), env=env)
    finally:
        os.close(write_end)
    peaks.watch(proc.pid)
    try:
        with os.fdopen(read_end) as status:
            for line in status:
                stage(line.strip())
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted here: stop the child we started
            proc.kill()
            proc.wait()
        peaks.watch(None)
    try:
        return read_result(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stored_dtype(folder: Path) -> str | None:
    """The dtype the checkpoint's weights are stored in (from the first safetensors header)."""
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
