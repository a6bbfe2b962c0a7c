"""fp16 / int8 / int4 artifacts from fp32 ones, with their quality measured at quantize time.

The quantization itself is onnxruntime's: ``MatMulNBitsQuantizer`` (weight-only 4/8-bit
MatMul, RTN / HQQ / GPTQ, and GatherBlockQuantized for the embedding), ``quantize_dynamic``
(int8 activations x int8 weights) and the transformers ``float16`` converter. Written here
only what they lack: untying the LM head so that head and embedding can be quantized
separately (an int4 head is a known cause of repetition: it stays 8-bit by default), undoing
the fp16 converter's round trips through fp16 between nodes it keeps in float32, and the
quality gate against the fp32 artifact (``starlift.core.tolerance``, the policy ``starlift
parity`` also applies, measured the same way by ``starlift.evaluation.quality``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import tensor_map, tolerance
from starlift.core.artifact import GEMM_FILE, MODEL_FILE, past_names, verify, write_manifest
from starlift.core.errors import ParityError, UsageError
from starlift.core.fsutil import atomic_output_dir, check_output_dir
from starlift.core.signing import check_signing_key, sign_artifact

MODES = ("fp16", "bf16", "int8", "int4")
ALGOS = ("rtn", "hqq", "gptq")
INT8_METHODS = ("nbits", "dynamic", "dynamic-row")
HEAD_NODE = "/model/lm_head/MatMul"
# Ops kept in float32 by the fp16 conversion: statistics and softmax overflow in fp16.
FP16_KEEP = ["LayerNormalization", "SkipLayerNormalization", "Softmax", "Cos", "Sin"]

# Above this many source weight bytes: streaming quantization and a cut quality graph by default.
STREAM_BYTES = 2 << 30
# Above this many source weight bytes (fp16; fp32: three times as many) the quality graphs are cut.
QUALITY_CUT_BYTES = 1 << 30


def _untie_lm_head(model) -> str | None:
    """Gemm(h, E, transB=1) -> MatMul(h, E.T) with its own initializer, so it can be quantized
    apart from the embedding Gather. Returns the tied table's name, None when there is no tied
    Gemm head."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    gemm = next((n for n in graph.node if n.op_type == "Gemm" and n.name.endswith("lm_head/Gemm")), None)
    if gemm is None:
        return None
    inits = {i.name: i for i in graph.initializer}
    weight = numpy_helper.to_array(inits[gemm.input[1]])
    head = numpy_helper.from_array(np.ascontiguousarray(weight.T), "lm_head.weight.T")
    graph.initializer.append(head)
    matmul = onnx.helper.make_node("MatMul", [gemm.input[0], head.name], list(gemm.output), name=HEAD_NODE)
    index = list(graph.node).index(gemm)
    graph.node.remove(gemm)
    graph.node.insert(index, matmul)
    return gemm.input[1]


def _quantized_gather(model, table: str, packed: str, scales: str, zero_points: str | None, vocab: int, k: int,
                      block: int) -> int:
    """Every Gather of the initializer ``table`` [V, K] reads 8-bit weights instead, in
    MatMulNBits' layout: ``packed`` [V, K/block, block] uint8, ``scales`` [V, K/block], optional
    ``zero_points`` [V, K/block] (without them the zero point is 128, as for MatMulNBits). Returns
    how many Gathers were replaced; ``table`` is dropped when nothing else reads it.

        ids -> GatherBlockQuantized(packed, ids, scales [V, K/block, 1], zero_points [V, K/block, 1])
            -> [batch, seq, K/block, block] -> Reshape [0, 0, K] -> [batch, seq, K]

    onnxruntime's quantizer makes GatherBlockQuantized at 4 bits only; the op itself takes 8.
    Quantizing along the last axis of the 3-D packed weights lets a tied LM head's MatMulNBits
    and the embedding read the same initializer. The scales and zero points get their own 3-D
    copies (1/8 of the table at blocks of 32): OpenVINO's ONNX reader wants them as constants,
    not computed by a Reshape."""
    from onnx import helper, numpy_helper

    graph = model.graph
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
    if not gathers:
        return 0
    inits = {i.name: i for i in graph.initializer}
    shape3 = (vocab, k // block, 1)
    extra = [numpy_helper.from_array(numpy_helper.to_array(inits[scales]).reshape(shape3), f"{table}_Q8_scales")]
    if zero_points is not None:
        extra.append(numpy_helper.from_array(numpy_helper.to_array(inits[zero_points]).reshape(shape3),
                                             f"{table}_Q8_zero_points"))
    flat = numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{table}_Q8_row_shape")
    graph.initializer.extend([*extra, flat])
    prefix = "/model/embed_tokens/Q8"
    nodes = []
    for i, gather in enumerate(gathers):
        blocks = f"{prefix}/blocks_{i}"
        nodes.append(helper.make_node("GatherBlockQuantized", [packed, gather.input[1], *(e.name for e in extra)],
                                      [blocks], name=f"{prefix}/GatherBlockQuantized_{i}", domain="com.microsoft",
                                      bits=8, block_size=block, gather_axis=0, quantize_axis=2))
        nodes.append(helper.make_node("Reshape", [blocks, flat.name], list(gather.output), name=f"{prefix}/Reshape_{i}"))
    index = min(list(graph.node).index(g) for g in gathers)
    for gather in gathers:
        graph.node.remove(gather)
    for j, node in enumerate(nodes):
        graph.node.insert(index + j, node)
    if not any(table in n.input for n in graph.node):
        for i in [i for i in graph.initializer if i.name == table]:
            graph.initializer.remove(i)
    _ms_opset(model)
    return len(gathers)


def _embedding_from_head(model, table: str) -> bool:
    """A tied table: the embedding reads the 8-bit LM head's own MatMulNBits weights (stored once,
    as the fp32 graph stores the table once for Gather and Gemm). False when the head is not an
    8-bit MatMulNBits over the whole table."""
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(HEAD_NODE)), None)
    if head is None:
        return False
    attrs = {a.name: a.i for a in head.attribute}
    if attrs.get("bits") != 8 or attrs["K"] % attrs["block_size"]:
        return False
    zero_points = head.input[3] if len(head.input) > 3 and head.input[3] else None
    return _quantized_gather(model, table, head.input[1], head.input[2], zero_points, attrs["N"], attrs["K"],
                             attrs["block_size"]) > 0


def _embedding_8bit(model, block: int, symmetric: bool) -> bool:
    """An untied embedding table to 8 bits with onnxruntime's own MatMulNBits block quantizer
    (the table transposed is a [K, V] MatMul weight, whose packed layout GatherBlockQuantized reads)."""
    from onnx import numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == 1}
    done = False
    for table in sorted(tables):
        weight = numpy_helper.to_array(inits[table])
        if weight.shape[1] % block:
            continue
        quantizer = mnq.DefaultWeightOnlyQuantizer(mnq.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, bits=8))
        packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(weight.T))
        new = [numpy_helper.from_array(packed, f"{table}_Q8"), numpy_helper.from_array(scales, f"{table}_scales")]
        if not symmetric:
            new.append(numpy_helper.from_array(zero_points, f"{table}_zero_points"))
        graph.initializer.extend(new)
        done |= _quantized_gather(model, table, new[0].name, new[1].name, new[2].name if not symmetric else None,
                                  weight.shape[0], weight.shape[1], block) > 0
    return done


def _merge_repeated_casts(model) -> int:
    """Drop a Cast that repeats an earlier one (same input, same ``to``, same output name).

    onnxruntime's float16 converter before 1.31 adds one Cast per consumer of a kept-fp32 input,
    every one writing the same output name; ONNX Runtime 1.30 then refuses the model ("Output
    'mul_51_cast_to_fp32' is redeclared in the current graph scope"). One Cast serves them all,
    as the converter of 1.31+ does itself. Returns how many were dropped."""
    produced: dict[str, tuple] = {}
    keep, dropped = [], 0
    for node in model.graph.node:
        key = (node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        if node.op_type == "Cast" and len(node.output) == 1 and produced.get(node.output[0]) == key:
            dropped += 1
            continue
        produced.update({name: key for name in node.output})
        keep.append(node)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        infos, names = [], set()
        for info in model.graph.value_info:
            if info.name not in names:
                names.add(info.name)
                infos.append(info)
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)
    return dropped


def _score_nodes(model) -> list[str]:
    """A classifier's head: the MatMul by its ``score`` weight (``score.weight.T`` after export)."""
    inits = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node
             if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits and n.input[1].startswith("score.")]
    if len(nodes) != 1:
        raise UsageError(f"expected one MatMul by the classifier's score weight, found {len(nodes)}; re-export the "
                         "artifact with this version of starlift")
    return nodes


def _topologically_sorted(model):
    import onnx_ir as ir

    graph_model = ir.from_proto(model)
    graph_model.graph.sort()
    return ir.to_proto(graph_model)


def _rope_angle_nodes(model) -> list[str]:
    """Nodes computing RoPE angles (position * inv_freq up to Cos/Sin): in fp16 a position of
    1000 keeps only ~0.5 rad of resolution, so they stay fp32."""
    producers = {out: n for n in model.graph.node for out in n.output}
    todo = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    seen: dict[str, object] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        todo.extend(producers[i] for i in node.input if i in producers)
    return [name for name in seen if name]


class _Notice:
    """A logging filter dropping one notice of onnxruntime's quantizers that says nothing to a
    starlift user (the output stays readable): "opset ... under 21 ... may not be a valid model"
    (a 4-bit Gather needs opset 21 for its int4 tensors; the quantizer raises it, starlift checks
    the result itself with the ONNX checker and ONNX Runtime, and the manifest records the new
    opset), and quantize_dynamic's advice to pre-process, which is for CNNs."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def _nbits(model, bits: int, *, block_size: int, symmetric: bool, accuracy_level: int | None, algo: str,
           include: list[str] | None = None, exclude: list[str] | None = None, op_types=("MatMul",),
           calibration=None):
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _Notice) for f in logger.filters):
        logger.addFilter(_Notice("may not be a valid model"))

    common = dict(op_types_to_quantize=op_types)
    if algo == "rtn" or op_types != ("MatMul",):
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                  accuracy_level=accuracy_level, bits=bits,
                                                  quant_axes=(("MatMul", 0), ("Gather", 1)), **common)
    elif algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, **common)
    else:
        if calibration is None:
            raise UsageError("--algo gptq needs --calibration FILE (code text to calibrate on)")
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration, block_size=block_size,
                                               **common)
    shims = _consume_branch_only_inputs(model) if algo == "gptq" and op_types == ("MatMul",) else []
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude or [],
                                         nodes_to_include=include, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    if shims:
        kept = [n for n in out.graph.node if n.name not in shims]
        out.graph.ClearField("node")
        out.graph.node.extend(kept)
    return out


def _consume_branch_only_inputs(model) -> list[str]:
    """Give every graph input that only If branches read (the ort flavour's past KV, read inside
    the attention If of export/gqa.py) a consumer in the main graph, and return those nodes' names.

    onnxruntime.quantization's GPTQ sorts the graph first and looks up each graph input's
    consumers among the main graph's nodes: an input read only inside a branch raises KeyError
    there. The Identity nodes compute nothing used and are removed after quantization."""
    from onnx import helper

    consumed = {name for n in model.graph.node for name in n.input}
    shims = []
    for inp in model.graph.input:
        if inp.name not in consumed:
            name = f"starlift_gptq_shim_{len(shims)}"
            model.graph.node.append(helper.make_node("Identity", [inp.name], [name + "_out"], name=name))
            shims.append(name)
    return shims


class _TextCalibration:
    """GPTQ calibration batches: windows of code text with an empty KV cache (a classifier's graph
    has neither cache nor positions: input_ids and attention_mask only)."""

    def __init__(self, ids: list[int], layers: int, kv_heads: int, head_dim: int, window: int = 128, count: int = 8,
                 with_cache: bool = True):
        self.items = []
        for start in range(0, max(len(ids) - window, 1), window)[:count]:
            chunk = np.asarray([ids[start:start + window]], np.int64)
            feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
            if with_cache:
                feed["position_ids"] = np.arange(chunk.shape[1])[None]
                feed.update({name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name in past_names(layers)})
            self.items.append(feed)
        self._iter = iter(self.items)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self.items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def quantize_artifact(src: str | Path, out: str | Path, *, mode: str, block_size: int = 32, algo: str = "rtn",
                      accuracy_level: int | None = 4, symmetric: bool = False, int8_method: str = "nbits",
                      head_bits: int | None = None, head_block_size: int | None = None, calibration: str | Path | None = None, exclude: list[str] | None = None,
                      eval_text: str | None = None, eval_windows: int = 4, force: bool = False, allow_quality_loss: bool = False,
                      progress: bool = True, sign_key: str | Path | None = None, stream: bool | None = None,
                      quality_layers: int | None = None, max_memory: int | None = None,
                      int8_gemm: bool = False, _rejected: list[dict] | None = None,
                      _references: dict | None = None) -> dict[str, Any]:
    """Quantize the fp32 artifact ``src`` into the artifact folder ``out``; returns its manifest.

    ``head_bits``: 8 or 4 quantize the head (the LM head, or a classifier's ``score``) with
    MatMulNBits apart from the body; 32 keeps it in float. Default: 8 for the LM head, 32 for a
    classification head (a few kilobytes: nothing to save, only error to add).
    ``stream``: int4/int8 one weight at a time (streaming.py), from an fp32 or fp16 artifact; None
    streams fp16 sources and sources above STREAM_BYTES. ``quality_layers``: measure quality on
    both graphs cut after N layers (starlift/core/graphcut.py); None: the whole graphs up to STREAM_BYTES of
    source weights, else 2 layers; 0: whole. ``max_memory``: refuse before starting when the
    estimated peak is larger (default: the machine's available memory).

    ``int8_gemm``: int4 only: also write ``int8_gemm.onnx``, the graph that runs wide steps
    (prompts, decode steps of several sequences) on the integer GEMM, its uint8 weights the
    4-bit ones on one grid per column (int8_gemm.py); both graphs pass the quality gate.

    ``sign_key``: a private key (``starlift keygen``) that signs the manifest before OUT appears.

    ``block_size="auto"`` (int4, and int8 with ``int8_method="nbits"``): the largest of 128, 64
    and 32 whose artifact passes the gate, the fastest that does (docs/guide/quantize.md); the
    manifest's ``quantization.block_size_search`` records the sizes the gate rejected."""
    import onnx

    if block_size == "auto":
        return _largest_passing_block_size(src, out, allow_quality_loss=allow_quality_loss, options=dict(
            mode=mode, algo=algo, accuracy_level=accuracy_level, symmetric=symmetric, int8_method=int8_method,
            head_bits=head_bits, head_block_size=head_block_size, calibration=calibration, exclude=exclude,
            eval_text=eval_text, eval_windows=eval_windows, force=force, progress=progress, sign_key=sign_key,
            stream=stream, quality_layers=quality_layers, max_memory=max_memory, int8_gemm=int8_gemm))
    src = Path(src)
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "bf16":
        raise UsageError("bf16 artifacts come from the exporter, which keeps LayerNorm and softmax in fp32: run "
                         "`starlift export CHECKPOINT OUT --dtype bf16` (ONNX Runtime's CPU provider has no bf16 "
                         "kernels; OpenVINO runs them)")
    if algo not in ALGOS:
        raise UsageError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)}")
    if block_size not in (16, 32, 64, 128, 256):
        raise UsageError(f"--block-size must be a power of two in 16..256, got {block_size}")
    if int8_method not in INT8_METHODS:
        raise UsageError(f"unknown int8 method {int8_method!r}; choose one of {', '.join(INT8_METHODS)}")
    accuracy_level = accuracy_level or None  # 0 means "unset" (onnxruntime's default compute type)
    manifest = verify(src, check_onnx=False)
    source_dtype = manifest.get("dtype")
    src_bytes = sum(p.stat().st_size for p in src.glob(MODEL_FILE + "*"))
    if stream is None:
        stream = source_dtype == "fp16" or src_bytes > STREAM_BYTES
    if stream:
        if mode not in ("int4", "int8") or algo != "rtn" or int8_method != "nbits" or calibration is not None:
            raise UsageError(f"streaming quantization (fp16 sources, or sources above {STREAM_BYTES >> 30} GiB) does "
                             "int4/int8 weight-only RTN only: use --mode int4/int8 without --algo hqq/gptq, "
                             "--int8-method dynamic or --calibration")
        if source_dtype not in ("fp32", "fp16") or manifest.get("precision", source_dtype) != source_dtype:
            raise UsageError(f"{src} is an artifact of precision {manifest.get('precision')}; quantize from an fp32 "
                             "or fp16 export")
    elif source_dtype != "fp32" or manifest.get("precision", "fp32") != "fp32":
        raise UsageError(f"{src} is an artifact of precision {manifest.get('precision')}; quantize from an fp32 "
                         "export (int4/int8 also from an fp16 export)")
    classifier = manifest.get("task", "text-generation") != "text-generation"
    if head_bits is None:
        head_bits = 32 if classifier else 8
    if head_bits not in (4, 8, 32):
        raise UsageError(f"--head-bits must be 4, 8 or 32 (kept in float), got {head_bits}")
    if classifier and head_bits == 4:
        raise UsageError("a classification head is kept at 8 bits or in float: pass --head-bits 8 or 32")
    # int4's 8-bit head: scales per 128 weights instead of 32 cost nothing measurable (nano held-out
    # top-1 0.940 vs 0.941, perplexity 35.79 vs 35.80) and read 5% fewer bytes per step (113M int4:
    # 88.0 vs 92.4 MB, decode +3-6%); int8's head keeps --block-size (0.989 vs 0.992 top-1 there)
    # (after head_bits' default is known: None meant 8 for a causal LM)
    head_block_size = head_block_size or (128 if mode == "int4" and head_bits == 8 else block_size)
    if head_block_size not in (16, 32, 64, 128, 256):
        raise UsageError(f"--head-block-size must be a power of two in 16..256, got {head_block_size}")
    if int8_gemm and (mode != "int4" or classifier):
        raise UsageError("--int8-gemm adds an integer-GEMM graph to a 4-bit causal LM: use it with --mode int4 "
                         "(int8 artifacts run the integer GEMM with --int8-method dynamic-row)")
    if int8_gemm and quality_layers:
        raise UsageError("--int8-gemm measures the integer-GEMM graph's quality on the whole graph: pass "
                         "--quality-layers 0")
    if stream and (classifier or head_bits == 32):
        raise UsageError("streaming quantization is for causal LMs with a 4- or 8-bit head: quantize a classifier "
                         "from its fp32 export with --no-stream")
    check_output_dir(out, force)
    if sign_key is not None:
        check_signing_key(sign_key)  # a wrong key fails now, not after the quantization
    config = json.loads((src / "config.json").read_text())
    if classifier and quality_layers:
        raise UsageError("--quality-layers cuts a causal LM's graph; a classifier's quality runs its whole graph "
                         "(drop --quality-layers)")
    if classifier:
        quality_layers = 0
    if quality_layers is None:
        # ONNX Runtime runs an fp16 source through fp32 copies of its weights: 3x the source for a
        # whole-graph check (measured: 5.3 GB peak for a 1.75 GB fp16 source)
        big = src_bytes * (3 if source_dtype == "fp16" else 1) > 3 * QUALITY_CUT_BYTES
        quality_layers = 2 if big and config["num_hidden_layers"] > 2 else 0
    if quality_layers < 0 or quality_layers and quality_layers >= config["num_hidden_layers"]:
        raise UsageError(f"--quality-layers {quality_layers}: use 0 (whole graphs) or 1..{config['num_hidden_layers'] - 1}")
    from starlift.core import memory
    from starlift.evaluation.quality import WINDOW_TOKENS

    estimate = memory.estimate_quantize(config, source_dtype, mode, quality_layers=quality_layers, streaming=stream,
                                        eval_tokens=WINDOW_TOKENS * eval_windows, kept_reference=bool(_references))
    memory.check_fits("quantize", estimate, max_memory,
                      fix="measure quality on a cut graph (--quality-layers 1) and fewer --eval-windows, or free memory")
    tokenizer = None
    if (src / "tokenizer.json").is_file():
        from starlift.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(src / "tokenizer.json")

    from starlift.core.progress import progress_bar

    bar = progress_bar(total=4, desc=f"quantize {mode}", unit="stage", enabled=progress)
    try:
        with atomic_output_dir(out, force=force) as tmp:
            details: dict[str, Any] = {"mode": mode}
            model = None if stream else onnx.load(str(src / MODEL_FILE))
            if stream:
                from .streaming import quantize_graph

                bits = 4 if mode == "int4" else 8
                counts = quantize_graph(src / MODEL_FILE, tmp, bits=bits, block_size=block_size, symmetric=symmetric,
                                        accuracy_level=accuracy_level, head_bits=head_bits,
                                        head_block_size=head_block_size, progress=progress,
                                        head_names={n for n in _graph_node_names(src / MODEL_FILE) if "lm_head" in n},
                                        exclude=set(exclude or []))
                details.update({"bits": bits, "block_size": block_size, "algo": "rtn", "symmetric": symmetric,
                                "accuracy_level": accuracy_level, "head_bits": head_bits,
                                "head_block_size": head_block_size, "int8_method": "nbits" if mode == "int8" else None,
                                "embedding": f"{source_dtype} Gather (kept as in the source)",
                                "excluded": list(exclude or []), "streaming": True,
                                "activations": source_dtype, **counts})
            elif mode == "fp16":
                from onnxruntime.transformers.float16 import convert_float_to_float16

                rope = _rope_angle_nodes(model)
                model = convert_float_to_float16(model, keep_io_types=["logits"], op_block_list=FP16_KEEP,
                                                 node_block_list=rope)
                _merge_repeated_casts(model)
                details["removed_round_trip_casts"] = _undo_fp16_round_trips(model)
                model = _topologically_sorted(model)  # the converter appends its Casts at the end
                details["kept_fp32_ops"] = FP16_KEEP
                details["kept_fp32_nodes"] = len(rope)
            else:
                if classifier:
                    head, tied = _score_nodes(model), None
                else:
                    tied = _untie_lm_head(model) if head_bits != 32 else None
                    head = [HEAD_NODE] if tied else [n.name for n in model.graph.node
                                                     if n.op_type == "MatMul" and "lm_head" in n.name]
                bits = 4 if mode == "int4" else 8
                calib = None
                if calibration is not None:
                    text = Path(calibration).read_text(encoding="utf-8")
                    if tokenizer is None:
                        raise UsageError(f"{src} has no tokenizer.json to read the calibration text with")
                    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
                    calib = _TextCalibration(tokenizer.encode(text), config["num_hidden_layers"],
                                             config.get("num_key_value_heads", config["num_attention_heads"]),
                                             head_dim, with_cache=not classifier)
                bar.set_description(f"quantize {mode}: matmuls")
                if mode == "int8" and int8_method == "dynamic":
                    model = _dynamic_int8(model, exclude=list(exclude or []))
                elif mode == "int8" and int8_method == "dynamic-row":
                    _row_int8(model, exclude=head + list(exclude or []))
                else:
                    model = _nbits(model, bits, block_size=block_size, symmetric=symmetric,
                                   accuracy_level=accuracy_level, algo=algo, exclude=head + list(exclude or []),
                                   calibration=calib)
                bar.set_description(f"quantize {mode}: head and embedding")
                if head and head[0] not in (exclude or []) and head_bits != 32:
                    model = _nbits(model, head_bits, block_size=head_block_size, symmetric=symmetric,
                                   accuracy_level=accuracy_level, algo="rtn", include=head)
                # The embedding: a tied table reads the 8-bit head's weights (stored once); otherwise
                # int4 quantizes it to 4 bits (onnxruntime's GatherBlockQuantized) and int8 to 8 bits.
                if tied and _embedding_from_head(model, tied):
                    embedding = f"GatherBlockQuantized 8-bit, shared with the LM head (blocks of {head_block_size})"
                elif mode == "int4":
                    model = _nbits(model, 4, block_size=block_size, symmetric=symmetric, accuracy_level=None,
                                   algo="rtn", op_types=("Gather",))
                    embedding = f"GatherBlockQuantized 4-bit (blocks of {block_size})"
                elif _embedding_8bit(model, block_size, symmetric):
                    embedding = f"GatherBlockQuantized 8-bit (blocks of {block_size})"
                else:
                    embedding = "fp32 Gather"
                details.update({"bits": bits, "block_size": block_size, "algo": algo, "symmetric": symmetric,
                                "accuracy_level": accuracy_level, "head_bits": head_bits,
                                "head_block_size": head_block_size, "int8_method":
                                int8_method if mode == "int8" else None,
                                "embedding": embedding,
                                "excluded": list(exclude or [])})
            bar.update()
            bar.set_description(f"quantize {mode}: save")
            if model is not None:
                opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                             manifest.get("opset"))
                # where the residual stream lives now (the quantizers keep the names; the map says so)
                tmap = None if classifier else tensor_map.resolve_onnx(model, config["num_hidden_layers"])
                _sort_nodes(model.graph)
                onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
                del model
            else:  # streamed: the graph's nodes only, its weights stay on disk
                opset = manifest.get("opset")
                tmap = tensor_map.resolve_onnx(onnx.load(str(tmp / MODEL_FILE), load_external_data=False),
                                               config["num_hidden_layers"])
            onnx.checker.check_model(str(tmp / MODEL_FILE))
            if int8_gemm:
                from .int8_gemm import MIN_ROWS, MIN_TOKENS, write_gemm_graph

                bar.set_description(f"quantize {mode}: integer-GEMM graph")
                gemms = write_gemm_graph(tmp, is_head=lambda name: name.startswith(HEAD_NODE) or "lm_head" in name)
                if not gemms:
                    raise UsageError(f"{src} has no 4-bit MatMulNBits for --int8-gemm to run on the integer GEMM "
                                     "(every matmul excluded?)")
                details["int8_gemm"] = {"file": GEMM_FILE, "min_tokens": MIN_TOKENS, "min_rows": MIN_ROWS,
                                        "integer_gemms": gemms,
                                        "bytes": sum(p.stat().st_size for p in tmp.glob(GEMM_FILE + "*"))}
            for name in ("config.json", "tokenizer.json", "generation_config.json", "genai_config.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            bar.update()
            bar.set_description(f"quantize {mode}: quality")
            if classifier:
                quality = measure_head_quality(src, tmp, tokenizer, config, eval_text, mode)
            else:
                quality = measure_quality(src / MODEL_FILE, tmp / MODEL_FILE, tokenizer, config, eval_text, mode,
                                          windows=eval_windows, layers=quality_layers, int8_gemm=int8_gemm,
                                          references=_references)
            bar.update()
            onnx_bytes = sum(p.stat().st_size for p in tmp.glob(MODEL_FILE + "*"))
            src_bytes = sum(p.stat().st_size for p in src.glob(MODEL_FILE + "*"))
            info = {k: v for k, v in manifest.items() if k not in ("format", "files", "validation", "size")}
            info["opset"] = opset
            info.update({"dtype": "fp16" if mode == "fp16" or (stream and source_dtype == "fp16") else "fp32",
                         "precision": mode, "quantization": details,
                         "size": {"onnx_bytes": onnx_bytes, "fp32_onnx_bytes": src_bytes, "source_onnx_bytes": src_bytes,
                                  "source_dtype": source_dtype, "ratio_to_fp32": onnx_bytes / src_bytes},
                         "source_artifact": {"path": src.name, "manifest_sha256": _sha(src / "manifest.json")},
                         "quality": quality, "validation": manifest.get("validation")})
            if _rejected is not None:
                details["block_size_search"] = {"chosen": block_size, "rejected": _rejected}
            if tmap is not None:
                info["tensor_map"] = tmap
            if mode == "fp16" and manifest.get("kv_cache") is not None:  # a classifier has no cache
                info["kv_cache"] = {**manifest["kv_cache"], "dtype": "fp16"}
            new_manifest = write_manifest(tmp, info)
            if not quality["passed"] and not allow_quality_loss and classifier:
                failed = "; ".join(f"{k} {c['value']:.3g} (gate {c['tolerance']:g})"
                                   for k, c in quality["checks"].items() if not c["passed"])
                raise ParityError(
                    f"{mode} quality is below the gate against the fp32 artifact: {failed}; {out} was not written. "
                    "Try --block-size 16, --head-bits 32, or pass --allow-quality-loss to keep it anyway")
            if not quality["passed"] and not allow_quality_loss:
                failed = "; ".join(f"{name} {c['value']:.3g} (gate {'<=' if c['direction'] == 'max' else '>='} "
                                   f"{c['tolerance']:.3g})" for name, c in quality["checks"].items() if not c["passed"])
                raise ParityError(
                    f"{mode} quality is below the gate against the fp32 artifact: {failed or 'non-finite logits'}; "
                    f"{out} was not written. Try a smaller --block-size, --algo hqq (more accurate, slower to "
                    "run on CPU), or pass --allow-quality-loss to keep it anyway", quality=quality)
            if sign_key is not None:
                sign_artifact(tmp, sign_key)
            bar.update()
    finally:
        bar.close()
    return new_manifest


AUTO_BLOCK_SIZES = (128, 64, 32)


def _largest_passing_block_size(src, out, *, allow_quality_loss: bool, options: dict) -> dict[str, Any]:
    """``block_size="auto"``: quantize at each of AUTO_BLOCK_SIZES, largest first, and keep the first
    artifact that passes the gate. Larger blocks are smaller and faster in ONNX Runtime's MatMulNBits
    (fewer scales, less work per block: on the 113M shape int4 at 128 prefills and decodes about
    1.2x faster than at 32) and lose more; only the gate knows what a given model tolerates (int4
    at 128 passes on starcoder2-nano and not on a fine-tune of it). A rejected size leaves nothing
    behind (the gate's own cleanup); the last size keeps ``allow_quality_loss``. The fp32 artifact's
    reference run over the gate's text is the same for every size: made once, kept for the next."""
    mode, method = options["mode"], options["int8_method"]
    if mode not in ("int4", "int8") or (mode == "int8" and method != "nbits"):
        raise UsageError("--block-size auto searches MatMulNBits block sizes: use it with --mode int4, or --mode "
                         f"int8 with --int8-method nbits (got --mode {mode}"
                         + (f" --int8-method {method})" if mode == "int8" else ")"))
    rejected: list[dict] = []
    references: dict = {}
    for size in AUTO_BLOCK_SIZES:
        try:
            return quantize_artifact(src, out, block_size=size, _rejected=rejected, _references=references, **options,
                                     allow_quality_loss=allow_quality_loss and size == AUTO_BLOCK_SIZES[-1])
        except ParityError as e:
            if e.quality is None:  # a classifier's gate, or a failure that is not the gate's verdict
                raise
            rejected.append({"block_size": size, "top1_agreement": e.quality.get("top1_agreement"),
                             "mean_kl": e.quality.get("mean_kl")})
            cause = e
    tried = ", ".join(f"{r['block_size']}: top-1 {r['top1_agreement']:.3f}" for r in rejected)
    raise ParityError(f"no block size passed the {mode} quality gate ({tried}); {out} was not written. Try "
                      "--block-size 16, --algo hqq (more accurate, slower to run on CPU), or pass "
                      "--allow-quality-loss to keep block 32 anyway") from cause


def _graph_node_names(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]


def _sha(path: Path) -> str:
    from starlift.core.fsutil import sha256_file

    return sha256_file(path)


def _dynamic_int8(model, exclude: list[str]):
    """onnxruntime's quantize_dynamic: int8 activations x int8 weights for every MatMul."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notice = _Notice("pre-processing before quantization")  # advice for CNNs, logged on the root logger
    logging.getLogger().addFilter(notice)
    with tempfile.TemporaryDirectory(prefix="starlift-q8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True, location="in.onnx.data")
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=exclude, per_channel=True, use_external_data_format=True)
        finally:
            logging.getLogger().removeFilter(notice)
        return onnx.load(str(dst))


def _row_int8(model, exclude: list[str]) -> int:
    """Per-row dynamic int8: each row (token) of a MatMul's input gets its own scale; returns how
    many MatMuls were rewritten.

    Hand-written because onnxruntime.quantization has no per-row activation mode:
    ``quantize_dynamic`` inserts DynamicQuantizeLinear, one scale and zero point for the whole
    input tensor, so a row's result depends on its batch-mates (and one outlier row coarsens the
    others). Here, for every MatMul whose B is a 2-D float initializer [K, N]:

        x [..., K] -> amax = ReduceMax(Abs(x), -1) [..., 1] -> s = amax / 127 (+ tiny)
          -> QuantizeLinear(x / s, 1, 128): uint8, zero point 128 (MatMulInteger's A zero
             point must be a scalar in ORT's CPU kernel, so the row scale is symmetric)
          -> MatMulIntegerToFloat(., Bq, a_scale = s, b_scale = w_scale [N]) float [..., N]

    MatMulIntegerToFloat (ORT's contrib op, the fused form of MatMulInteger -> Cast -> Mul that
    its own dynamic quantization produces) takes a non-scalar a_scale: it multiplies the output
    by it, broadcast, after the integer GEMM (checked against numpy in the tests). It scales its
    optional bias input by that row scale too, so a MatMul's bias Add stays a separate node.

    Bq: per-column symmetric 8-bit weights stored as uint8 around zero point 128, a constant
    initializer so ORT prepacks it at load. uint8, not int8: MLAS's U8S8 kernel on AVX2 without
    VNNI sums pairs of u8 x s8 products with vpmaddubsw, which saturates int16 (measured: integer
    errors up to 15,513 on one K = 768 row); its U8U8 kernel widens to int16 first and is exact,
    at about the same speed. (int8 weights in 7 bits, onnxruntime's ``reduce_range``, are exact
    too but lost 0.6 points of top-1 on starcoder2-nano.) A row's quantization reads only that
    row, so a request's logits do not depend on which other requests share its batch. Inputs
    read by several MatMuls (q, k, v) are quantized once.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.name not in exclude and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == TensorProto.FLOAT]
    if not targets:
        return 0
    graph.initializer.extend(_row_constants("rowq8/"))
    rows = RowQuantizer("rowq8/")
    placed = {}  # a MatMul's output -> the nodes that replace that MatMul
    for node in targets:
        wname = node.input[1]
        q, scale, nodes = rows.quantized(node.input[0])
        placed.setdefault(node.output[0], []).extend(nodes)
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        wscale = np.maximum(np.abs(w).max(axis=0), 1e-30) / 127
        wq = (np.clip(np.round(w / wscale), -127, 127) + 128).astype(np.uint8)
        graph.initializer.extend([numpy_helper.from_array(wq, wname + "_rowq8"),
                                  numpy_helper.from_array(wscale.astype(np.float32), wname + "_rowq8_scale")])
        p = node.name + "/rowq8"
        placed.setdefault(node.output[0], []).append(helper.make_node(
            "MatMulIntegerToFloat", [q, wname + "_rowq8", scale, wname + "_rowq8_scale", "rowq8/zp128", "rowq8/zp128"],
            list(node.output), name=p + "/MatMulIntegerToFloat", domain="com.microsoft"))
    new = []
    for n in graph.node:
        if n.output and n.output[0] in placed:
            new.extend(placed[n.output[0]])
        else:
            new.append(n)
    del graph.node[:]
    graph.node.extend(new)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    _ms_opset(model)
    return len(targets)


def _row_constants(c: str) -> list:
    """The scalars ``RowQuantizer`` reads, named with the prefix ``c``."""
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.array([-1], np.int64), c + "axes"),
            numpy_helper.from_array(np.array(1 / 127, np.float32), c + "inv127"),
            numpy_helper.from_array(np.array(1e-30, np.float32), c + "tiny"),
            numpy_helper.from_array(np.array(1.0, np.float32), c + "one"),
            numpy_helper.from_array(np.array(128, np.uint8), c + "zp128")]


class RowQuantizer:
    """Per-row uint8 quantization of MatMul inputs (the activation side of ``_row_int8`` and of
    the int8 GEMM graph): amax = ReduceMax(|x|, -1), s = amax / 127 (+ tiny), q = x / s + 128.
    Each input is quantized once (q, k and v share theirs); ``_row_constants(prefix)`` must be
    in the graph."""

    def __init__(self, prefix: str):
        self.c, self.done = prefix, {}

    def quantized(self, x: str) -> tuple[str, str, list]:
        """(uint8 rows, their scales [..., 1], the nodes to insert before the first user: [] after
        the first call for ``x``)."""
        from onnx import helper

        if x in self.done:
            return (*self.done[x], [])
        c = self.c
        p = f"/{c}{len(self.done)}"
        nodes = [helper.make_node("Abs", [x], [p + "/abs"], name=p + "/Abs"),
                 helper.make_node("ReduceMax", [p + "/abs", c + "axes"], [p + "/amax"], name=p + "/ReduceMax",
                                  keepdims=1),
                 helper.make_node("Mul", [p + "/amax", c + "inv127"], [p + "/s0"], name=p + "/Mul"),
                 helper.make_node("Add", [p + "/s0", c + "tiny"], [p + "/scale"], name=p + "/Add"),
                 helper.make_node("Div", [x, p + "/scale"], [p + "/xs"], name=p + "/Div"),
                 helper.make_node("QuantizeLinear", [p + "/xs", c + "one", c + "zp128"], [p + "/q"],
                                  name=p + "/QuantizeLinear")]
        self.done[x] = (p + "/q", p + "/scale")
        return p + "/q", p + "/scale", nodes


def _ms_opset(model) -> None:
    import onnx

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _undo_fp16_round_trips(model) -> int:
    """Remove ``x (fp32) -> Cast(fp16) -> Cast(fp32)`` pairs; returns how many Casts went.

    onnxruntime's converter casts every output of a node it keeps in float32 to fp16 and back
    for the next float32 node, so a float32 chain (the RoPE angles, the residual between two
    SkipLayerNormalizations) is rounded to fp16 on every edge: an angle of 1000 rad keeps
    0.5 rad of resolution. (onnxscript's CastCast rule refuses this pair on purpose: it changes
    values; here that change is the bug.) On starcoder2-nano the largest logit error against
    fp32 went from 0.83 to 0.02 over the default quality text. The float32 value takes the
    name the fp16 copy had, its name before conversion, which the tensor map refers to.
    """
    from onnx import TensorProto

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    kept = {o.name for o in graph.output} | {i.name for i in graph.input}

    def to(node) -> int:
        return next((a.i for a in node.attribute if a.name == "to"), -1)

    rename, drop = {}, []
    for n in graph.node:
        if n.op_type != "Cast" or to(n) != TensorProto.FLOAT16 or n.output[0] in kept or n.input[0] not in producers:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "Cast" or to(u) != TensorProto.FLOAT or u.output[0] in kept for u in users):
            continue
        rename[n.input[0]] = n.output[0]  # the fp32 value gets the original name
        rename.update({u.output[0]: n.output[0] for u in users})
        drop.extend([n, *users])
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for field in (n.input, n.output):
            for i, name in enumerate(field):
                field[i] = rename.get(name, name)
    stale = [v for v in graph.value_info if v.name in rename or v.name in rename.values()]
    for v in stale:  # their types changed (fp16 -> fp32); ONNX Runtime infers them again
        graph.value_info.remove(v)
    return len(drop)


def measure_quality(reference_path: Path, candidate_path: Path, tokenizer, config: dict, eval_text: str | None,
                    mode: str, windows: int = 4, layers: int = 0, int8_gemm: bool = False,
                    references: dict | None = None, _key: tuple | None = None) -> dict[str, Any]:
    """The candidate against the fp32 artifact on the quality text, judged by the tolerance policy
    (the same measurement ``starlift parity`` makes against the PyTorch reference).

    ``layers`` > 0: both graphs cut after that many layers (starlift.core.graphcut), so that neither
    holds more than the embedding, those layers and the head (the sessions run one after the
    other); the policy's bounds are those of the cut's depth. ``int8_gemm``: measure the
    candidate's int8_gemm.onnx too (a 4-bit artifact's integer-GEMM graph), against the same
    reference run: under ``int8_gemm``, its checks joined to the candidate's as "int8_gemm NAME".

    ``references``: a dict that keeps the reference run between calls on the same fp32 artifact
    (``block_size="auto"`` measures several candidates against it): looked up by the artifact's
    resolved path, the cut's depth, the window count and the text."""
    key = _key or (str(Path(reference_path).resolve()), layers, windows, eval_text)
    if layers:
        from starlift.core.graphcut import write_cut

        with tempfile.TemporaryDirectory(prefix="starlift-quality-", dir=Path(candidate_path).parent.parent) as work:
            paths = []
            for name, path in (("reference", Path(reference_path)), ("candidate", Path(candidate_path))):
                folder = Path(work) / name
                folder.mkdir()
                # the cut graph beside a hard link to the artifact's own data file: nothing is copied
                # (ONNX Runtime refuses a symbolic link that leads out of the model's folder)
                data = path.parent / (MODEL_FILE + ".data")
                try:
                    os.link(data, folder / data.name)
                except OSError as e:
                    raise UsageError(f"cannot hard-link {data} next to {folder} ({e}) for the cut quality graph: "
                                     "write OUT on the same filesystem as the source artifact, or pass "
                                     "--quality-layers 0") from e
                paths.append(write_cut(path, layers, folder / MODEL_FILE))
            values = measure_quality(paths[0], paths[1], tokenizer, {**config, "num_hidden_layers": layers},
                                     eval_text, mode, windows=windows, references=references, _key=key)
        values.update({"graph": "cut", "layers": layers, "of_layers": config["num_hidden_layers"]})
        return values
    from starlift.evaluation import quality
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    plan = quality.make_plan(tokenizer, config["vocab_size"], config.get("max_position_embeddings", 1024), eval_text,
                             windows=windows)
    reference = (references or {}).get(key)
    if reference is None:
        with OnnxRuntimeRunner(reference_path) as runner:
            reference = quality.run_reference(quality.RunnerSource(runner, "fp32 artifact"), plan)
        if references is not None:
            references[key] = reference
    measured = []
    for gemm in (False, True) if int8_gemm else (False,):  # one reference run for both graphs
        with OnnxRuntimeRunner(candidate_path, int8_gemm=gemm) as runner:
            values = quality.measure(reference, quality.RunnerSource(runner, mode), plan, mode,
                                     tolerance.Shape.of(config), against="fp32-artifact")
        values["perplexity_fp32"] = values["perplexity_reference"]
        values["gate"] = {name: {"direction": c["direction"], "bound": c["tolerance"]}
                          for name, c in values["checks"].items()}
        measured.append(values)
    values = measured[0]
    if int8_gemm:  # the integer-GEMM graph's own gate: every window (1,024 tokens) runs on it
        wide = values["int8_gemm"] = measured[1]
        values["checks"].update({f"int8_gemm {k}": c for k, c in wide["checks"].items()})
        values["passed"] = values["passed"] and wide["passed"]
    return values


def measure_head_quality(reference: Path, candidate: Path, tokenizer, config: dict, eval_text: str | None,
                         mode: str) -> dict[str, Any]:
    """A classifier's quality against its fp32 artifact, on its own outputs: label agreement and the
    largest probability change over windows of code text (every token for a token head), in
    right-padded batches; gated per mode by ``starlift.evaluation.heads.TOLERANCES``."""
    from starlift.evaluation import heads
    from starlift.evaluation.quality import default_text
    from starlift.runtimes.classifiers import OnnxRuntimeClassifier, batched_logits

    described = "given"
    if tokenizer is None:
        described = "random token ids (the artifact has no tokenizer.json)"
    elif eval_text is None:
        eval_text, described = default_text()
    logits = {}
    for name, folder in (("reference", reference), ("candidate", candidate)):
        with OnnxRuntimeClassifier(folder) as runner:
            info = runner.info
            cases = heads.samples(tokenizer, info.vocab_size, eval_text, info.task, count=256)
            logits[name] = batched_logits(runner, cases)
    values = heads.metrics(logits["reference"], logits["candidate"], info.problem_type)
    values.update(heads.judge(values, mode))
    values.update({"task": info.task, "samples": len(cases), "tokens": int(sum(map(len, cases))), "text": described,
                   "gate": {k: {"direction": d, "bound": b} for k, (d, b) in heads.TOLERANCES[mode].items()}})
    return values


def _sort_nodes(graph) -> None:
    """Order ``graph``'s nodes so each comes after the producers of what it reads, the values its
    If branches read from this graph included. onnxruntime.quantization's topological sort looks
    at node inputs only, so it can put the ort flavour's attention If (export/gqa.py), whose only
    input is its condition, before the projections its branches read: an invalid graph. Stable:
    an already valid order is kept as it is."""
    def reads(node) -> set[str]:
        names = set(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} \
                    | {t.name for t in sub.initializer}
                names |= {name for n in sub.node for name in reads(n)} - inner
        return names - {""}

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needs = [{producer[name] for name in reads(n) if name in producer} for n in nodes]
    done: set[int] = set()
    order: list[int] = []

    def place(i: int) -> None:  # depth first over producers; iterative so deep graphs do not recurse
        stack = [(i, iter(sorted(needs[i])))]
        while stack:
            j, pending = stack[-1]
            nxt = next((k for k in pending if k not in done), None)
            if nxt is None:
                stack.pop()
                if j not in done:
                    done.add(j)
                    order.append(j)
            elif all(nxt != s for s, _ in stack):
                stack.append((nxt, iter(sorted(needs[nxt]))))

    for i in range(len(nodes)):
        place(i)
    if order != list(range(len(nodes))):
        graph.ClearField("node")
        graph.node.extend(nodes[i] for i in order)

