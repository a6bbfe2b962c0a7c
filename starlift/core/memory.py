"""Memory on the build machine: what is available, what a process holds, per-stage peaks.

Linux only for the numbers (``/proc``); elsewhere they are ``None`` and nothing is refused.
The peaks are sampled RSS (a thread reading ``/proc/self/statm``), not the kernel's
high-water mark reset per stage: resetting it (``clear_refs``) would also reset what
``/usr/bin/time -v`` reports for the whole run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# Auto validation of an export: the whole graph up to this many weight bytes, above it a cut of
# CUT_LAYERS layers (starlift/core/graphcut.py): ONNX Runtime's CPU provider holds fp32 copies of
# fp16 weights, and the torch reference reads every weight once more, so a whole-graph check costs
# a multiple of the model. Here (not in export/) so that `starlift info` estimates without torch.
FULL_VALIDATION_BYTES = 1 << 30
CUT_LAYERS = 2
# Above this many weight bytes the export builds (torch: load, reference, trace, save) in a child
# process that exits before ONNX Runtime validates the artifact (export/build.py): the
# validating process then holds no torch and no tracer, only the session's weights.
ISOLATE_BYTES = 64 << 20

GIB = 1024 ** 3
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    path = Path("/proc/meminfo")
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def available_bytes() -> int | None:
    """MemAvailable: what new work can take without swapping (page cache it may reclaim included)."""
    return meminfo().get("MemAvailable")


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident bytes of this process (or of ``pid``); None where /proc has no such process."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """The kernel's high-water mark of this process (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StagePeaks:
    """Peak RSS per named stage, sampled every ``interval`` seconds by a daemon thread::

        with StagePeaks() as peaks:
            peaks.stage("load"); ...
            peaks.stage("save"); ...
        peaks.result()  # {"load": bytes, "save": bytes, ..., "process_peak": VmHWM}

    ``watch(pid)``: while a child process does part of the work, each sample is this process's
    RSS plus the child's (both hold memory at once: the sum is what the machine needs).
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._current: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._child: int | None = None

    @property
    def current(self) -> str | None:
        return self._current

    def watch(self, pid: int | None) -> None:
        """Add ``pid``'s RSS to every sample from now on (None: stop)."""
        self._sample()
        self._child = pid

    def _sample(self) -> None:
        rss = rss_bytes()
        if rss is None:
            return
        child = self._child
        if child is not None:
            rss += rss_bytes(child) or 0
        with self._lock:
            if self._current is not None:
                self.peaks[self._current] = max(self.peaks.get(self._current, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stage(self, name: str) -> None:
        self._sample()  # the previous stage's last value
        with self._lock:
            self._current = name
        self._sample()

    def __enter__(self) -> StagePeaks:
        self._thread = threading.Thread(target=self._run, name="starlift-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, int]:
        out = dict(self.peaks)
        peak = peak_rss_bytes()
        if peak is not None:
            out["process_peak"] = peak
        return out


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


# ---- the estimator ------------------------------------------------------------------------------
# Peaks as sums of what each stage holds at once, from a config.json (a dict: core imports none of
# the model code). The constants come from measured runs on this project's shapes (see
# docs/performance/bigmodels.md); the estimate is meant to be a little above the measured peak.

BASE_BYTES = int(0.6 * GIB)  # interpreter + torch + onnxruntime + onnx/onnxscript + graph objects
BYTES_PER = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}


def model_sizes(config: dict) -> dict[str, int]:
    """Parameter counts: total, embedding, one decoder layer, the largest matrix."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    b = 1 if config.get("use_bias", True) else 0
    q_dim, kv_dim = heads * d, kv * d
    layer = h * q_dim + 2 * h * kv_dim + q_dim * h + b * (q_dim + 2 * kv_dim + h) + 2 * h * i + b * (i + h) + 4 * h
    embed = v * h
    head = 0 if config.get("tie_word_embeddings", True) else v * h
    layers = config["num_hidden_layers"]
    return {"params": embed + layers * layer + 2 * h + head, "embed": embed, "head": head or embed,
            "layer": layer, "layers": layers, "largest": max(h * i, embed)}


# The export's processes (export/build.py), from the 113M fp32 export's samples (docs/performance/
# bigmodels.md): the exporting process while the build runs (interpreter, numpy, starlift: 44 MiB
# measured); the build process at its reference forward (torch, the model on its memory map: 0.38
# GiB measured before the weights it reads) and from the trace on (torch.export's and onnxscript's
# imports and the graph objects: 0.51 GiB measured); the validating process around its ONNX
# Runtime session's weights (onnxruntime, numpy, the reference logits: 0.13 GiB measured).
EXPORT_PARENT_BYTES = 48 << 20
REFERENCE_BASE_BYTES = int(0.4 * GIB)
BUILD_BASE_BYTES = int(0.55 * GIB)
VALIDATE_BASE_BYTES = int(0.1 * GIB)
# what onnx_ir's save may hold at once (export.build.SAVE_IN_FLIGHT_BYTES) plus the pages read
# since the last release (RELEASE_EVERY_BYTES): weights converted in memory; weights stored in the
# export's dtype are copied from the checkpoint file by the kernel and hold none
SAVE_WINDOW_BYTES = 64 << 20


def estimate_export(config: dict, dtype: str, *, validate_layers: int, checkpoint_dtype: str | None = None,
                    isolated: bool | None = None) -> int:
    """Peak bytes of ``starlift export``, the largest of its stages:

    - reference: the torch forward (of the model, or of its first ``validate_layers`` layers)
      drops the checkpoint pages it read after every layer: the embedding (the tied LM head reads
      it whole), one layer, an untied head;
    - save: a window of converted tensors in flight and pages read since the last release, and one
      weight and its transpose (weights in the export's dtype are copied file to file);
    - validate: ONNX Runtime's CPU provider holds the weights it runs (the whole graph or a cut
      of ``validate_layers`` layers), plus an fp32 copy of every fp16 weight, and the logits.

    ``isolated`` (default: above ISOLATE_BYTES of weights, as the export chooses): the first two
    run in a build process that exits before the validation, beside the idle exporting process;
    in one process the build's imports stay under the session. A checkpoint stored in another
    dtype is converted in memory: the converted copy stays for the whole build."""
    s = model_sizes(config)
    per = BYTES_PER[dtype]
    w = s["params"] * per
    if isolated is None:
        isolated = w > ISOLATE_BYTES
    tied = config.get("tie_word_embeddings", True)
    converted = 0 if checkpoint_dtype in (None, dtype) else w
    reference = REFERENCE_BASE_BYTES + (s["embed"] + s["layer"] + (0 if tied else s["head"])) * per
    transposed = max(config["hidden_size"] * config["intermediate_size"], 0 if tied else s["head"])
    save = BUILD_BASE_BYTES + SAVE_WINDOW_BYTES + 2 * transposed * per
    build = converted + max(reference, save)
    run_params = s["params"] if not validate_layers else s["embed"] + validate_layers * s["layer"] + (
        0 if tied else s["head"])
    fp32_copies = 2 if dtype in ("fp16", "bf16") else 0
    logits = 3 * 2 * 32 * config["vocab_size"] * 4  # the prefill's: ORT's, its float32 copy, the reference's
    validate = VALIDATE_BASE_BYTES + run_params * per * (1 + fp32_copies) + logits
    if isolated:
        return int(max(EXPORT_PARENT_BYTES + build, validate))
    return int(max(build, BUILD_BASE_BYTES + validate))


def estimate_quantize(config: dict, source_dtype: str, mode: str, *, quality_layers: int, streaming: bool,
                      eval_tokens: int = 1024, kept_reference: bool = False) -> int:
    """Peak bytes of ``starlift quantize``. Streaming: one weight at a time read from the source's
    data file and its quantized form written out at once; then the quality check, whose sessions run
    one after the other (the whole graphs, or cuts of ``quality_layers`` layers). ``kept_reference``:
    the reference's logits from an earlier try (``--block-size auto``) are held through the build."""
    s = model_sizes(config)
    src = s["params"] * BYTES_PER[source_dtype]
    out = s["params"] * BYTES_PER[mode] + s["embed"] * (BYTES_PER[source_dtype] - BYTES_PER[mode])
    if streaming:
        build = 4 * s["largest"] * 4  # the weight, its fp32/transposed form, packed blocks, scales
    else:
        build = 2 * src + out  # onnx.load of the whole graph, the quantizer's copies, the output
    run = s["params"] if not quality_layers else s["embed"] + quality_layers * s["layer"]
    fp32_copies = 2 if source_dtype in ("fp16", "bf16") else 0
    run_src = run * BYTES_PER[source_dtype] * (1 + fp32_copies)
    logits = 10 * eval_tokens * config["vocab_size"] * 4  # both models' logits, the metrics' float64 temporaries
    kept = eval_tokens * config["vocab_size"] * 4 if kept_reference else 0
    return int(BASE_BYTES + max(build + kept, run_src + logits))


# One generation on ONNX Runtime (``starlift generate``): the interpreter, numpy, onnxruntime,
# tokenizers and the engine (the 113M int4 run: 65 MB of imports, then the tokenizer).
RUN_BASE_BYTES = 80 << 20
# ONNX Runtime prepacks every MatMulNBits weight into MLAS's layout at session start (fp32 scales
# and block sums beside the packed bits) and drops the mapped original: resident bytes per byte of
# the artifact's quantized MatMul data. Measured 1.47 on the 113M int4 session (anonymous memory
# grown at session creation, 113 MiB, over 77 MiB of quantized data; with prepacking off it grows
# 21 MiB: the data file is mapped and read lazily); the 7b run's 7.10 GB (16 tokens) implies 1.64.
# The larger, rounded up: the estimate sits above both.
PREPACKED_PER_QUANTIZED_BYTE = 1.65


def estimate_run(config: dict, precision: str, *, tokens: int = 2048, reference_dtype: str | None = None,
                 source_dtype: str = "fp16") -> int:
    """Peak bytes of one generation of a ``tokens``-token prompt (``reference_dtype`` None) or of
    ``starlift parity`` against the torch reference holding its weights in ``reference_dtype`` and
    computing in fp32 (one weight cast at a time). Parity releases the reference before the
    artifact's session starts: the larger of the two.

    A generation holds: for int4/int8 artifacts (quantized from a ``source_dtype`` artifact) the
    prepacked MatMulNBits weights, the largest one's mapped original once more while it is packed
    (the LM head at 8 bits), the embedding's rows it gathers (the embedding stays in the source
    dtype, mapped, read by row); for fp16 artifacts an fp32 copy of every weight (ONNX Runtime's
    CPU provider has no fp16 MatMul here: 3b fp16, 5.6 GiB of weights, ran at 11.3 GiB), for fp32
    the weights and MLAS's packed copies of some. Then the prompt's logits (every position, fp32:
    the 113M int4 run of a 1,612-token prompt peaked 359 MB above a 4-token one, 317 MB of it
    logits), the layers' activations, and the KV cache in the activations' dtype, which grows by
    doubling (1.5x of it while the old buffer is copied into the new)."""
    s = model_sizes(config)
    h, v = config["hidden_size"], config["vocab_size"]
    quantized = precision in ("int4", "int8")
    act = 4 if precision == "fp32" or (quantized and source_dtype == "fp32") else 2
    if quantized:
        matmuls = (s["params"] - s["embed"] - (0 if config.get("tie_word_embeddings", True) else s["head"]))
        bits_bytes = BYTES_PER[precision] * (1 + 0.125 if precision == "int4" else 1 + 0.0625)  # + fp16 scales
        head = v * h * (1 + 2 / 128)  # the LM head at 8 bits, blocks of 128
        weights = PREPACKED_PER_QUANTIZED_BYTE * (matmuls * bits_bytes + head) + head
    elif precision == "fp16":
        weights = s["params"] * 4
    else:
        weights = s["params"] * 4 * 1.05
    heads = config["num_attention_heads"]
    d = config.get("head_dim") or h // heads
    kv = 2 * config["num_hidden_layers"] * (config.get("num_key_value_heads") or heads) * d * tokens * act
    logits = tokens * v * 4
    hidden_states = tokens * (config["intermediate_size"] + 4 * h) * 4  # the MLP's and the residual's, fp32
    run = RUN_BASE_BYTES + weights + 1.5 * kv + logits + hidden_states
    if reference_dtype:
        kv32 = kv * 4 // act
        reference = BASE_BYTES + s["params"] * BYTES_PER[reference_dtype] + 2 * s["largest"] * 4 + kv32 + 4 * logits
        run = max(run, reference)
    return int(run)


def parse_size(text: str) -> int:
    """``"20G"``, ``"20GiB"``, ``"1500M"``, ``"12.5g"`` or plain bytes -> bytes (binary units)."""
    from starlift.core.errors import UsageError

    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise UsageError(f"--max-memory {text!r} is not a size; write e.g. 20G, 1500M or a number of bytes") from None
    if value <= 0:
        raise UsageError(f"--max-memory must be positive, got {text!r}")
    return int(value * units[unit])


def check_fits(what: str, estimate: int, max_memory: int | None, *, fix: str) -> None:
    """Refuse (``MemoryBudgetError``) when ``estimate`` exceeds ``max_memory`` (default: MemAvailable)."""
    from starlift.core.errors import MemoryBudgetError

    budget, source = max_memory, "--max-memory"
    if budget is None:
        budget, source = available_bytes(), "available memory (MemAvailable)"
    if budget is None or estimate <= budget:
        return
    raise MemoryBudgetError(
        f"{what} needs about {gib(estimate)} at its peak but {source} is {gib(budget)}: it would not fit. "
        f"Fix: {fix}; or pass --max-memory SIZE to override the budget (the estimate is a little above "
        "measured peaks)")
